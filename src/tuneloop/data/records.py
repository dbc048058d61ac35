"""The one canonical record type every recipe consumes, its content fingerprint and its JSONL form."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Record:
    """One training/evaluation example. Which fields are set depends on the task:
    classify → text + label; regress → text + value; sft → messages; preference → prompt/chosen/rejected
    (+ `margin`: how much better chosen is, when the data says, e.g. a rating gap); kto (unpaired
    preference) → prompt + completion + label `desirable` | `undesirable`; plain documents → text alone.
    A preference or kto prompt is the user turn; a system turn before it is kept in `meta["system"]`.
    `source` is `file:line` so every later problem can point back to the input. `augmented_from` is the
    `source` of the record an augmented record was made from (None for original records)."""

    text: str | None = None
    label: str | None = None
    value: float | None = None
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    margin: float | None = None
    completion: str | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    augmented_from: str | None = None

    @property
    def kind(self) -> str:
        """classify | regress | chat | preference | kto | text"""
        if self.messages is not None:
            return "chat"
        if self.chosen is not None:
            return "preference"
        if self.completion is not None:
            return "kto"
        if self.label is not None:
            return "classify"
        if self.value is not None:
            return "regress"
        return "text"

    def input_text(self) -> str:
        """What the model is given: the text, the user/system turns, or the preference prompt. Leakage and
        label-conflict checks compare this side."""
        if self.messages is not None:
            return "\n".join(m["content"] for m in self.messages if m["role"] != "assistant")
        if self.chosen is not None or self.completion is not None:
            return self.prompt or ""
        return self.text or ""

    def all_text(self) -> str:
        """Every piece of text in the record (PII scans, lengths, near-duplicates)."""
        if self.messages is not None:
            return "\n".join(m["content"] for m in self.messages)
        if self.chosen is not None:
            return "\n".join(t for t in (self.prompt, self.chosen, self.rejected) if t)
        if self.completion is not None:
            return "\n".join(t for t in (self.prompt, self.completion) if t)
        return self.text or ""

    def to_json(self) -> dict[str, Any]:
        """The canonical JSONL form, readable back by `read_records` (meta keys ride along)."""
        k = self.kind
        if k == "chat":
            out: dict[str, Any] = {"messages": self.messages}
        elif k == "preference":
            out = {"chosen": self.chosen, "rejected": self.rejected}
            if self.prompt is not None:
                out = {"prompt": self.prompt, **out}
            if self.margin is not None:
                out["margin"] = self.margin
        elif k == "kto":
            out = {"prompt": self.prompt, "completion": self.completion, "label": self.label == "desirable"}
        elif k == "classify":
            out = {"text": self.text, "label": self.label}
        elif k == "regress":
            out = {"text": self.text, "value": self.value}
        else:
            out = {"text": self.text}
        for key, v in self.meta.items():
            out.setdefault(key, v)
        if self.augmented_from is not None:
            out["source"] = "augmented"
            out["origin"] = self.augmented_from
        return out


def record_key(r: Record) -> str:
    """Content hash of one record: what it says (text, label, value, turns; prompt and answers of a preference
    pair), never where it sits, its meta or its provenance. Splits seed on it, so a held-out set does not
    move when a file is reordered or re-exported; the payload is the one splits were first seeded on, with
    the preference fields added only for preference records (the margin only when there is one, so a
    pair's key did not move when margins came in) and the kto fields only for kto records (the label is
    in the payload already: the same answer marked desirable and undesirable are two records)."""
    payload: list[Any] = [r.text, r.label, r.value, r.messages]
    if r.kind == "preference":
        payload += [r.prompt, r.chosen, r.rejected, r.meta.get("system")]
        if r.margin is not None:
            payload.append(r.margin)
    elif r.kind == "kto":
        payload += [r.prompt, r.completion, r.meta.get("system")]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def fingerprint(records: list[Record]) -> str:
    """sha256 over the records' content keys in order: the same records in any format give the same value
    (`data check` shows it; a run's data.json keeps it for lineage)."""
    h = hashlib.sha256()
    for r in records:
        h.update(record_key(r).encode())
    return h.hexdigest()


def write_jsonl(path, records: list[Record]) -> None:
    """The canonical JSONL writer (clean, split, augment, a run's test.jsonl): one `to_json()` per line,
    written atomically; `read_records` reads it back into the same records."""
    from ..fileio import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(r.to_json(), ensure_ascii=False, default=str) + "\n" for r in records))
