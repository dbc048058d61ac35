"""The bundled SmolLM2-135M-Instruct through the sft and regress recipes (a few steps; `integration`)."""

from __future__ import annotations

import json

import pytest

from tuneloop.config import recipe_from_dict

pytestmark = pytest.mark.integration


def test_sft_on_bundled_model_few_steps(tmp_path, smol_dir):
    from tuneloop.eval.textgen import evaluate_sft
    from tuneloop.train.sft import train_sft

    data = tmp_path / "faq.jsonl"
    with data.open("w") as f:
        for i in range(12):
            f.write(json.dumps({"instruction": f"How long is permit case {i}?", "input": "",
                                "output": f"Case {i} takes {i + 4} weeks."}) + "\n")
    recipe = recipe_from_dict({
        "name": "smol-sft", "task": "sft", "model": "smollm2-135m-instruct",
        "data": {"train": str(data), "test_ratio": 0.2, "val_ratio": 0.2},
        "method": {"name": "lora", "r": 4, "alpha": 8, "top_layers": 2},
        "train": {"max_steps": 3, "batch_size": 1, "lr": 1e-3, "max_length": 256, "packing": True},
        # the forgetting check (about 50 s a system on this model) is tested on tiny models (test_eval_probes.py)
        "eval": {"max_new_tokens": 16, "batch_size": 4, "forgetting": False},
    })
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    m = train_sft(recipe, run_dir, show_progress=False)
    assert m["steps"] == 3 and m["best_val_loss"] < 10
    report = evaluate_sft(run_dir, show_progress=False)
    assert set(report["systems"]) == {"base", "tuned"}
    assert all(v["perplexity"] > 1 for v in report["systems"].values())
