"""Near-duplicate detection with MinHash + LSH (datasketch), shared by clean, report and split.

Signatures are over byte 5-grams of the lower-cased, whitespace-collapsed text: short reviews that differ
by one word still share most 5-grams, where word 3-grams would share few. crc32 (C, in zlib) hashes the
shingles: the default SHA-1 costs most of the time and buys nothing for this use."""

from __future__ import annotations

import re
import zlib
from typing import Hashable, Iterable, Iterator

import numpy as np
from datasketch import MinHash, MinHashLSH

_WS = re.compile(r"\s+")


def shingles(text: str, k: int = 5) -> set[bytes]:
    b = _WS.sub(" ", text.lower()).strip().encode("utf-8")
    if len(b) <= k:
        return {b}
    return {b[i:i + k] for i in range(len(b) - k + 1)}


def signatures(texts: Iterable[str], num_perm: int = 64, k: int = 5) -> Iterator[MinHash]:
    return MinHash.generator((shingles(t, k) for t in texts), num_perm=num_perm, hashfunc=zlib.crc32)


class NearIndex:
    """Keys with signatures; `match` returns the most similar indexed key at or above the threshold.

    LSH only proposes candidates; each is confirmed on the signatures' estimated Jaccard similarity so a
    banding false positive never drops a record."""

    def __init__(self, threshold: float, num_perm: int = 64):
        if not 0 < threshold <= 1:
            raise ValueError("threshold must be in (0, 1]")
        self.threshold = threshold
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.values: dict[Hashable, np.ndarray] = {}

    def add(self, key: Hashable, sig: MinHash) -> None:
        self.lsh.insert(key, sig, check_duplication=False)
        self.values[key] = sig.hashvalues

    def match(self, sig: MinHash) -> tuple[Hashable, float] | None:
        best = None
        for key in self.lsh.query(sig):
            sim = float(np.mean(self.values[key] == sig.hashvalues))
            if sim >= self.threshold and (best is None or sim > best[1]):
                best = (key, sim)
        return best


def near_duplicates(texts: list[str], threshold: float, num_perm: int = 64, progress=None) -> list[tuple[int, float] | None]:
    """For each text: (index of the earlier kept text it nearly duplicates, similarity) or None.

    Only kept texts are indexed, so a chain a≈b≈c is judged against the first of each cluster."""
    index = NearIndex(threshold, num_perm)
    out: list[tuple[int, float] | None] = []
    for i, sig in enumerate(signatures(texts, num_perm)):
        hit = index.match(sig)
        if hit is None:
            index.add(i, sig)
        out.append(hit)
        if progress is not None:
            progress(1)
    return out
