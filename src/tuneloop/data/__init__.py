"""The data layer: read files in common shapes into canonical records, naming every bad record."""

from .formats import read_rows
from .records import Record
from .validate import load_classification

__all__ = ["Record", "read_rows", "load_classification"]
