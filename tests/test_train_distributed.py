"""Scale-out without new code: the same recipe under `torchrun --nproc_per_node 2` (gloo on CPU) gives the
same adapter as one process, for every task on the shared loop (a new task is a new row)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuneloop.config import load_recipe

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _sft_data(path: Path) -> None:
    with path.open("w") as f:
        for i in range(40):
            f.write(json.dumps({"instruction": f"Name {i}?", "input": "", "output": f"Item {i}. " * (1 + i % 3)}) + "\n")


def _classify_data(path: Path) -> None:
    words = {"good": ["great", "tasty", "lovely"], "bad": ["awful", "stale", "bland"]}
    with path.open("w") as f:
        for i in range(40):
            label = "good" if i % 2 else "bad"
            f.write(json.dumps({"text": f"the jam {i} was {words[label][i % 3]} " * (1 + i % 3),
                                "label": label}) + "\n")


# (task, its data, a free port for the rendezvous)
TASKS = {"sft": (_sft_data, 29533), "classify": (_classify_data, 29534)}


@pytest.mark.distributed
@pytest.mark.parametrize("task", sorted(TASKS))
def test_two_processes_match_one(tmp_path, tiny_llama_dir, task):
    from safetensors.torch import load_file

    from tuneloop.train import RECIPES

    make_data, port = TASKS[task]
    data = tmp_path / "data.jsonl"
    make_data(data)
    doc = {
        "name": "ddp", "task": task, "model": str(tiny_llama_dir),
        "data": {"train": str(data), "val_ratio": 0.2},
        # dropout 0: each process draws its own dropout masks, so only a dropout-free run can match exactly
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "precision": "fp32", "threads": 1,
                  "max_length": 64, "eval_every": 3, "seed": 1},
    }
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(doc))
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    ws = tmp_path / "ws"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(port), "-m", "tuneloop.cli", "train", str(recipe_file), "-w", str(ws),
                          "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    runs = list((ws / "runs").iterdir())
    assert len(runs) == 1, "both processes must train into one run folder"
    m2 = json.loads((runs[0] / "train_metrics.json").read_text())
    assert m2["processes"] == 2

    one = tmp_path / "one"
    one.mkdir()
    recipe = load_recipe(recipe_file)
    m1 = RECIPES[task](recipe, one, False)
    a, b = load_file(str(runs[0] / "model" / "adapter_model.safetensors")), load_file(
        str(one / "model" / "adapter_model.safetensors"))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, f"2-process adapter differs from 1-process by {worst}"
    assert m2["best_val_loss"] == pytest.approx(m1["best_val_loss"], rel=1e-4)
    assert m2["train_tokens"] == m1["train_tokens"]
    h1, h2 = (json.loads((d / "history.json").read_text())["train"] for d in (one, runs[0]))
    assert [h["loss"] for h in h2] == pytest.approx([h["loss"] for h in h1], rel=1e-4)
