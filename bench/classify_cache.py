"""What the frozen-layer cache (`train.cache_frozen`) saves on a multi-epoch classify run.

    python bench/classify_cache.py [--examples 800] [--epochs 3] [--top-layers 10]

Trains the quickstart recipe (SmolLM2-135M-Instruct, Amazon fine-food reviews) twice, each in its own
process, on the first `--examples` training reviews for `--epochs` epochs with adapters on the top
`--top-layers` of 30 blocks: once with the cache (epoch 1 runs the whole model and keeps what the frozen
blocks hand upwards; later epochs run the top blocks only) and once without. It prints both training
times, the speed-up, and the mean training loss of the last epoch in both runs, which must agree within
3%. (Per step they are not bit-equal: bf16 training on 2 threads is not bit-reproducible here even
without the cache; two runs of the quickstart recipe part from step 3 on. The kept states themselves are
exact: a review's frozen-block output is the same whatever batch it is padded into, and the first replayed
batch is checked against a whole forward. In fp32 on a tiny model the losses are equal step by step:
tests/test_classify.py.) Last line:
`RESULT {"speedup": ..., "cached_s": ..., "uncached_s": ..., "last_epoch_loss": [cached, uncached]}`.
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
    history = json.loads((run / "history.json").read_text())["train"]
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
    per_epoch = len(losses_off) // args.epochs
    last_on = sum(losses_on[-per_epoch:]) / per_epoch
    last_off = sum(losses_off[-per_epoch:]) / per_epoch
    diff = abs(last_on - last_off) / last_off
    speedup = off["train_seconds"] / on["train_seconds"]
    print(f"{args.examples} reviews x {args.epochs} epochs, adapters on the top {args.top_layers} of 30 blocks")
    print(f"  without cache: {off['train_seconds']:.1f} s")
    print(f"  with cache:    {on['train_seconds']:.1f} s ({on['frozen_cache_bytes'] / 2**20:.0f} MiB kept)")
    print(f"  speed-up {speedup:.2f}x · last-epoch mean loss {last_on:.4f} with, {last_off:.4f} without "
          f"({diff:.1%} apart)")
    if diff > 0.03:
        sys.exit(f"the cache changed the last epoch's loss by {diff:.1%}")
    print("RESULT " + json.dumps({"speedup": round(speedup, 3), "cached_s": on["train_seconds"],
                                  "uncached_s": off["train_seconds"],
                                  "last_epoch_loss": [round(last_on, 4), round(last_off, 4)]}))


if __name__ == "__main__":
    main()
