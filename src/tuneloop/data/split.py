"""Deterministic train/val/test splits, stratified by label, with a leakage check.

Augmented records never reach val or test: each follows the record it was made from into train, and is
left out when that record went to val or test (otherwise a paraphrase of a test record would sit in train,
the very leak the check looks for). The leakage check then reports val/test records whose input is a
near-duplicate (MinHash) or exact copy of a training record's input."""

from __future__ import annotations

import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from .near import NearIndex, signatures
from .records import Record


@dataclass
class SplitResult:
    train: list[Record]
    val: list[Record]
    test: list[Record]
    leaks: list[dict[str, Any]] = field(default_factory=list)  # split, source, train_source, similarity
    dropped_augmented: list[str] = field(default_factory=list)  # sources of augmented records left out

    def summary(self) -> dict[str, Any]:
        def labels(rs):
            c = Counter(r.label for r in rs if r.label is not None)
            return dict(sorted(c.items())) if c else None

        return {
            "counts": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "labels": {"train": labels(self.train), "val": labels(self.val), "test": labels(self.test)},
            "augmented_in_train": sum(r.augmented_from is not None for r in self.train),
            "augmented_left_out": self.dropped_augmented,
            "leaks": self.leaks,
        }


def split_records(records: list[Record], test: float = 0.1, val: float = 0.1, seed: int = 0,
                  leak_threshold: float | None = 0.8, num_perm: int = 64) -> SplitResult:
    if test < 0 or val < 0 or test + val >= 1:
        raise ValueError(f"test ({test}) and val ({val}) must be ≥ 0 and leave records for training")
    originals = [r for r in records if r.augmented_from is None]
    augmented = [r for r in records if r.augmented_from is not None]
    # Stratify: each label (one group when there are none) is shuffled and cut on its own, so every split
    # keeps the label proportions. Groups are visited in sorted order: the result depends only on the seed.
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(originals):
        groups[r.label if r.label is not None else ""].append(i)
    rng = random.Random(seed)
    where: dict[int, str] = {}
    for label in sorted(groups):
        idx = groups[label]
        rng.shuffle(idx)
        n_test, n_val = round(len(idx) * test), round(len(idx) * val)
        for j, i in enumerate(idx):
            where[i] = "test" if j < n_test else "val" if j < n_test + n_val else "train"
    out: dict[str, list[Record]] = {"train": [], "val": [], "test": []}
    for i, r in enumerate(originals):  # file order inside each split: easy to diff, still deterministic
        out[where[i]].append(r)
    split_of_source = {_key(r.source): where[i] for i, r in enumerate(originals)}
    dropped = []
    for r in augmented:
        if split_of_source.get(_key(r.augmented_from or ""), "train") == "train":
            out["train"].append(r)
        else:
            dropped.append(r.source)
    res = SplitResult(out["train"], out["val"], out["test"], dropped_augmented=dropped)
    if leak_threshold is not None and res.train and (res.val or res.test):
        res.leaks = find_leaks(res.train, {"val": res.val, "test": res.test}, leak_threshold, num_perm)
    return res


def _key(source: str) -> tuple[str, str]:
    """`dir/file.jsonl:12` → (`file.jsonl`, `12`): an origin written as `file.jsonl:12` still matches the
    record read back from `./data/file.jsonl` line 12."""
    path, _, line = source.rpartition(":")
    return os.path.basename(path), line


def find_leaks(train: list[Record], others: dict[str, list[Record]], threshold: float,
               num_perm: int = 64) -> list[dict[str, Any]]:
    """Val/test records whose input nearly duplicates a training record's input.

    Regression rows rendered through one template read alike by construction; one counts as leaked only
    when a training row with a near-identical input also has the same target."""
    index = NearIndex(threshold, num_perm)
    exact: dict[str, int] = {}
    for i, (r, sig) in enumerate(zip(train, signatures((r.input_text() for r in train), num_perm))):
        index.add(i, sig)
        exact.setdefault(r.input_text().strip().lower(), i)
    leaks = []
    for name, recs in others.items():
        for r, sig in zip(recs, signatures((r.input_text() for r in recs), num_perm)):
            j = exact.get(r.input_text().strip().lower())
            hit = (j, 1.0) if j is not None else index.match(sig)
            if hit is not None and r.value is not None and train[hit[0]].value != r.value:
                hit = None
            if hit is not None:
                leaks.append({"split": name, "source": r.source, "train_source": train[hit[0]].source,
                              "similarity": round(hit[1], 3)})
    return leaks
