"""Table rows → `Record(text, value)` for regression: the regress recipe's view of the one reader
(`validate.read_records`). A Jinja template renders each row as text, and an optional time column orders the
rows and supplies lagged targets (`<value_field>_lag<N>`).
"""

from __future__ import annotations

from ..errors import DataError
from .records import Record
from .validate import ReadResult, read_records


def read_table(spec: str, value_field: str, template: str | None, text_field: str = "text",
               time_field: str | None = None, lags: list[int] = (), fmt: str = "auto",
               encoding: str = "utf-8", keep: tuple[str, ...] = ()) -> ReadResult:
    """The regress recipe's view of `spec`: text+value records, `.meta` holding `time` (ISO date, or None
    without a time column), `lag<N>` and the columns named in `keep` (the recipe's `eval.slices`)."""
    mapping = {"value": value_field}
    if template is None:
        mapping["text"] = text_field
    res = read_records(spec, fmt, encoding, mapping, "regress", template, time_field, lags)
    for r in res.records:
        r.meta = {"time": r.meta.get("time"), **{f"lag{n}": r.meta[f"{value_field}_lag{n}"] for n in lags},
                  **{k: r.meta.get(k) for k in keep}}
    return res


def load_table(spec: str, value_field: str, template: str | None, text_field: str = "text",
               time_field: str | None = None, lags: list[int] = (), fmt: str = "auto",
               keep: tuple[str, ...] = ()) -> list[Record]:
    """Records with `.text` (rendered row), `.value` (target) and `.meta['time']` when a time column is set."""
    res = read_table(spec, value_field, template, text_field, time_field, lags, fmt, keep=keep)
    res.raise_if_problems()
    if not res.records:
        raise DataError(f"{spec}: no records")
    return res.records
