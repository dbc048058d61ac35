"""Exact resume: a run killed with SIGKILL mid-way and resumed ends with the same adapter as a run that
was never interrupted (same seed, fp32, tiny model), within 1e-6."""

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


@pytest.fixture()
def recipe_file(tmp_path, tiny_llama_dir) -> Path:
    data = tmp_path / "chat.jsonl"
    with data.open("w") as f:
        for i in range(64):
            f.write(json.dumps({"instruction": f"What is {i} times two?", "input": "",
                                "output": f"{i} times two is {2 * i}. " * (1 + i % 2)}) + "\n")
    doc = {
        "name": "resume", "task": "sft", "model": str(tiny_llama_dir),
        "data": {"train": str(data), "val_ratio": 0.15},
        # dropout > 0 so that a wrong RNG state after resume would show
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
        "train": {"max_steps": 40, "batch_size": 4, "lr": 5e-3, "precision": "fp32", "threads": 1,
                  "max_length": 64, "eval_every": 10, "checkpoint_every": 5, "seed": 3},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.slow  # two training subprocesses, one killed mid-run
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, recipe_file):
    from tuneloop.train.sft import train_sft

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
    ref = train_sft(load_recipe(recipe_file), ref_dir, show_progress=False)
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
