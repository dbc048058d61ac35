"""Cleaning throughput: 100,000 short synthetic reviews (with exact duplicates, near duplicates, PII and
messy whitespace) through `tuneloop data clean` as a user runs it: read, normalise, PII flag, token
lengths in the bundled model's tokenizer, exact + MinHash near-dedup, conflicting labels, atomic write.

    PYTHONPATH=src python bench/clean_throughput.py [--n 100000] [--keep DIR]

Prints the wall time of the whole command and of each stage's share; the target is under 60 s."""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("good great tasty fresh stale bland sweet salty crunchy soft coffee tea chocolate cookies chips "
         "sauce price value box shipping arrived quickly slowly broken perfect again never always my kids "
         "love hate this product would buy recommend flavor smell texture bag jar").split()


PLANTED = {"exact": 0, "near": 0}


def synth(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows: list[dict] = []
    for i in range(n):
        r = rng.random()
        if rows and r < 0.05:  # exact duplicate
            rows.append(dict(rng.choice(rows)))
            PLANTED["exact"] += 1
            continue
        if rows and r < 0.10:  # near duplicate: one word changed, spacing messed up
            PLANTED["near"] += 1
            base = rng.choice(rows)
            words = base["text"].split()
            words[rng.randrange(len(words))] = rng.choice(WORDS)
            rows.append({"text": "  ".join(words), "label": base["label"]})
            continue
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30)))
        if r < 0.11:
            text += f" contact me at user{i}@example.com"
        rows.append({"text": text + f" #{i}", "label": rng.choice(("great", "other"))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--keep", type=Path, default=None, help="write the data and outputs here")
    args = ap.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="tuneloop-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "reviews.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in synth(args.n)))
    cmd = [sys.executable, "-m", "tuneloop.cli", "data", "clean", str(src), "-o", str(folder / "clean.jsonl"),
           "--max-tokens", "512", "--min-tokens", "3", "--near-threshold", "0.85", "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    print(proc.stdout.strip())
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        sys.exit(proc.returncode)
    kept = sum(1 for _ in open(folder / "clean.jsonl"))
    print(f"planted: {PLANTED['exact']} exact copies, {PLANTED['near']} one-word edits (8-30 words each; an "
          "edit of a short record can fall below the similarity threshold, by design of the threshold)")
    print(f"clean: {args.n} records → {kept} kept in {wall:.1f} s wall "
          f"({args.n / wall:,.0f} records/s; target < 60 s) {'PASS' if wall < 60 else 'FAIL'}")
    if args.keep is None:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
