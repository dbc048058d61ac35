"""Progress for the long stages: a rich bar with ETA on a terminal (hidden with show=False, e.g. in tests),
and, where no live bar is drawn (a log file, CI, `nohup`, `--no-progress`), `ProgressLines`: a plain line
every `LINE_EVERY` seconds with what runs, done/total, the rate and the ETA, so a log is never silent."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

LINE_EVERY = 5.0  # seconds between progress lines


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class ProgressLines:
    """`advance(n)` counts work done and prints a line when `every` seconds passed since the last one (a
    closing line too, once any was printed); a stage shorter than `every` prints nothing."""

    def __init__(self, description: str, total: int, unit: str = "records", every: float | None = None,
                 print_fn: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic):
        if print_fn is None:
            from rich.console import Console

            console = Console(stderr=True)
            print_fn = lambda line: console.print(line, highlight=False, soft_wrap=True)  # noqa: E731
        self.description, self.total, self.unit = description, total, unit
        self.every = LINE_EVERY if every is None else every
        self.print, self.clock = print_fn, clock
        self.done, self.printed = 0, False
        self.start = self.last = clock()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        finished = self.done >= self.total
        if now - self.last < self.every and not (finished and self.printed):
            return
        self.last, self.printed = now, True
        elapsed = max(1e-9, now - self.start)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        self.print(f"{self.description}: {self.done}/{self.total} {self.unit} · {rate:,.1f}/s · "
                   f"elapsed {_minutes(elapsed)} · " + ("done" if finished else f"ETA {_minutes(eta)}"))


@contextmanager
def progress(description: str, total: int, show: bool = True) -> Iterator[Callable[[int], None]]:
    from rich.console import Console

    console = Console(stderr=True)
    if not show or not console.is_terminal:
        lines = ProgressLines(description, total)
        yield lines.advance
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False) as p:
        task = p.add_task(description, total=total)
        yield lambda n=1: p.advance(task, n)
