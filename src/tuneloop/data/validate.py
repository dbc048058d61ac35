"""Turn rows into validated classification records; every problem names file, line and field."""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass

from ..errors import DataError
from .formats import read_rows
from .records import Record

MAX_PROBLEMS_SHOWN = 20


@dataclass
class Loaded:
    records: list[Record]
    labels: list[str]
    fingerprint: str  # sha256 over the records' content, for lineage


def _label_str(v, where: str, field: str) -> str:
    if isinstance(v, bool) or isinstance(v, (list, dict)) or v is None:
        raise ValueError(f"{where}: {field}: expected a string or integer label, got {type(v).__name__}")
    if isinstance(v, float):
        if math.isnan(v):
            raise ValueError(f"{where}: {field}: empty")
        if v.is_integer():
            v = int(v)
    s = str(v).strip()
    if not s:
        raise ValueError(f"{where}: {field}: empty")
    return s


def fingerprint(records: list[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.text, r.label, r.value], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def load_classification(
    path: str,
    text_field: str,
    label_field: str,
    labels: list[str] | None = None,
    fmt: str = "auto",
    encoding: str = "utf-8",
) -> Loaded:
    """Read `path` and return text+label records. Raises DataError listing every bad record."""
    records: list[Record] = []
    problems: list[str] = []
    checked_columns = False
    for line, row in read_rows(path, fmt, encoding):
        where = f"{path}:{line}"
        if not checked_columns:
            for f in (text_field, label_field):
                if f not in row:
                    raise DataError(f"{where}: {f}: no such column/key (found: {', '.join(map(str, row))})")
            checked_columns = True
        text = row.get(text_field)
        if text is None or (isinstance(text, float) and math.isnan(text)):
            problems.append(f"{where}: {text_field}: missing")
            continue
        if not isinstance(text, str):
            problems.append(f"{where}: {text_field}: expected text, got {type(text).__name__}")
            continue
        if not text.strip():
            problems.append(f"{where}: {text_field}: empty")
            continue
        try:
            label = _label_str(row.get(label_field), where, label_field)
        except ValueError as e:
            problems.append(str(e))
            continue
        if labels is not None and label not in labels:
            problems.append(f"{where}: {label_field}: unknown label {label!r} (allowed: {', '.join(labels)})")
            continue
        records.append(Record(text=text, label=label, source=where))
    if not checked_columns and not problems:
        raise DataError(f"{path}: no records (empty file)")
    if problems:
        shown = problems[:MAX_PROBLEMS_SHOWN]
        more = len(problems) - len(shown)
        tail = f"\n... and {more} more" if more else ""
        raise DataError("\n".join(shown) + tail)
    found = sorted({r.label for r in records})
    if labels is None:
        labels = found
    if len(set(found)) < 2:
        raise DataError(f"{path}: {label_field}: only one distinct label ({', '.join(found)}); need at least two")
    return Loaded(records=records, labels=list(labels), fingerprint=fingerprint(records))


def stratified_sample(records: list[Record], n: int, seed: int) -> list[Record]:
    """At most n records with the label proportions kept; deterministic for a seed."""
    if n >= len(records):
        return list(records)
    by_label: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_label[r.label].append(r)
    rng = random.Random(seed)
    out: list[Record] = []
    counts = Counter(r.label for r in records)
    for label, group in sorted(by_label.items()):
        k = max(1, round(n * counts[label] / len(records)))
        out.extend(rng.sample(group, min(k, len(group))))
    rng.shuffle(out)
    return out[:n]
