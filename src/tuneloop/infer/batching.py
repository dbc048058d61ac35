"""Batches for inference: longest first, padded, with a progress bar that shows an ETA."""

from __future__ import annotations

from typing import Iterator

import torch


def sorted_batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Evaluation order: longest first (memory peaks early, ETA is honest), no shuffling."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


def pad_batch(seqs: list[list[int]], pad_id: int, left: bool = False, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) padded to the longest of `seqs` plus `extra` more padding columns (the frozen-layer
    cache's check runs the same rows in another batch shape)."""
    width = max(len(s) for s in seqs) + extra
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


def progress_lines(console, show_progress: bool, description: str, total: int):
    """Where no live bar is drawn (`show_progress` off, or the console is not a terminal: a log file, CI),
    a `ProgressLines` that prints a line every few seconds; None where the bar is drawn."""
    from ..data.progress import ProgressLines

    if show_progress and console.is_terminal:
        return None
    return ProgressLines(description, total, print_fn=lambda line: console.print(line, highlight=False,
                                                                                 soft_wrap=True))
