"""What the frozen-layer cache (`train.cache_frozen`) saves on a multi-epoch classify run.

    python bench/classify_cache.py [--examples 800] [--epochs 3] [--top-layers 10]

Trains the quickstart recipe (SmolLM2-135M-Instruct, Amazon fine-food reviews) twice, each in its own
process, on the first `--examples` training reviews for `--epochs` epochs with adapters on the top
`--top-layers` of 30 blocks: once with the cache (epoch 1 runs the whole model and keeps what the frozen
blocks hand upwards; later epochs run the top blocks only) and once without. It prints both training
times, the speed-up, and the per-step losses' largest difference: the cache must not change the result
(bf16 kernels may round differently in a differently shaped graph, so 1e-2 is allowed). Last line:
`RESULT {"speedup": ..., "cached_s": ..., "uncached_s": ..., "max_loss_diff": ...}`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train(workspace: Path, cached: bool, args) -> tuple[dict, list[float]]:
    cmd = [sys.executable, "-m", "tuneloop.cli", "train", str(ROOT / "recipes" / "quickstart-reviews.yaml"),
           "--workspace", str(workspace), "--no-progress",
           "--set", f"data.max_train_examples={args.examples}", "--set", f"train.epochs={args.epochs}",
           "--set", f"method.top_layers={args.top_layers}", "--set", f"train.cache_frozen={str(cached).lower()}"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    [run] = list((workspace / "runs").iterdir())
    history = json.loads((run / "history.json").read_text())
    return json.loads((run / "train_metrics.json").read_text()), [h["loss"] for h in history]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=800)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--top-layers", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        on, losses_on = train(Path(tmp) / "on", True, args)
        off, losses_off = train(Path(tmp) / "off", False, args)
    if on.get("frozen_cache_bytes") is None:
        sys.exit("the cached run did not use the cache (see its log)")
    diff = max(abs(a - b) for a, b in zip(losses_on, losses_off))
    speedup = off["train_seconds"] / on["train_seconds"]
    print(f"{args.examples} reviews x {args.epochs} epochs, adapters on the top {args.top_layers} of 30 blocks")
    print(f"  without cache: {off['train_seconds']:.1f} s")
    print(f"  with cache:    {on['train_seconds']:.1f} s ({on['frozen_cache_bytes'] / 2**20:.0f} MiB kept)")
    print(f"  speed-up {speedup:.2f}x · largest per-step loss difference {diff:.2g}")
    if diff > 1e-2:
        sys.exit(f"the cache changed the losses by {diff:.3g}")
    print("RESULT " + json.dumps({"speedup": round(speedup, 3), "cached_s": on["train_seconds"],
                                  "uncached_s": off["train_seconds"], "max_loss_diff": diff}))


if __name__ == "__main__":
    main()
