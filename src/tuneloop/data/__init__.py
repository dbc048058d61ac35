"""The data layer: read files in common shapes into canonical records, naming every bad record; clean,
report, split and augment them (one module each)."""

from .formats import iter_rows, read_rows
from .records import Record
from .validate import SHAPES, ReadResult, load_classification, read_records

__all__ = ["Record", "ReadResult", "SHAPES", "iter_rows", "read_rows", "read_records", "load_classification"]
