"""Exact resume, for every task on the shared loop: a run killed with SIGKILL mid-way and resumed ends
with the same adapter as a run that was never interrupted (same seed, fp32, tiny model), within 1e-6."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tuneloop.config import load_recipe

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _sft_data(path: Path) -> dict:
    with path.open("w") as f:
        for i in range(64):
            f.write(json.dumps({"instruction": f"What is {i} times two?", "input": "",
                                "output": f"{i} times two is {2 * i}. " * (1 + i % 2)}) + "\n")
    return {"train": str(path), "val_ratio": 0.15}


def _classify_data(path: Path) -> dict:
    words = {"good": ["great", "tasty", "lovely"], "bad": ["awful", "stale", "bland"]}
    with path.open("w") as f:
        for i in range(64):
            label = "good" if i % 2 else "bad"
            f.write(json.dumps({"text": f"the soup number {i} was {words[label][i % 3]}", "label": label}) + "\n")
    return {"train": str(path), "val_ratio": 0.15}


def _pairs_data(path: Path) -> dict:
    with path.open("w") as f:
        for i in range(64):
            f.write(json.dumps({"prompt": f"What is {i} times two?", "chosen": f"{i} times two is {2 * i}.",
                                "rejected": f"{i} times two is {2 * i + 3}, I think." * (1 + i % 2),
                                "margin": float(i % 3)}) + "\n")
    return {"train": str(path), "val_ratio": 0.15}


def _kto_data(path: Path) -> dict:
    with path.open("w") as f:
        for i in range(64):
            f.write(json.dumps({"prompt": f"What is {i} times two?", "completion": f"{i} times two is {2 * i + i % 3}.",
                                "label": i % 3 == 0}) + "\n")
    return {"train": str(path), "val_ratio": 0.15}


# A new task is a new row: (task, its data, what its `method` adds). The classify row adapts the top
# block only, so the frozen-layer cache is on too: after resume it fills again, and nothing changes.
TASKS = {
    "sft": (_sft_data, {}),
    "classify": (_classify_data, {"top_layers": 1}),
    "dpo": (_pairs_data, {}),
    "kto": (_kto_data, {}),
    "reward": (_pairs_data, {}),
}


@pytest.fixture(params=sorted(TASKS))
def recipe_file(request, tmp_path, tiny_llama_dir) -> Path:
    task = request.param
    make_data, method = TASKS[task]
    doc = {
        "name": "resume", "task": task, "model": str(tiny_llama_dir),
        "data": make_data(tmp_path / "data.jsonl"),
        # dropout > 0 so that a wrong RNG state after resume would show
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1, **method},
        "train": {"max_steps": 40, "batch_size": 4, "lr": 5e-3, "precision": "fp32", "threads": 1,
                  "max_length": 64, "eval_every": 10, "checkpoint_every": 5, "seed": 3},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.slow  # two training subprocesses, one killed mid-run
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, recipe_file):
    from tuneloop.train import RECIPES

    ws = tmp_path / "ws"
    cmd = [sys.executable, "-m", "tuneloop.cli", "train", str(recipe_file), "-w", str(ws), "--no-progress"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpt = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        found = list(ws.glob("runs/*/checkpoints/last/state.pt"))
        if found:
            ckpt = found[0]
            break
        time.sleep(0.01)
    assert ckpt is not None, f"no checkpoint appeared; output: {proc.communicate()[0].decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run_dir = ckpt.parents[2]
    assert not (run_dir / "train_metrics.json").exists(), "the run finished before it could be killed"
    assert not (run_dir / "model").exists()

    res = subprocess.run([sys.executable, "-m", "tuneloop.cli", "train", "--resume", str(run_dir), "-w", str(ws),
                          "--no-progress"], env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed at step" in res.stderr
    resumed = json.loads((run_dir / "train_metrics.json").read_text())
    assert resumed["steps"] == 40

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    recipe = load_recipe(recipe_file)
    ref = RECIPES[recipe.task](recipe, ref_dir, False)
    if recipe.task == "classify":  # the row's point: the frozen-layer cache was on in both runs
        assert ref["frozen_cache_bytes"] and resumed["frozen_cache_bytes"]
    a, b = _tensors(run_dir / "model"), _tensors(ref_dir / "model")
    assert a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"resumed adapter differs from the uninterrupted one by {worst}"
    assert resumed["best_val_loss"] == pytest.approx(ref["best_val_loss"], abs=1e-6)
    hist = json.loads((run_dir / "history.json").read_text())["train"]
    assert [h["step"] for h in hist] == list(range(1, 41))

    # a finished run cannot be resumed again
    from tuneloop.errors import ConfigError
    from tuneloop.train import resume_run

    with pytest.raises(ConfigError, match="already finished"):
        resume_run(run_dir, ws)
