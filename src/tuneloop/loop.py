"""The continuous loop: `tuneloop loop PROJECT.yaml [--once | --every 1d]`.

One cycle turns what arrived since production was trained into the next version, or says in one line why not:

    gather    inbox files (moved into the cycle's folder, never deleted) + feedback exported since production
              was trained (`feedback.export.export_feedback`) + what earlier cycles gathered and production has
              not learned yet; cleaned by the data studio (`clean_records`, its log kept), records that leak
              into the frozen test set or repeat production's training data dropped, each kept record with its
              provenance; the newest share held out as the recent slice
    decide    retrain or not, and why: new examples, drift of live inputs (`drift.drift_report`), falling
              ratings, the schedule; the cooldown budget
    train     production's training data replayed + the new records, warm-started from production or fresh
              (`train.init_from`), into a run folder recorded before training starts
    register  as the next version of the name, production its parent (`registry.register`)
    gate      against production on the frozen test set (`gate.gate`, recorded on the version) and on the
              recent slice (`gate.compare_reports`); both must pass
    promote   the alias moves only on a pass (`registry.promote`); a server following NAME@ALIAS
              (`serve/follow.py`) switches without a restart
    report    every cycle in `history.json` + `history.html` (the headline metric across versions), and
              one MLflow run per cycle

Crash safety: each step's outcome is written atomically into the cycle's `state.json` before the next step
starts. A rerun after a kill at any point continues the unfinished cycle: a finished step is never redone;
training goes into the run folder recorded before it started (resumed from its checkpoint, or started
again when it has none, never a second candidate); registering finds the version already made from that
folder; an inbox file is moved, not copied, so it is in the inbox or in the cycle's folder, never neither.
`TUNELOOP_LOOP_KILL_AFTER=STEP` SIGKILLs the process right after that step's state is written (the
crash-safety test uses it).

Everything lives under `<workspace>/loop/<name>/`:

    cycles/0001/state.json   the cycle's steps and their outcomes
    cycles/0001/inbox/       the inbox files this cycle took
    cycles/0001/new.jsonl    every new record kept, with provenance (source, arrived, split)
    cycles/0001/clean.json   the data studio's log: problems, drops and changes, each naming its source
    cycles/0001/train.jsonl  what the candidate trained on (replayed + new); recent.jsonl the held-out slice
    history.json, history.html
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError, NotFoundError, TuneloopError
from .fileio import read_json, write_json_atomic, write_text_atomic

LOOP_DIR = "loop"
CYCLES = "cycles"
STATE = "state.json"
NEW = "new.jsonl"
CLEAN_LOG = "clean.json"
TRAIN = "train.jsonl"
RECENT = "recent.jsonl"
HISTORY_JSON = "history.json"
HISTORY_HTML = "history.html"
LOCK = ".lock"
KILL_ENV = "TUNELOOP_LOOP_KILL_AFTER"
STEPS = ("gather", "decide", "train", "register", "gate", "promote", "report")
TASKS = ("classify", "sft")  # the tasks whose new records the loop can read, export and gate


# ----------------------------------------------------------------------------------------------------
# the loop file


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Triggers(_Section):
    """When a cycle retrains; any one firing is enough (with at least one new training example)."""

    min_new_examples: int | None = Field(
        50, ge=1, description="Retrain once at least this many new labelled examples (after cleaning, less the "
        "recent slice) have arrived since production was trained; null: never for this reason.")
    drift: bool = Field(True, description="Retrain when the live inputs drifted from production's training data "
                                          "(`tuneloop drift NAME@ALIAS` over the inputs served since it was trained).")
    drift_threshold: float | None = Field(
        None, ge=0, description="The drift score at or above which it counts as drifted; null: the drift "
        "report's own verdict (its per-check thresholds).")
    rating_drop: float | None = Field(
        0.5, gt=0, description="Retrain when the mean rating (1-5) of production's answers is this much below the "
        "mean of the versions before it; null: never for this reason.")
    min_ratings: int = Field(20, ge=1, description="Ratings of production needed before its mean is compared.")
    every: str | None = Field(
        None, description="The schedule: retrain when production is older than this (`30d`, `12h`), with "
        "whatever new data there is.")


class Budgets(_Section):
    """What one cycle may spend."""

    max_steps: int | None = Field(None, ge=1, description="The candidate's `train.max_steps` (default: the recipe's).")
    max_train_records: int | None = Field(
        None, ge=1, description="At most this many training records per candidate: all the new ones, then a "
        "seeded sample of the replayed old ones.")
    cooldown: str | None = Field(
        None, description="No retraining sooner than this after the last candidate was trained (`12h`); a "
        "cycle inside it gathers and waits.")


class LoopConfig(_Section):
    """A loop file (`tuneloop loop PROJECT.yaml`): paths relative to the file."""

    recipe: str = Field(description="The recipe YAML every candidate trains with (its data.test is the frozen "
                                    "test set; data.train the first version's training data).")
    name: str = Field(description="The registered model name (`tuneloop registry`).")
    alias: str = Field("production", description="The alias the loop gates against and promotes.")
    inbox: str = Field("inbox", description="Folder new labelled files are dropped into (relative to the "
                                            "workspace), in any shape `tuneloop data check` reads for the task.")
    feedback: bool = Field(True, description="Gather feedback from <workspace>/feedback.db exported since "
                                             "production was trained (classify: labels; sft: corrections).")
    warm_start: bool = Field(True, description="Candidates start from production's weights (`train.init_from`); "
                                               "false: from the base model, fresh.")
    replay: float = Field(1.0, ge=0, le=1, description="Share of production's training records trained on again "
                                                       "beside the new ones (a seeded sample), so old skills stay.")
    recent_share: float = Field(0.2, ge=0, lt=1, description="Share of the new labelled records, the newest, "
                                                             "held out of training as the recent slice the gate reads.")
    min_recent: int = Field(20, ge=1, description="A recent slice smaller than this is not gated on (noted).")
    leak_threshold: float = Field(0.8, gt=0, le=1, description="MinHash similarity at which a new record counts "
                                                               "as a copy of a frozen test record (dropped).")
    near_duplicates: float | None = Field(0.85, gt=0, le=1, description="The data studio's near-duplicate "
                                                                        "threshold for new records; null: exact only.")
    pii: str = Field("flag", description="The data studio's PII mode for new records: flag, scrub or drop.")
    triggers: Triggers = Field(default_factory=Triggers, description="When a cycle retrains (any one is enough).")
    budgets: Budgets = Field(default_factory=Budgets, description="What one cycle may spend.")
    seed: int = Field(0, description="Seed of the replay sample.")

    source_dir: str | None = Field(None, exclude=True, description="(internal) folder of the loop file")

    def path(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() or self.source_dir is None else Path(self.source_dir) / q


def load_loop(path: str | os.PathLike) -> LoopConfig:
    """Read and validate a loop file; an unknown key or a bad value names file: key."""
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"{p}: loop file not found")
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"{p}{f':{mark.line + 1}' if mark else ''}: not valid YAML "
                          f"({getattr(e, 'problem', e)})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{p}: a loop file is a mapping of keys (recipe, name, inbox, triggers, budgets ...)")
    doc.pop("source_dir", None)
    try:
        cfg = LoopConfig.model_validate(doc)
    except ValidationError as e:
        raise ConfigError("\n".join(_validation_line(p, err) for err in e.errors())) from None
    cfg.source_dir = str(p.parent.resolve())
    from .data.clean import PII_MODES
    from .registry import _check_alias, _check_name

    if cfg.pii not in PII_MODES:
        raise ConfigError(f"{p}: pii: {cfg.pii!r} (known: {', '.join(PII_MODES)})")
    for what, value in (("triggers.every", cfg.triggers.every), ("budgets.cooldown", cfg.budgets.cooldown)):
        if value is not None:
            parse_duration(value, f"{p}: {what}")
    try:
        _check_name(cfg.name)
        _check_alias(cfg.alias)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    return cfg


def _validation_line(path: Path, err: dict) -> str:
    loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        cls: Any = LoopConfig
        for part in err["loc"][:-1]:
            cls = cls.model_fields[part].annotation
        allowed = sorted(k for k in cls.model_fields if k != "source_dir")
        return f"{path}: {loc}: unknown key (allowed: {', '.join(allowed)})"
    if err["type"] == "missing":
        return f"{path}: {loc}: required key is missing"
    return f"{path}: {loc}: {err['msg']} (got {err.get('input')!r})"


def parse_duration(text: str, where: str = "duration") -> float:
    """`1d`, `12h`, `30m`, `45s`, `2w` -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", str(text))
    if not m or float(m[1]) <= 0:
        raise ConfigError(f"{where}: {text!r}: expected a duration such as 30m, 12h, 1d, 2w")
    return float(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m[2]]


# ----------------------------------------------------------------------------------------------------
# the cycle's state


def loop_dir(workspace: Path, name: str) -> Path:
    return Path(workspace) / LOOP_DIR / name


def _cycle_dirs(root: Path) -> list[Path]:
    d = root / CYCLES
    return sorted(p for p in d.glob("[0-9]" * 4) if p.is_dir()) if d.exists() else []


def read_state(cycle_dir: Path) -> dict:
    f = Path(cycle_dir) / STATE
    return read_json(f) if f.exists() else {"cycle": int(Path(cycle_dir).name), "steps": {}, "done": False}


def save_step(cycle_dir: Path, state: dict, step: str, outcome: dict) -> dict:
    """Record a step's outcome atomically; then, when the kill hook names this step, die as kill -9 would."""
    state["steps"][step] = {**outcome, "time": time.time()}
    write_json_atomic(Path(cycle_dir) / STATE, state)
    if os.environ.get(KILL_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)
    return state


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{root}: another `tuneloop loop` is running this model's cycle") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------------
# records of the task: read a file, write training rows, export feedback


def _read(task: str, path: str, dc, labels: list[str] | None) -> tuple[list, list[str]]:
    """(records, problems) of one file as the task's recipe reads it; problems name file:line: field."""
    if task == "classify":
        from .data.validate import read_classification

        res = read_classification(path, dc.text_field, dc.label_field, labels, dc.format)
    else:
        from .data.chat import read_chat

        res = read_chat(path, dc.format)
    return list(res.records), list(res.problems)


def _row(task: str, r, dc) -> dict:
    if task == "classify":
        return {dc.text_field: r.text, dc.label_field: r.label}
    return {"messages": r.messages}


def _from_row(task: str, row: dict):
    from .data.records import Record

    if task == "classify":
        return Record(text=row["text"], label=row["label"], source=row.get("source", ""))
    return Record(messages=row["messages"], source=row.get("source", ""))


def _canonical(task: str, r) -> dict:
    return {"text": r.text, "label": r.label} if task == "classify" else {"messages": r.messages}


def _write_rows(path: Path, rows: list[dict]) -> Path:
    return write_text_atomic(path, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows))


def _read_rows(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _epoch(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


# ----------------------------------------------------------------------------------------------------
# step 1: gather


def claim_inbox(inbox: Path, into: Path) -> list[dict]:
    """Move every file in `inbox` into `into` (one rename each: a file is in one place or the other at any
    moment); returns them oldest first with the time each arrived (its modification time)."""
    into.mkdir(parents=True, exist_ok=True)
    if not inbox.exists():
        return []
    found = sorted((p for p in inbox.iterdir() if p.is_file() and not p.name.startswith(".")),
                   key=lambda p: (p.stat().st_mtime, p.name))
    for p in found:
        target = into / p.name
        n = 1
        while target.exists():  # a second file of the same name in a later drop keeps both
            target = into / f"{p.stem}-{n}{p.suffix}"
            n += 1
        os.replace(p, target)
    return [{"file": str(p), "arrived": p.stat().st_mtime}
            for p in sorted((q for q in into.iterdir() if q.is_file()), key=lambda q: (q.stat().st_mtime, q.name))]


def _feedback_records(cfg: LoopConfig, workspace: Path, task: str, since: float | None,
                      frozen: str | None) -> tuple[list, list[str]]:
    from .data.records import Record
    from .feedback.export import export_feedback

    db = Path(workspace) / "feedback.db"
    if not cfg.feedback or not db.exists():
        return [], ["feedback: off" if not cfg.feedback else f"feedback: no store at {db}"]
    from .feedback import FeedbackStore

    store = FeedbackStore.for_workspace(workspace)
    try:
        rows, notes = export_feedback(store, "classify" if task == "classify" else "sft", since=since,
                                      exclude=[frozen] if frozen else None, workspace=workspace)
    finally:
        store.close()
    recs = [Record(text=x["text"], label=x["label"], source=f"feedback:{i}") if task == "classify"
            else Record(messages=x["messages"], source=f"feedback:{i}") for i, x in enumerate(rows)]
    return recs, [f"feedback: {n}" for n in notes]


def gather(cfg: LoopConfig, recipe, workspace: Path, cycle_dir: Path, production, carried: list[dict]) -> dict:
    """Step 1 (see the module doc). Writes new.jsonl, clean.json; returns the counts."""
    from .data.clean import clean_records
    from .data.records import record_key
    from .data.split import find_leaks

    task, dc = recipe.task, recipe.data
    started = time.time()
    claimed = claim_inbox(workspace / cfg.inbox, cycle_dir / "inbox")
    problems: list[str] = []
    fresh: list[tuple[Any, float]] = []
    for c in claimed:
        try:
            recs, probs = _read(task, c["file"], dc, dc.labels)
        except TuneloopError as e:  # a file that is not data at all stays in the cycle's folder, named here
            problems.append(f"{c['file']}: {e}")
            continue
        problems += probs
        fresh += [(r, c["arrived"] + i * 1e-6) for i, r in enumerate(recs)]
    since = _epoch(production.run_info.finished) if production is not None else None
    frozen = str(production.run_dir) if production is not None else (recipe.data.test or None)
    fb, fb_notes = _feedback_records(cfg, workspace, task, since, frozen)
    fresh += [(r, started + i * 1e-6) for i, r in enumerate(fb)]
    earlier = [(_from_row(task, x), float(x["arrived"])) for x in carried]

    allrecs = earlier + fresh
    cleaned = clean_records([r for r, _ in allrecs], near_threshold=cfg.near_duplicates, conflicts="drop",
                            pii=cfg.pii)
    log = {"problems": problems, "clean": cleaned.log, "dropped": {}, "notes": list(fb_notes)}
    kept = cleaned.records
    # cleaning may hand back changed copies: a record's source (file:line, feedback:N) says when it arrived
    by_source = {r.source: t for r, t in allrecs}
    times = [by_source.get(r.source, started) for r in kept]

    dropped: dict[str, int] = {}
    # what production already trained on: the same input again adds nothing
    old_inputs = {r.input_text().strip().lower() for r in _training_records(production, task)} \
        if production is not None else set()
    frozen_recs = _frozen_records(recipe, production)
    probes = [replace(r, source=str(i)) for i, r in enumerate(kept)]
    leaked = {int(x["source"]) for x in find_leaks(frozen_recs, {"new": probes}, cfg.leak_threshold)} \
        if frozen_recs and probes else set()
    rows = []
    for i, (r, t) in enumerate(zip(kept, times)):
        why = "in the frozen test set" if i in leaked else \
            "already in production's training data" if r.input_text().strip().lower() in old_inputs else None
        if why is not None:
            dropped[why] = dropped.get(why, 0) + 1
            log["clean"].append({"source": r.source, "action": "dropped", "reason": why})
            continue
        rows.append({**_canonical(task, r), "source": r.source, "arrived": t, "key": record_key(r)})
    rows.sort(key=lambda x: x["arrived"])
    n_recent = int(len(rows) * cfg.recent_share)
    for i, x in enumerate(rows):
        x["split"] = "recent" if i >= len(rows) - n_recent else "train"
    log["dropped"] = dropped
    write_json_atomic(cycle_dir / CLEAN_LOG, log)
    _write_rows(cycle_dir / NEW, rows)
    return {"inbox_files": [c["file"] for c in claimed], "inbox_records": len(fresh) - len(fb),
            "feedback_records": len(fb), "carried": len(earlier), "problems": len(problems),
            "cleaned_away": len(allrecs) - len(kept), "dropped": dropped, "kept": len(rows),
            "new_train": sum(x["split"] == "train" for x in rows), "recent": n_recent,
            "feedback_since": since, "notes": fb_notes}


def _training_records(production, task: str) -> list:
    """The records production trained on (its recipe's data.train, read as its task reads it)."""
    if production is None:
        return []
    from .runs import open_run

    run = open_run(production.run_dir)
    dc = run.recipe.data
    recs, _ = _read(task, run.recipe.resolve_path(dc.train), dc, run.info.labels if task == "classify" else None)
    return recs


def _frozen_records(recipe, production) -> list:
    from .feedback.export import test_records

    spec = str(production.run_dir) if production is not None else recipe.data.test
    if not spec:
        return []
    return test_records(spec)[1]


def carried_rows(root: Path, before: int) -> list[dict]:
    """What the last finished cycle before `before` leaves to the next: everything it gathered when its
    candidate was not promoted (production still has not learned it), only its recent slice when it was."""
    for d in reversed(_cycle_dirs(root)):
        if int(d.name) >= before:
            continue
        st = read_state(d)
        if not st.get("done"):
            continue
        rows = _read_rows(d / NEW)
        promoted = (st["steps"].get("promote") or {}).get("promoted")
        if promoted:
            return [x for x in rows if x["split"] == "recent"]
        return rows
    return []


# ----------------------------------------------------------------------------------------------------
# step 2: decide


def _ratings(workspace: Path, production) -> dict:
    """Mean rating of production's answers against the mean of every earlier version's."""
    db = Path(workspace) / "feedback.db"
    if production is None or not db.exists():
        return {"now": None, "before": None, "n_now": 0, "n_before": 0}
    from .feedback import FeedbackStore

    store = FeedbackStore.for_workspace(workspace)
    try:
        rows = [f for f in store.feedback() if f["rating"] is not None]
    finally:
        store.close()
    now = [f["rating"] for f in rows if f["model_version"] == production.ref]
    before = [f["rating"] for f in rows if f["model_version"] not in (None, production.ref)
              and f["model_version"].split(":")[0] == production.name]
    mean = (lambda xs: sum(xs) / len(xs) if xs else None)
    return {"now": mean(now), "before": mean(before), "n_now": len(now), "n_before": len(before)}


def _drift(cfg: LoopConfig, workspace: Path, production, cycle_dir: Path) -> dict:
    if not cfg.triggers.drift or production is None:
        return {"checked": False, "why": "off" if not cfg.triggers.drift else "no production yet"}
    from . import drift

    try:
        rep = drift.drift_report(workspace, f"{production.name}@{cfg.alias}",
                                 since=_epoch(production.run_info.finished), out_dir=cycle_dir / "drift")
    except TuneloopError as e:  # no live inputs logged yet, for one
        return {"checked": False, "why": str(e)}
    return {"checked": True, "score": float(rep["score"]), "drifted": bool(rep["drifted"]), "n_live": rep.get("n_live"),
            "report": str(cycle_dir / "drift" / "drift.json")}


def decide(cfg: LoopConfig, gathered: dict, production, last_trained: float | None, now: float,
           drift_result: dict, ratings: dict) -> dict:
    """Step 2: {"retrain", "reason" (one line), "checks"}. Pure: every measurement comes in as an argument."""
    t = cfg.triggers
    n = gathered["new_train"]
    checks: dict[str, Any] = {"new_examples": n, "drift": drift_result, "ratings": ratings}
    if production is None:
        return {"retrain": True, "reason": f"no version holds {cfg.name}@{cfg.alias} yet: training the first one",
                "checks": checks, "fired": ["bootstrap"]}
    fired, quiet = [], []
    if t.min_new_examples is not None:
        (fired if n >= t.min_new_examples else quiet).append(
            f"{n} new examples ({'≥' if n >= t.min_new_examples else '<'} {t.min_new_examples})")
    if drift_result.get("checked"):
        d = drift_result
        # the loop's own threshold on the score, else the drift report's verdict (its per-check thresholds)
        flagged = d["drifted"] if t.drift_threshold is None else d["score"] >= t.drift_threshold
        thr = f" (threshold {t.drift_threshold})" if t.drift_threshold is not None else ""
        (fired if flagged else quiet).append(f"drift {d['score']:.3f}{thr} {'flagged' if flagged else 'not flagged'}")
    elif t.drift:
        quiet.append(f"drift not measured ({drift_result.get('why')})")
    if t.rating_drop is not None:
        r = ratings
        if r["now"] is not None and r["before"] is not None and r["n_now"] >= t.min_ratings:
            drop = r["before"] - r["now"]
            cmp = "≥" if drop >= t.rating_drop else "<"
            (fired if drop >= t.rating_drop else quiet).append(
                f"ratings {r['before']:.2f} → {r['now']:.2f} (drop {drop:.2f} {cmp} {t.rating_drop})")
        else:
            quiet.append(f"ratings: {r['n_now']} of production (need {t.min_ratings} and earlier ones)")
    if t.every is not None:
        age = now - (_epoch(production.run_info.finished) or now)
        due = age >= parse_duration(t.every)
        (fired if due else quiet).append(f"schedule {'due' if due else 'not due'} (production {age / 86400:.1f} d old, "
                                         f"every {t.every})")
    checks["fired"], checks["quiet"] = fired, quiet
    if not fired:
        return {"retrain": False, "reason": "no retrain: " + "; ".join(quiet), "checks": checks, "fired": []}
    if n == 0:
        return {"retrain": False, "reason": f"no retrain: {'; '.join(fired)}, but no new labelled example to train on",
                "checks": checks, "fired": fired}
    if cfg.budgets.cooldown is not None and last_trained is not None:
        wait = parse_duration(cfg.budgets.cooldown) - (now - last_trained)
        if wait > 0:
            return {"retrain": False, "reason": f"no retrain yet: {'; '.join(fired)}, but the last candidate was "
                                                f"trained {(now - last_trained) / 3600:.1f} h ago (cooldown "
                                                f"{cfg.budgets.cooldown})", "checks": checks, "fired": fired}
    return {"retrain": True, "reason": "retrain: " + "; ".join(fired), "checks": checks, "fired": fired}


# ----------------------------------------------------------------------------------------------------
# step 3: train


def candidate_recipe(cfg: LoopConfig, recipe, production, train_file: Path | None):
    """The recipe the candidate trains with: the loop's recipe on `train_file`, within the budgets, warm
    started from production when the loop file says so."""
    r = recipe.model_copy(deep=True)
    if train_file is not None:
        r.data.train, r.data.format = str(train_file), "jsonl"
    if cfg.budgets.max_steps is not None:
        r.train.max_steps = cfg.budgets.max_steps
    if cfg.warm_start and production is not None:
        r.train.init_from = str(production.run_dir)
    if r.train.checkpoint_every is None:
        # a killed candidate resumes instead of starting over
        r.train.checkpoint_every = max(1, (r.train.max_steps or 50) // 4)
    return r


def training_rows(cfg: LoopConfig, recipe, production, new_rows: list[dict]) -> list[dict]:
    """Production's training records (a seeded `replay` share) + the new ones kept for training, in the
    recipe's field names; capped by `budgets.max_train_records` (the new ones first)."""
    task = recipe.task
    if production is None:  # the first version: the recipe's own training data
        old, _ = _read(task, recipe.resolve_path(recipe.data.train), recipe.data, recipe.data.labels)
    else:
        old = _training_records(production, task)
    rng = random.Random(cfg.seed)
    if cfg.replay < 1:
        old = rng.sample(old, round(len(old) * cfg.replay))
    new = [_from_row(task, x) for x in new_rows if x["split"] == "train"]
    cap = cfg.budgets.max_train_records
    if cap is not None and len(new) + len(old) > cap:
        old = rng.sample(old, max(0, cap - len(new)))
        new = new[-cap:]
    return [_row(task, r, recipe.data) for r in old + new]


def train_step(cfg: LoopConfig, recipe, workspace: Path, cycle_dir: Path, state: dict, production,
               show_progress: bool) -> dict:
    """Train the candidate into the run folder recorded in the state before training starts."""
    from .runs import checkpoint_dir, new_run_dir, open_run, RUN_INFO
    from .train import resume_run, train_run

    rows = _read_rows(cycle_dir / NEW)
    train_file = cycle_dir / TRAIN
    if not train_file.exists():
        _write_rows(train_file, training_rows(cfg, recipe, production, rows))
    r = candidate_recipe(cfg, recipe, production, train_file)
    started = state["steps"].get("train.started")
    if started:
        run_dir = Path(started["run_dir"])
        info = read_json(run_dir / RUN_INFO) if (run_dir / RUN_INFO).exists() else {}
        if info.get("status") == "finished":
            return {"run_dir": str(run_dir), "resumed": "finished before the crash"}
        if checkpoint_dir(run_dir).exists():
            run_dir, metrics = resume_run(run_dir, workspace, show_progress=show_progress)
            return {"run_dir": str(run_dir), "resumed": "from its checkpoint", "steps": metrics.get("steps")}
        shutil.rmtree(run_dir, ignore_errors=True)  # no checkpoint yet: nothing to keep, start it again
    run_dir = new_run_dir(workspace, r.name)
    save_step(cycle_dir, state, "train.started", {"run_dir": str(run_dir), "train_records": sum(1 for _ in
              train_file.read_text(encoding="utf-8").splitlines())})
    run_dir, metrics = train_run(r, workspace, show_progress=show_progress, run_dir=run_dir)
    open_run(run_dir)
    return {"run_dir": str(run_dir), "steps": metrics.get("steps"), "train_seconds": metrics.get("train_seconds"),
            "final_loss": metrics.get("final_loss")}


# ----------------------------------------------------------------------------------------------------
# steps 4-6: register, gate, promote


def register_step(cfg: LoopConfig, workspace: Path, run_dir: Path, production) -> dict:
    """Register the candidate once: a version already made from this run folder (a crash after registering)
    is the one."""
    from . import registry

    try:
        for v in registry.list_versions(workspace, cfg.name):
            if v.run_dir == Path(run_dir):
                return {"version": v.ref, "parent": production.ref if production else None, "found": True}
    except NotFoundError:
        pass
    v = registry.register(workspace, run_dir, name=cfg.name, parent=production.ref if production else None)
    return {"version": v.ref, "parent": production.ref if production else None}


def _recent_gate(recipe, cand_dir: Path, prod_dir: Path, cycle_dir: Path) -> dict:
    """Candidate against production on the recent slice: both evaluated on it, then the gate's comparison
    (production's gate settings; the candidate's training data checked for the slice's records)."""
    from .eval.tasks import evaluate_run
    from .gate import SYSTEM, compare_reports, training_keys
    from .runs import open_run

    rows = _read_rows(cycle_dir / NEW)
    recent = [_row(recipe.task, _from_row(recipe.task, x), recipe.data) for x in rows if x["split"] == "recent"]
    path = _write_rows(cycle_dir / RECENT, recent)
    cand, prod = open_run(cand_dir), open_run(prod_dir)
    rc = evaluate_run(cand, test_path=str(path), systems=[SYSTEM], out_dir=cycle_dir / "recent" / "candidate",
                      show_progress=False)
    rp = evaluate_run(prod, test_path=str(path), systems=[SYSTEM], out_dir=cycle_dir / "recent" / "production",
                      show_progress=False)
    gc = prod.recipe.gate
    d = compare_reports(rc, rp, margin=gc.margin, class_margin=gc.class_margin, metric=gc.metric,
                        confidence=gc.confidence, bootstrap_samples=gc.bootstrap_samples,
                        exact_below=gc.exact_below, training_keys=training_keys(cand),
                        production_training_keys=training_keys(prod))
    write_json_atomic(cycle_dir / "recent" / "gate.json", d)
    return d


def _summary(d: dict) -> dict:
    o = d.get("overall") or {}
    return {"passed": bool(d.get("passed")), "code": d.get("code"), "reasons": d.get("reasons", []),
            "metric": o.get("metric"), "candidate": o.get("candidate"), "production": o.get("production"),
            "delta": o.get("delta"), "lower": o.get("lower"), "upper": o.get("upper"), "n": o.get("n")}


def gate_step(cfg: LoopConfig, recipe, workspace: Path, cycle_dir: Path, cand_ref: str, production) -> dict:
    """Step 5. The first version has nothing to be gated against: it is evaluated on the frozen test set so
    that the next candidate's gate finds its report."""
    from . import registry
    from .eval.tasks import evaluate_run
    from .gate import SYSTEM, gate

    cand = registry.resolve(workspace, cand_ref)
    if production is None:
        rep = evaluate_run(cand.run_dir, systems=[SYSTEM], show_progress=False)
        h = rep["headline"]
        registry.write_model_card(workspace, registry.resolve(workspace, cand_ref))
        return {"passed": True, "first": True, "frozen": {"passed": True, "metric": h["metric"],
                                                          "candidate": h["values"].get(SYSTEM)}, "recent": None}
    res = gate(workspace, cand.ref, production.ref)
    frozen = {**_summary(res.details), "report": str(res.report_json)}
    n_recent = sum(1 for x in _read_rows(cycle_dir / NEW) if x["split"] == "recent")
    recent = None
    if n_recent >= cfg.min_recent:
        recent = _summary(_recent_gate(recipe, cand.run_dir, production.run_dir, cycle_dir))
        recent["report"] = str(cycle_dir / "recent" / "gate.json")
    passed = frozen["passed"] and (recent is None or recent["passed"])
    notes = [] if recent is not None else [f"recent slice of {n_recent} (< min_recent {cfg.min_recent}): not gated on"]
    return {"passed": passed, "frozen": frozen, "recent": recent, "notes": notes}


def promote_step(cfg: LoopConfig, workspace: Path, cand_ref: str, gated: dict) -> dict:
    from . import registry

    if not gated["passed"]:
        reasons = (gated["frozen"] or {}).get("reasons", []) + ((gated.get("recent") or {}).get("reasons") or [])
        return {"promoted": False, "why": "; ".join(reasons) or "the gate did not pass"}
    v = registry.promote(workspace, cand_ref, alias=cfg.alias)
    return {"promoted": True, "to": v.ref, "alias": cfg.alias}


# ----------------------------------------------------------------------------------------------------
# step 7: report


def cycle_summary(state: dict) -> dict:
    s = state["steps"]
    g, d = s.get("gather") or {}, s.get("decide") or {}
    gate = s.get("gate") or {}
    return {"cycle": state["cycle"], "started": state.get("started"), "finished": state.get("finished"),
            "production_before": state.get("production"),
            "data": {k: g.get(k) for k in ("inbox_records", "feedback_records", "carried", "kept", "new_train",
                                           "recent", "dropped", "cleaned_away", "problems")},
            "retrain": d.get("retrain"), "reason": d.get("reason"),
            "drift": ((d.get("checks") or {}).get("drift") or {}).get("score"),
            "candidate": (s.get("register") or {}).get("version"),
            "gate": {k: gate.get(k) for k in ("passed", "frozen", "recent")} if gate else None,
            "promoted": (s.get("promote") or {}).get("promoted", False),
            "production_after": (s.get("promote") or {}).get("to") or state.get("production")}


def history_png(cycles: list[dict]) -> bytes:
    """The headline metric on the frozen test set of every version the loop gated, with the gate's interval
    of the candidate-minus-production difference drawn around the candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import figure_png

    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=110)
    xs, ys, colours, labels = [], [], [], []
    metric = None
    for c in cycles:
        fz = ((c.get("gate") or {}).get("frozen") or {})
        if not c.get("candidate") or fz.get("candidate") is None:
            continue
        metric = metric or fz.get("metric")
        xs.append(len(xs))
        ys.append(fz["candidate"])
        colours.append("#2a7d2a" if c.get("promoted") else "#c0392b")
        labels.append(c["candidate"].split(":")[-1])
        if fz.get("lower") is not None and fz.get("production") is not None:
            base = fz["production"]
            ax.plot([xs[-1]] * 2, [base + fz["lower"], base + fz["upper"]], color="#999", lw=2)
    ax.plot(xs, ys, color="#555", lw=1)
    ax.scatter(xs, ys, c=colours, zorder=3)
    ax.set_xticks(xs, [f"v{x}" for x in labels])
    ax.set_ylabel(f"{metric or 'headline'} (frozen test set)")
    ax.set_title("versions: green promoted, red refused; grey: gate interval", fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


def render_history(name: str, cycles: list[dict]) -> str:
    import base64
    import html

    e = html.escape

    def num(v):
        return "—" if v is None else f"{v:.4f}" if isinstance(v, float) else e(str(v))

    rows = []
    for c in cycles:
        gate = c.get("gate") or {}
        fz, rc = gate.get("frozen") or {}, gate.get("recent") or {}
        data = c.get("data") or {}
        cells = [str(c["cycle"]), f"{num(data.get('kept'))} ({num(data.get('new_train'))} train, "
                                       f"{num(data.get('recent'))} recent)", num(c.get("drift")),
                 e(c.get("reason") or ""), e(c.get("candidate") or "—"),
                 f"{num(fz.get('candidate'))} vs {num(fz.get('production'))} [{num(fz.get('lower'))}, "
                 f"{num(fz.get('upper'))}]", f"{num(rc.get('candidate'))} vs {num(rc.get('production'))}",
                 "—" if not gate else "pass" if gate.get("passed") else "fail",
                 "yes" if c.get("promoted") else "no", e(c.get("production_after") or "—")]
        rows.append("<tr>" + "".join(f"<td class=l>{x}</td>" if i == 3 else f"<td>{x}</td>"
                                     for i, x in enumerate(cells)) + "</tr>")
    png = base64.b64encode(history_png(cycles)).decode() if any(c.get("candidate") for c in cycles) else None
    fig = (f'<figure><img alt="headline metric across versions" src="data:image/png;base64,{png}"></figure>'
           if png else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>loop: {e(name)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem;color:#222}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}} td.l{{text-align:left}}</style></head><body>
<h1>loop: {e(name)}</h1>
<p>{len(cycles)} cycles · frozen test: candidate vs production, with the 95% one-sided interval of the difference ·
recent: the newest held-out labelled records</p>
{fig}
<table><tr><th>cycle</th><th>new data</th><th>drift</th><th>decision</th><th>candidate</th><th>frozen test</th>
<th>recent slice</th><th>gate</th><th>promoted</th><th>production after</th></tr>{''.join(rows)}</table>
</body></html>
"""


def report_step(cfg: LoopConfig, workspace: Path, root: Path, state: dict) -> dict:
    """history.json + history.html over every finished cycle and this one; this cycle's MLflow run (found by
    its tag when a crash came between logging it and recording it)."""
    cycles = [cycle_summary(read_state(d)) for d in _cycle_dirs(root) if int(d.name) < state["cycle"]
              and read_state(d).get("done")]
    cycles.append(cycle_summary(state))
    write_json_atomic(root / HISTORY_JSON, {"name": cfg.name, "alias": cfg.alias, "cycles": cycles})
    write_text_atomic(root / HISTORY_HTML, render_history(cfg.name, cycles))
    return {"history": str(root / HISTORY_JSON), "html": str(root / HISTORY_HTML),
            "mlflow_run_id": _log_cycle(workspace, cfg, cycles[-1], root)}


def _log_cycle(workspace: Path, cfg: LoopConfig, c: dict, root: Path) -> str:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    from .tracking import log_to_mlflow, tracking_uri

    experiment = f"loop-{cfg.name}"
    mlflow.set_tracking_uri(tracking_uri(workspace))
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is not None:
        found = mlflow.MlflowClient(tracking_uri=tracking_uri(workspace)).search_runs(
            [exp.experiment_id], filter_string=f"tags.loop_cycle = '{c['cycle']}'", max_results=1)
        if found:
            return found[0].info.run_id
    gate = c.get("gate") or {}
    metrics: dict[str, float] = {}
    for where in ("frozen", "recent"):
        for k in ("candidate", "production", "delta", "lower", "upper"):
            v = (gate.get(where) or {}).get(k)
            if isinstance(v, (int, float)):
                metrics[f"{where}.{k}"] = float(v)
    if c.get("drift") is not None:
        metrics["drift"] = float(c["drift"])
    data = c.get("data") or {}
    for k in ("kept", "new_train", "recent", "inbox_records", "feedback_records"):
        if isinstance(data.get(k), (int, float)):
            metrics[f"data.{k}"] = float(data[k])
    metrics["promoted"] = float(bool(c.get("promoted")))
    params = {"reason": c.get("reason"), "retrain": c.get("retrain"), "candidate": c.get("candidate"),
              "production_before": c.get("production_before"), "production_after": c.get("production_after"),
              "gate_passed": gate.get("passed") if gate else None}
    return log_to_mlflow(workspace, experiment, f"cycle-{c['cycle']:04d}", params, metrics,
                         artifacts=[root / CYCLES / f"{c['cycle']:04d}" / STATE, root / HISTORY_HTML],
                         tags={"loop_cycle": str(c["cycle"]), "loop_name": cfg.name})


# ----------------------------------------------------------------------------------------------------
# one cycle


class _Production:
    """The version holding the alias when the cycle started (frozen in the state, so a rerun gates against
    the same one)."""

    def __init__(self, version):
        from .runs import open_run

        self.name, self.ref, self.run_dir = version.name, version.ref, version.run_dir
        self.run_info = open_run(version.run_dir).info


def _production(workspace: Path, cfg: LoopConfig, state: dict):
    from . import registry

    if "production" not in state:
        try:
            holder = registry.alias_holder(workspace, cfg.name, cfg.alias)
        except NotFoundError:
            holder = None
        state["production"] = holder.ref if holder else None
    return _Production(registry.resolve(workspace, state["production"])) if state["production"] else None


def _last_trained(root: Path) -> float | None:
    last = None
    for d in _cycle_dirs(root):
        t = (read_state(d)["steps"].get("train") or {}).get("time")
        if t is not None:
            last = t if last is None else max(last, t)
    return last


def run_cycle(cfg: LoopConfig, workspace: Path, *, show_progress: bool = False,
              say: Callable[[str], None] = print, now: float | None = None) -> dict:
    """Run (or finish, after a crash) one cycle; returns its summary (`cycle_summary`)."""
    from .config import load_recipe

    workspace = Path(workspace)
    recipe = load_recipe(cfg.path(cfg.recipe))
    if recipe.task not in TASKS:
        raise ConfigError(f"{cfg.recipe}: task {recipe.task!r}: the loop reads new data for {', '.join(TASKS)}")
    if not recipe.data.test:
        raise ConfigError(f"{cfg.recipe}: data.test: the loop needs a frozen test set to gate every candidate on")
    root = loop_dir(workspace, cfg.name)
    with _locked(root):
        dirs = _cycle_dirs(root)
        cycle_dir = dirs[-1] if dirs and not read_state(dirs[-1]).get("done") else \
            root / CYCLES / f"{(int(dirs[-1].name) + 1) if dirs else 1:04d}"
        cycle_dir.mkdir(parents=True, exist_ok=True)
        state = read_state(cycle_dir)
        resumed = bool(state["steps"])
        state.setdefault("started", time.time())
        production = _production(workspace, cfg, state)
        steps = state["steps"]
        say(f"cycle {state['cycle']}{' (resumed)' if resumed else ''}: production "
            f"{production.ref if production else 'none yet'}")

        if "gather" not in steps:
            out = gather(cfg, recipe, workspace, cycle_dir, production, carried_rows(root, state["cycle"]))
            save_step(cycle_dir, state, "gather", out)
        g = steps["gather"]
        say(f"gather: {g['inbox_records']} from the inbox, {g['feedback_records']} from feedback, {g['carried']} "
            f"carried; kept {g['kept']} ({g['new_train']} to train on, {g['recent']} recent)")

        if "decide" not in steps:
            t = time.time() if now is None else now
            d = decide(cfg, g, production, _last_trained(root), t, _drift(cfg, workspace, production, cycle_dir),
                       _ratings(workspace, production))
            save_step(cycle_dir, state, "decide", d)
        say(steps["decide"]["reason"])

        if steps["decide"]["retrain"]:
            if "train" not in steps:
                save_step(cycle_dir, state, "train",
                          train_step(cfg, recipe, workspace, cycle_dir, state, production, show_progress))
            say(f"trained: {steps['train']['run_dir']}")
            if "register" not in steps:
                save_step(cycle_dir, state, "register",
                          register_step(cfg, workspace, Path(steps["train"]["run_dir"]), production))
            cand = steps["register"]["version"]
            say(f"registered: {cand} (parent {steps['register']['parent']})")
            if "gate" not in steps:
                save_step(cycle_dir, state, "gate", gate_step(cfg, recipe, workspace, cycle_dir, cand, production))
            gt = steps["gate"]
            say(f"gate: {'pass' if gt['passed'] else 'fail'}" + "".join(
                f"; {w} {x['candidate']:.4f} vs {x['production']:.4f}" for w, x in
                (("frozen", gt.get("frozen")), ("recent", gt.get("recent")))
                if x and x.get("candidate") is not None and x.get("production") is not None))
            if "promote" not in steps:
                save_step(cycle_dir, state, "promote", promote_step(cfg, workspace, cand, gt))
            p = steps["promote"]
            say(f"promoted: {cfg.name}@{cfg.alias} → {p['to']}" if p["promoted"] else f"not promoted: {p['why']}")
        if "report" not in steps:
            state["finished"] = time.time()
            save_step(cycle_dir, state, "report", report_step(cfg, workspace, root, state))
        state["done"] = True
        write_json_atomic(cycle_dir / STATE, state)
        say(f"history: {steps['report']['html']}")
        return cycle_summary(state)


def run_loop(cfg: LoopConfig, workspace: Path, every: str | None = None, *, show_progress: bool = False,
             say: Callable[[str], None] = print, max_cycles: int | None = None) -> list[dict]:
    """One cycle (`every` None), or one every `every` until stopped (or `max_cycles` have run)."""
    period = parse_duration(every, "--every") if every is not None else None
    done: list[dict] = []
    while True:
        t0 = time.time()
        done.append(run_cycle(cfg, workspace, show_progress=show_progress, say=say))
        if period is None or (max_cycles is not None and len(done) >= max_cycles):
            return done
        time.sleep(max(0.0, period - (time.time() - t0)))
