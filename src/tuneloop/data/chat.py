"""Chat / instruction records for SFT: the sft recipe's view of the one reader (`validate.read_records`), which
turns alpaca, sharegpt, OpenAI `messages` and prompt/completion rows into `Record.messages`.

One shape per file, as `data check` decides it; a row that fits none is named by file:line with the keys it has.
"""

from __future__ import annotations

import random

from ..errors import DataError
from .records import Record, record_key
from .validate import SHAPES, ReadResult, read_records

CHAT_SHAPES = ("openai", "sharegpt", "alpaca", "prompt_completion")


def read_chat(spec: str, fmt: str = "auto", encoding: str = "utf-8") -> ReadResult:
    """The sft recipe's view of `spec`: its records when the file holds conversations; a file of another
    shape is one clear error naming the shapes sft reads."""
    res = read_records(spec, fmt, encoding)
    if res.shape is not None and res.shape not in CHAT_SHAPES:
        known = ", ".join(f"{n} ({'+'.join(SHAPES[n].keys)})" for n in CHAT_SHAPES)
        raise DataError(f"{spec}: sft reads conversations ({known}); this file is {res.shape} "
                        f"({'+'.join(SHAPES[res.shape].keys)})")
    return res


def load_chat(spec: str, fmt: str = "auto") -> list[Record]:
    res = read_chat(spec, fmt)
    res.raise_if_problems()
    if not res.records:
        raise DataError(f"{spec}: no records")
    return res.records


def holdout(records: list[Record], ratio: float, seed: int, ordered: bool = False) -> tuple[list[Record], list[Record]]:
    """(kept, held_out): a seeded random fraction, or the last fraction when the order is time."""
    if ratio <= 0 or len(records) < 2:
        return list(records), []
    n_out = max(1, round(len(records) * ratio))
    if ordered:
        return list(records[:-n_out]), list(records[-n_out:])
    idx = sorted(range(len(records)), key=lambda i: record_key(records[i]))
    random.Random(seed).shuffle(idx)
    out = set(idx[:n_out])
    return [r for i, r in enumerate(records) if i not in out], [r for i, r in enumerate(records) if i in out]
