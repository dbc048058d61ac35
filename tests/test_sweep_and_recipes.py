"""Sweeps over a declared space, the typed recipe keys of the training issue, and every shipped recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneloop.config import TASKS, load_recipe, recipe_from_dict
from tuneloop.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted(ROOT.glob("recipes/**/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    r = load_recipe(path)
    assert r.name and r.task in TASKS


def test_quickstart_recipe_is_lora_classification_on_the_bundled_model():
    r = load_recipe(ROOT / "recipes" / "quickstart-reviews.yaml")
    assert (r.task, r.method.name, r.model) == ("classify", "lora", "smollm2-135m-instruct")
    assert r.eval.systems == ["base", "base_fewshot", "tuned", "tfidf_logreg"] and r.eval.prompted_sample == 200


@pytest.mark.parametrize("override, message", [
    ("method.name=adapterx", "method.name"),
    ("task=translate", "task"),
    ("train.patience=0", "train.patience"),
    ("train.packing=maybe", "train.packing"),
    ("sweep.space={train.lr: {low: 1}}", "sweep.space"),
    ("train.bogus=1", "unknown key"),
])
def test_bad_training_keys_fail_with_the_key(override, message):
    doc = {"name": "x", "task": "sft", "data": {"train": "a.jsonl"}}
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        recipe_from_dict(doc, [override])


@pytest.mark.slow
def test_sweep_picks_by_validation_metric(tmp_path, tiny_llama_dir):
    from tuneloop.sweep import run_sweep

    data = tmp_path / "chat.jsonl"
    with data.open("w") as f:
        for i in range(24):
            f.write(json.dumps({"instruction": f"Say {i}", "input": "", "output": f"{i} {i} {i}."}) + "\n")
    recipe = recipe_from_dict({
        "name": "sw", "task": "sft", "model": str(tiny_llama_dir),
        "data": {"train": str(data), "val_ratio": 0.25},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 3, "batch_size": 4, "precision": "fp32", "threads": 1, "max_length": 48},
        "sweep": {"metric": "best_val_loss", "direction": "minimize",
                  "space": {"train.lr": {"low": 1e-4, "high": 1e-1, "log": True}, "method.r": {"choices": [2, 4]}}},
    })
    result = run_sweep(recipe, tmp_path / "ws", trials=2, show_progress=False)
    assert len(result["trials"]) == 2
    best = min(result["trials"], key=lambda t: t["best_val_loss"])
    assert result["best_trial"] == best["trial"] and Path(result["best_run"]).is_dir()
    assert (tmp_path / "ws" / "sweeps" / "sw.json").exists()
    stored = load_recipe(Path(result["best_run"]) / "recipe.yaml")
    assert stored.method.r == best["method.r"]


def test_sweep_rejects_unknown_keys(tmp_path):
    from tuneloop.sweep import run_sweep

    recipe = recipe_from_dict({"name": "x", "task": "sft", "data": {"train": "a.jsonl"},
                               "sweep": {"space": {"train.learning_rate": {"low": 1e-4, "high": 1e-3}}}})
    with pytest.raises(ConfigError, match="train.learning_rate: not a recipe key"):
        run_sweep(recipe, tmp_path, trials=1, show_progress=False)
