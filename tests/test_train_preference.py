"""Preference training (dpo, kto, reward) on a tiny Llama built from a config: DPO starts at log 2 (the
reference is the policy with its fresh adapter off) and its loss falls; KTO starts at 1/2 and falls; a
reward model ranks held-out chosen answers above rejected ones; every loss equals TRL's on the same model
and tokens; and a run started from an sft run merges that run's adapter first."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from tuneloop.config import recipe_from_dict
from tuneloop.errors import ConfigError
from tuneloop.runs import HISTORY, load_for_inference, open_run
from tuneloop.train import train_run

FAST = {"batch_size": 8, "lr": 2e-2, "precision": "fp32", "threads": 1, "max_length": 96, "warmup_ratio": 0.0}
LORA = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
COLOURS = ["red", "blue", "green", "black", "white", "pink", "grey", "gold"]


def pairs(n: int, seed: int = 0) -> list[dict]:
    """Questions whose chosen answer is polite and right, the rejected one rude: separable by a word."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        c = rng.choice(COLOURS)
        out.append({"prompt": f"What colour is box {i}?", "chosen": f"Box {i} is {c}, thank you.",
                    "rejected": f"No idea, go away {c}.", "margin": float(i % 3)})
    return out


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def recipe(task: str, data: dict, model, **train) -> object:
    return recipe_from_dict({"name": f"pref-{task}", "task": task, "model": str(model), "data": data,
                             "method": LORA, "train": {**FAST, **train}})


def test_dpo_starts_at_log2_and_its_loss_falls(tmp_path, tiny_llama_dir):
    data = {"train": write(tmp_path / "p.jsonl", pairs(40)), "val_ratio": 0.2, "test_ratio": 0.1}
    run_dir, m = train_run(recipe("dpo", data, tiny_llama_dir, max_steps=12), tmp_path / "ws", show_progress=False)
    hist = json.loads((run_dir / HISTORY).read_text())["train"]
    assert hist[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert sum(h["loss"] for h in hist[-3:]) / 3 < 0.8 * math.log(2), [h["loss"] for h in hist]
    assert m["val_reward_accuracy"] >= 0.8
    run = open_run(run_dir)
    assert run.info.task == "dpo" and run.info.parent_run is None and run.info.merged_adapters == []
    assert len((run_dir / "test.jsonl").read_text().splitlines()) == 4
    # the run loads for inference and its implicit reward prefers the held-out chosen answers
    from tuneloop.data.validate import read_records
    from tuneloop.infer.preference import sequence_logps

    loaded = load_for_inference(run)
    test = read_records(str(run_dir / "test.jsonl")).records
    prompts = [r.prompt for r in test]
    pc, nc = sequence_logps(loaded.model, loaded.tokenizer, prompts, [r.chosen for r in test], 4)
    pr, _ = sequence_logps(loaded.model, loaded.tokenizer, prompts, [r.rejected for r in test], 4)
    with loaded.model.disable_adapter():
        rc, _ = sequence_logps(loaded.model, loaded.tokenizer, prompts, [r.chosen for r in test], 4)
        rr, _ = sequence_logps(loaded.model, loaded.tokenizer, prompts, [r.rejected for r in test], 4)
    assert all(n > 3 for n in nc)
    assert sum((a - b) > (c - d) for a, b, c, d in zip(pc, rc, pr, rr)) >= 3


@pytest.mark.parametrize("loss_type", ["ipo", "hinge", "robust"])
def test_dpo_variants_train(tmp_path, tiny_llama_dir, loss_type):
    data = {"train": write(tmp_path / "p.jsonl", pairs(24)), "val_ratio": 0.0}
    extra = {"label_smoothing": 0.1} if loss_type == "robust" else {}
    _, m = train_run(recipe("dpo", data, tiny_llama_dir, max_steps=6, loss_type=loss_type, **extra), tmp_path / "ws",
                     show_progress=False)
    assert m["final_loss"] < m["first_loss"]


def test_kto_starts_at_one_half_and_falls_on_thumbs(tmp_path, tiny_llama_dir):
    rows = []
    for p in pairs(40):
        rows.append({"prompt": p["prompt"], "completion": p["chosen"], "label": True})
        rows.append({"prompt": p["prompt"], "completion": p["rejected"], "label": "undesirable"})
    data = {"train": write(tmp_path / "k.jsonl", rows), "val_ratio": 0.2}
    run_dir, m = train_run(recipe("kto", data, tiny_llama_dir, max_steps=12, beta=0.5), tmp_path / "ws",
                           show_progress=False)
    assert m["first_loss"] == pytest.approx(0.5, abs=1e-6)
    # validation batches mix both kinds; a length-bucketed training batch can hold one kind only (here the
    # rude answers are the short ones), and then z cancels r and its loss stays near 1/2
    assert m["best_val_loss"] < 0.35 and m["val_reward_accuracy"] >= 0.7
    assert open_run(run_dir).info.task == "kto"


def test_reward_model_ranks_chosen_above_rejected(tmp_path, tiny_llama_dir):
    data = {"train": write(tmp_path / "p.jsonl", pairs(48)), "val_ratio": 0.0, "test_ratio": 0.25}
    run_dir, m = train_run(recipe("reward", data, tiny_llama_dir, max_steps=15), tmp_path / "ws", show_progress=False)
    assert m["final_loss"] < m["first_loss"]
    from tuneloop.data.validate import read_records
    from tuneloop.infer.preference import reward_scores

    loaded = load_for_inference(run_dir)
    test = read_records(str(run_dir / "test.jsonl")).records
    prompts = [r.prompt for r in test]
    good = reward_scores(loaded.model, loaded.tokenizer, prompts, [r.chosen for r in test], 8)
    bad = reward_scores(loaded.model, loaded.tokenizer, prompts, [r.rejected for r in test], 8)
    assert len(test) == 12 and sum(g > b for g, b in zip(good, bad)) >= 11


def test_dpo_from_an_sft_run_merges_its_adapter_and_refuses_full(tmp_path, tiny_llama_dir):
    sft = tmp_path / "sft.jsonl"
    write(sft, [{"instruction": p["prompt"], "input": "", "output": p["chosen"]} for p in pairs(16)])
    ws = tmp_path / "ws"
    sft_dir, _ = train_run(recipe_from_dict({"name": "sft", "task": "sft", "model": str(tiny_llama_dir),
                                             "data": {"train": str(sft), "val_ratio": 0.0}, "method": LORA,
                                             "train": {**FAST, "max_steps": 3}}), ws, show_progress=False)
    data = {"train": write(tmp_path / "p.jsonl", pairs(16)), "val_ratio": 0.0}
    run_dir, m = train_run(recipe("dpo", data, sft_dir.name, max_steps=2), ws, show_progress=False)
    info = open_run(run_dir).info
    assert info.parent_run == str(sft_dir) and info.merged_adapters == [str(sft_dir / "model")]
    assert info.model_path == str(tiny_llama_dir)
    # at step 0 the reference is the sft model, so the loss is log 2 again
    assert m["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    # loading it puts the sft adapter into the base first: with the dpo adapter off, it is the sft model
    from tuneloop.infer.preference import sequence_logps

    dpo = load_for_inference(run_dir)
    sft_model = load_for_inference(sft_dir)
    args = (["What colour is box 1?"], ["Box 1 is red, thank you."], 1)
    with dpo.model.disable_adapter():
        a, _ = sequence_logps(dpo.model, dpo.tokenizer, *args)
    b, _ = sequence_logps(sft_model.model, sft_model.tokenizer, *args)
    assert a[0] == pytest.approx(b[0], abs=1e-4)
    with pytest.raises(ConfigError, match="dpo needs an adapter method"):
        train_run(recipe_from_dict({"name": "f", "task": "dpo", "model": str(tiny_llama_dir), "data": data,
                                    "method": {"name": "full"}, "train": FAST}), ws, show_progress=False)
    with pytest.raises(ConfigError, match="train.loss_type: not used by task kto"):
        recipe("kto", data, tiny_llama_dir, loss_type="ipo")
