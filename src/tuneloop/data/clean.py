"""Cleaning: normalise text, scrub or flag PII, drop empty / too short / too long records, exact and near
duplicates, and texts that carry conflicting labels. Every record dropped or changed gets a log entry
saying why, so a cleaning run can be audited and undone by hand."""

from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import NotFoundError
from .near import near_duplicates
from .pii import count_pii, scrub
from .progress import progress
from .records import Record

PII_MODES = ("off", "flag", "scrub", "drop")
CONFLICT_MODES = ("drop", "keep")

# C0/C1 control characters (except tab and newline) and zero-width characters: invisible, they split
# tokens and defeat duplicate detection.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
_AROUND_NEWLINE = re.compile(r" ?\n ?")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(s: str) -> tuple[str, list[str]]:
    """NFC, no control characters, one space between words, at most one blank line; returns what changed."""
    what = []
    t = unicodedata.normalize("NFC", s)
    if t != s:
        what.append("unicode NFC")
    u = _CONTROL.sub("", t.replace("\r\n", "\n").replace("\r", "\n"))
    if u != t.replace("\r\n", "\n").replace("\r", "\n"):
        what.append("control characters")
    v = _BLANK_LINES.sub("\n\n", _AROUND_NEWLINE.sub("\n", _SPACES.sub(" ", u))).strip()
    if v != u and "whitespace" not in what:
        what.append("whitespace")
    if "\r" in s and "whitespace" not in what:
        what.append("whitespace")
    return v, what


def map_text(r: Record, fn: Callable[[str], str]) -> Record:
    """A copy of `r` with `fn` applied to every piece of text (not labels)."""
    changes: dict[str, Any] = {}
    for name in ("text", "prompt", "chosen", "rejected"):
        v = getattr(r, name)
        if v is not None:
            changes[name] = fn(v)
    if r.messages is not None:
        changes["messages"] = [{"role": m["role"], "content": fn(m["content"])} for m in r.messages]
    return dataclasses.replace(r, **changes)


def _empty_part(r: Record) -> str | None:
    for name in ("text", "prompt", "chosen", "rejected"):
        v = getattr(r, name)
        if v is not None and not v.strip():
            return name
    for i, m in enumerate(r.messages or []):
        if not m["content"].strip():
            return f"messages[{i}].content"
    return None


def _content_key(r: Record) -> str:
    d = r.to_json()
    for k in list(r.meta):
        d.pop(k, None)
    d.pop("source", None)
    d.pop("origin", None)
    return json.dumps(d, ensure_ascii=False, sort_keys=True)


def conflict_key(r: Record) -> str:
    return re.sub(r"\s+", " ", r.input_text().lower()).strip()


@dataclass
class CleanResult:
    records: list[Record]
    log: list[dict[str, Any]]  # one entry per record dropped or changed: source, action, reason, detail
    stats: Counter = field(default_factory=Counter)  # counts by reason
    pii: Counter = field(default_factory=Counter)  # PII hits by kind


def clean_records(
    records: list[Record],
    *,
    normalize: bool = True,
    dedup: bool = True,
    near_threshold: float | None = 0.85,
    num_perm: int = 64,
    conflicts: str = "drop",
    pii: str = "flag",
    min_tokens: int | None = None,
    max_tokens: int | None = None,
    tokenizer: Any = None,
    show_progress: bool = False,
    email: bool = False,
) -> CleanResult:
    """Clean `records` (see the module doc). `tokenizer` (an HF tokenizer) is needed for token-length
    filters; near-duplicate detection is off when `near_threshold` is None. `email`: first cut each raw
    e-mail to its subject and body (data/email.py), each one logged as "email body" with what went."""
    if pii not in PII_MODES:
        raise ValueError(f"pii: unknown mode {pii!r} (known: {', '.join(PII_MODES)})")
    if conflicts not in CONFLICT_MODES:
        raise ValueError(f"conflicts: unknown mode {conflicts!r} (known: {', '.join(CONFLICT_MODES)})")
    log: list[dict[str, Any]] = []
    stats: Counter = Counter()
    pii_hits: Counter = Counter()

    def drop(r: Record, reason: str, **detail) -> None:
        log.append({"source": r.source, "action": "dropped", "reason": reason, **detail})
        stats[reason] += 1

    def changed(r: Record, reason: str, **detail) -> None:
        log.append({"source": r.source, "action": "changed", "reason": reason, **detail})
        stats[reason] += 1

    if email:
        records = [_email_step(r, changed) for r in records]
    kept: list[Record] = []
    with progress("normalise + PII", len(records), show_progress) as advance:
        for r in records:
            if normalize:
                what: set[str] = set()

                def norm(s: str) -> str:
                    v, w = normalize_text(s)
                    what.update(w)
                    return v

                r = map_text(r, norm)
                if what:
                    changed(r, "normalised", what=sorted(what))
            empty = _empty_part(r)
            if empty is not None:
                drop(r, "empty", field=empty)
                advance(1)
                continue
            if pii != "off":
                found = count_pii(r.all_text())
                if found:
                    pii_hits.update(found)
                    kinds = dict(sorted(found.items()))
                    if pii == "drop":
                        drop(r, "pii", kinds=kinds)
                        advance(1)
                        continue
                    if pii == "scrub":
                        r = map_text(r, lambda s: scrub(s)[0])
                        changed(r, "pii scrubbed", kinds=kinds)
                    else:
                        log.append({"source": r.source, "action": "flagged", "reason": "pii", "kinds": kinds})
                        stats["pii flagged"] += 1
            kept.append(r)
            advance(1)

    if min_tokens is not None or max_tokens is not None:
        if tokenizer is None:
            raise ValueError("token-length filters need a tokenizer")
        lengths = token_lengths(tokenizer, [r.all_text() for r in kept])
        out = []
        for r, n in zip(kept, lengths):
            if min_tokens is not None and n < min_tokens:
                drop(r, "too short", tokens=n, min_tokens=min_tokens)
            elif max_tokens is not None and n > max_tokens:
                drop(r, "too long", tokens=n, max_tokens=max_tokens)
            else:
                out.append(r)
        kept = out

    if dedup:
        first: dict[str, Record] = {}
        out = []
        for r in kept:
            key = _content_key(r)
            if key in first:
                drop(r, "exact duplicate", duplicate_of=first[key].source)
            else:
                first[key] = r
                out.append(r)
        kept = out

    groups: dict[str, list[Record]] = defaultdict(list)
    for r in kept:
        if r.kind == "classify":
            groups[conflict_key(r)].append(r)
    conflicting = {k: g for k, g in groups.items() if len({r.label for r in g}) > 1}
    if conflicting:
        bad_ids = set()
        for g in conflicting.values():
            detail = [f"{r.source}={r.label}" for r in g]
            for r in g:
                if conflicts == "drop":
                    drop(r, "conflicting labels", same_text=detail)
                    bad_ids.add(id(r))
                else:
                    log.append({"source": r.source, "action": "flagged", "reason": "conflicting labels",
                                "same_text": detail})
                    stats["conflicting labels flagged"] += 1
        kept = [r for r in kept if id(r) not in bad_ids]

    if dedup and near_threshold is not None and kept:
        with progress("near-duplicates", len(kept), show_progress) as advance:
            hits = near_duplicates([r.all_text() for r in kept], near_threshold, num_perm, advance)
        out = []
        for r, hit in zip(kept, hits):
            other = kept[hit[0]] if hit is not None else None
            # Rows rendered through one template read alike; with another target value they are different
            # examples, not copies.
            if other is None or (r.value is not None and r.value != other.value):
                out.append(r)
            elif r.label != other.label and conflicts == "keep":
                # a different label makes it a (near) conflict, which the user asked to keep
                out.append(r)
                log.append({"source": r.source, "action": "flagged", "reason": "near duplicate, other label",
                            "duplicate_of": other.source, "similarity": round(hit[1], 3)})
                stats["near duplicate, other label flagged"] += 1
            else:
                extra = {"label_differs": f"{other.label} vs {r.label}"} if r.label != other.label else {}
                drop(r, "near duplicate", duplicate_of=other.source, similarity=round(hit[1], 3), **extra)
        kept = out
    return CleanResult(records=kept, log=log, stats=stats, pii=pii_hits)


def _email_step(r: Record, changed: Callable) -> Record:
    """`r` with its e-mail text(s) cut to subject + body, logged; a text that is no e-mail stays as it is."""
    from .email import email_body

    removed: dict[str, int] = {}

    def cut(text: str) -> str:
        body, what = email_body(text)
        if what["email"]:
            for k in ("header_lines", "quoted_lines", "signature_lines"):
                removed[k] = removed.get(k, 0) + what[k]
            removed["chars_removed"] = removed.get("chars_removed", 0) + what["chars_before"] - what["chars_after"]
        return body

    out = map_text(r, cut)
    if removed:
        changed(out, "email body", **removed)
    return out


def token_lengths(tokenizer: Any, texts: list[str], batch: int = 4096) -> list[int]:
    """Tokens per text, without special tokens; `tokenizer` is a `tokenizers.Tokenizer` or an HF one."""
    out: list[int] = []
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        if hasattr(tokenizer, "encode_batch"):
            out.extend(len(e.ids) for e in tokenizer.encode_batch(chunk, add_special_tokens=False))
        else:
            out.extend(len(e) for e in tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return out


def load_tokenizer(model: str):
    """The tokenizer of a zoo name, local HF folder or hub id (lengths are counted in the model's tokens).

    A folder with `tokenizer.json` is read by the `tokenizers` library directly: the same tokens as
    transformers' fast tokenizer, without the seconds of importing transformers."""
    from pathlib import Path

    from ..zoo import resolve_model

    where = resolve_model(model)
    if (Path(where) / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(Path(where) / "tokenizer.json"))
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as e:  # not on disk and no network, or not a model at all
        raise NotFoundError(f"--model {model}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
