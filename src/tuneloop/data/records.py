"""The one canonical record type every recipe consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Record:
    """One training/evaluation example. Which fields are set depends on the task:
    classify → text + label; regress → text + value; sft → messages; preference → prompt/chosen/rejected.
    `source` is `file:line` so every later problem can point back to the input."""

    text: str | None = None
    label: str | None = None
    value: float | None = None
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
