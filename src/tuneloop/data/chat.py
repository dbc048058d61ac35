"""Chat / instruction records for SFT: alpaca, sharegpt, OpenAI `messages`, prompt/completion → `Record.messages`.

The shape is detected per row from its keys, so one file may mix shapes; a row that fits none is named by
file:line with the keys it has.
"""

from __future__ import annotations

import hashlib
import json
import random
from importlib import resources
from pathlib import Path

from ..errors import DataError, NotFoundError
from .formats import read_rows
from .records import Record

PACKAGE_PREFIX = "package:"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "model": "assistant"}


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


def _text(v, where: str, field: str) -> str:
    if not isinstance(v, str):
        raise DataError(f"{where}: {field}: expected a string, got {type(v).__name__}")
    return v


def row_to_messages(row: dict, where: str) -> list[dict[str, str]]:
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: messages: expected a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise DataError(f"{where}: messages[{i}].role: expected system, user or assistant")
            out.append({"role": m["role"], "content": _text(m.get("content"), where, f"messages[{i}].content")})
        return out
    if "conversations" in row:
        conv = row["conversations"]
        if not isinstance(conv, list) or not conv:
            raise DataError(f"{where}: conversations: expected a non-empty list")
        out = []
        for i, m in enumerate(conv):
            role = SHAREGPT_ROLES.get(m.get("from")) if isinstance(m, dict) else None
            if role is None:
                raise DataError(f"{where}: conversations[{i}].from: expected one of {', '.join(SHAREGPT_ROLES)}")
            out.append({"role": role, "content": _text(m.get("value"), where, f"conversations[{i}].value")})
        return out
    if "instruction" in row and "output" in row:
        prompt = _text(row["instruction"], where, "instruction")
        extra = row.get("input") or ""
        if extra:
            prompt = f"{prompt}\n\n{_text(extra, where, 'input')}"
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row["output"], where, "output")}]
        if row.get("system"):
            msgs.insert(0, {"role": "system", "content": _text(row["system"], where, "system")})
        return msgs
    if "prompt" in row and "completion" in row:
        return [{"role": "user", "content": _text(row["prompt"], where, "prompt")},
                {"role": "assistant", "content": _text(row["completion"], where, "completion")}]
    raise DataError(f"{where}: not a chat record: expected messages, conversations, instruction+output or "
                    f"prompt+completion (has: {', '.join(sorted(row)) or 'nothing'})")


def load_chat(spec: str, fmt: str = "auto") -> list[Record]:
    path = resolve_data_path(spec)
    records = []
    for line, row in read_rows(path, fmt):
        where = f"{spec}:{line}"
        msgs = row_to_messages(row, where)
        if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            raise DataError(f"{where}: no assistant answer to learn from")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer (got {msgs[-1]['role']})")
        records.append(Record(messages=msgs, source=where))
    if not records:
        raise DataError(f"{spec}: no records")
    return records


def record_key(r: Record) -> str:
    """Content hash: splits depend on what a record says, not on where it sits in the file."""
    payload = json.dumps([r.text, r.label, r.value, r.messages], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def fingerprint(records: list[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(record_key(r).encode())
    return h.hexdigest()


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


def write_records_jsonl(path, records: list[Record]) -> None:
    from ..fileio import write_text_atomic

    lines = []
    for r in records:
        d = {k: v for k, v in (("messages", r.messages), ("text", r.text), ("value", r.value),
                                ("label", r.label), ("source", r.source)) if v is not None}
        d.update({f"meta_{k}": v for k, v in r.meta.items()})
        lines.append(json.dumps(d, ensure_ascii=False))
    write_text_atomic(path, "\n".join(lines) + ("\n" if lines else ""))
