"""Table rows → `Record(text, value)` for regression: a template renders each row as text, and an optional
time column orders the rows and supplies lagged targets (`<value_field>_lag<N>`).
"""

from __future__ import annotations

import math
from datetime import date, datetime

from ..errors import DataError
from .chat import resolve_data_path
from .formats import read_rows
from .records import Record


def _number(v, where: str, field: str) -> float:
    if isinstance(v, bool):
        return float(v)
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {field}: expected a number, got {v!r}") from None
    if math.isnan(x) or math.isinf(x):
        raise DataError(f"{where}: {field}: expected a finite number, got {v!r}")
    return x


def _when(v, where: str, field: str):
    if isinstance(v, (date, datetime)):
        return v
    try:
        return datetime.fromisoformat(str(v))
    except ValueError:
        raise DataError(f"{where}: {field}: expected an ISO date, got {v!r}") from None


class _Row(dict):
    """Format mapping that adds `weekday` / `month` from the time column and names a missing column."""

    def __init__(self, row, where):
        super().__init__(row)
        self.where = where

    def __missing__(self, key):
        raise DataError(f"{self.where}: template: no column {key!r} (columns: {', '.join(sorted(self))})")


def load_table(spec: str, value_field: str, template: str | None, text_field: str = "text",
               time_field: str | None = None, lags: list[int] = (), fmt: str = "auto") -> list[Record]:
    """Records with `.text` (rendered row), `.value` (target) and `.meta['time']` when a time column is set."""
    if lags and not time_field:
        raise DataError(f"{spec}: data.lags needs data.time_field (lags are only defined in time order)")
    path = resolve_data_path(spec)
    rows = []
    for line, row in read_rows(path, fmt):
        where = f"{spec}:{line}"
        if value_field not in row:
            raise DataError(f"{where}: {value_field}: missing (columns: {', '.join(sorted(row))})")
        y = _number(row[value_field], where, value_field)
        if time_field and time_field not in row:
            raise DataError(f"{where}: {time_field}: missing (columns: {', '.join(sorted(row))})")
        when = _when(row[time_field], where, time_field) if time_field else None
        rows.append((line, row, y, when, where))
    if not rows:
        raise DataError(f"{spec}: no records")
    if time_field:
        rows.sort(key=lambda t: t[3])
    records = []
    for i, (line, row, y, when, where) in enumerate(rows):
        row = dict(row)
        if when is not None:
            row["weekday"] = when.strftime("%A")
            row["month"] = when.strftime("%B")
        if any(i - n < 0 for n in lags):
            continue  # no history yet: a lag would have to be invented
        for n in lags:
            row[f"{value_field}_lag{n}"] = rows[i - n][2]
        if template:
            text = template.format_map(_Row(row, where))
        else:
            if text_field not in row:
                raise DataError(f"{where}: {text_field}: missing; set data.template to render table rows")
            text = str(row[text_field])
        meta = {"time": when.isoformat()[:10] if when is not None else None}
        meta.update({f"lag{n}": row[f"{value_field}_lag{n}"] for n in lags})
        records.append(Record(text=text, value=y, source=where, meta=meta))
    return records
