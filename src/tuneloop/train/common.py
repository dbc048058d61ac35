"""Small helpers shared by the training recipes (devices, precision, seeding, batching)."""

from __future__ import annotations

import os
import random
from typing import Iterator

import numpy as np
import torch


def set_threads(threads: int | None) -> None:
    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def bf16_supported(dev: torch.device) -> bool:
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # oneDNN reports whether the CPU has native bf16 dot products (AVX512-BF16 or AMX).
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def pick_dtype(precision: str, dev: torch.device) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "bf16" or (precision == "auto" and bf16_supported(dev)):
        return torch.bfloat16
    return torch.float32


def length_bucketed_batches(
    lengths: list[int], batch_size: int, seed: int, shuffle: bool = True, bucket_factor: int = 50
) -> list[list[int]]:
    """Batches of similar length, so padding wastes little compute.

    Shuffle, sort within windows of `bucket_factor` batches, cut into batches, shuffle the batches:
    randomness for SGD is kept, padding nearly vanishes.
    """
    idx = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(idx)
    window = batch_size * bucket_factor
    batches: list[list[int]] = []
    for start in range(0, len(idx), window):
        chunk = sorted(idx[start : start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    if shuffle:
        rng.shuffle(batches)
    return batches


def sorted_batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Evaluation order: longest first (memory peaks early, ETA is honest), no shuffling."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


def pad_batch(seqs: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if left:
            ids[r, width - len(s):] = torch.tensor(s)
            mask[r, width - len(s):] = 1
        else:
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
    return ids, mask


def progress_columns():
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
