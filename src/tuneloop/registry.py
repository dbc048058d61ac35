"""The model registry: every tuned model a numbered version of a name, with its lineage, a model card, and
aliases (`production`, `staging`, any name) that move only through a passing gate, a forced promotion with
its reason, or a rollback.

The store is MLflow's model registry in the workspace's SQLite store (`<workspace>/mlflow.db`, beside the
tracking runs), aliases through MLflow's alias API. A version's source is its run folder; its lineage is
kept as version tags. What MLflow does not keep lives under `<workspace>/registry/<name>/`:

    history.jsonl       every alias change, one JSON object a line, appended and fsynced (MLflow keeps only
                        the current holder of an alias; a tag holding the whole history would grow without
                        bound past MLflow's 8000-character tag limit)
    <version>/README.md the version's model card (per version, not per run folder: one run registered under
                        two names has two cards, and the run folder stays what training and eval wrote)
    .lock               serialises the check-then-move of a promotion or rollback across processes
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import os
import re
import socket
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from .errors import ConfigError, NotFoundError
from .fileio import append_line_durable, read_json, write_text_atomic
from .runs import DATA, LOSS_PLOT, RECIPE, REPORT_JSON, Run, is_adapter, open_run, set_mlflow_run_id

REGISTRY_DIR = "registry"
HISTORY_FILE = "history.jsonl"
MODEL_CARD = "README.md"
LOCK_FILE = ".lock"

# Names become refs (`NAME:3`, `NAME@production`) and folder names: no ':' '@' or '/' in them.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ALIAS = re.compile(r"[A-Za-z0-9_-]+")  # MLflow's own rule for alias names
_REF = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)(?::(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_-]+))")
# MLflow refuses tag values over 8000 characters
_TAG_MAX = 8000
# the per-example field of a report's predictions whose mean is the headline metric (eval/schema.py)
_PER_EXAMPLE = {"accuracy": "correct", "mae": "abs_error", "rougeL": "rougeL"}


@dataclass(frozen=True)
class Version:
    """One registered version: the run folder it is, its lineage tags and the aliases it holds."""

    name: str
    version: int
    run_dir: Path
    task: str
    tags: dict[str, str]
    aliases: tuple[str, ...]
    created: str

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def model_card(self) -> Path | None:
        p = self.tags.get("model_card")
        return Path(p) if p else None


# ----------------------------------------------------------------------------------------------------
# refs


def parse_ref(ref: str) -> tuple[str, int | None, str | None]:
    """`NAME:3` -> (NAME, 3, None); `NAME@production` -> (NAME, None, "production")."""
    m = _REF.fullmatch(str(ref).strip())
    if not m:
        raise ConfigError(f"{ref!r}: not a registry reference; use NAME:VERSION (e.g. reviews:3) or "
                          f"NAME@ALIAS (e.g. reviews@production)")
    version = m.group("version")
    return m.group("name"), int(version) if version is not None else None, m.group("alias")


def is_ref(text: str) -> bool:
    """Whether `text` reads as NAME:VERSION or NAME@ALIAS rather than a path that exists."""
    return bool(_REF.fullmatch(str(text).strip())) and not Path(text).expanduser().exists()


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name or ""):
        raise ConfigError(f"{name!r}: a registered name is letters, digits, '_', '.', '-' (starting with a letter "
                          f"or digit), so that NAME:VERSION and NAME@ALIAS read unambiguously")
    return name


def _check_alias(alias: str) -> str:
    if not _ALIAS.fullmatch(alias or ""):
        raise ConfigError(f"alias {alias!r}: letters, digits, '_' and '-' only")
    # MLflow reserves these: `latest` and `v<N>` already mean versions
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise ConfigError(f"alias {alias!r} is reserved by MLflow (latest, v<N>); pick another name")
    return alias


def default_name(run_name: str) -> str:
    """A run's recipe name made into a registered name."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name).strip("-.")
    return safe if _NAME.fullmatch(safe) else "model"


# ----------------------------------------------------------------------------------------------------
# the store


def _client(workspace: Path):
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    from .tracking import quiet_mlflow, tracking_uri

    quiet_mlflow()
    uri = tracking_uri(Path(workspace))
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _missing(e: Exception) -> bool:
    """MLflow says 'not found' with an exception and an error code."""
    return getattr(e, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def _iso(ms: int | None) -> str:
    return datetime.fromtimestamp((ms or 0) / 1000).astimezone().isoformat(timespec="milliseconds")


def _now() -> str:
    # milliseconds: two alias changes within one second still read in order
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


def _version(mv, holders: dict[str, Any]) -> Version:
    """`holders`: the registered model's alias → version (a searched version does not carry its aliases)."""
    tags = dict(mv.tags or {})
    aliases = tuple(sorted(a for a, v in holders.items() if int(v) == int(mv.version)))
    return Version(name=mv.name, version=int(mv.version), run_dir=Path(tags.get("run_dir") or mv.source),
                   task=tags.get("task", ""), tags=tags, aliases=aliases, created=_iso(mv.creation_timestamp))


def _registry_dir(workspace: Path, name: str) -> Path:
    return Path(workspace) / REGISTRY_DIR / name


def _known_names(client) -> list[str]:
    return sorted(m.name for m in client.search_registered_models(max_results=1000))


def _registered(client, workspace: Path, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if not _missing(e):
            raise
    known = _known_names(client)
    raise NotFoundError(f"{name}: no registered model of that name in {workspace} "
                        + (f"(known: {', '.join(known)})" if known else
                           "(none registered yet; `tuneloop registry register RUN` adds one)"))


def _versions(client, name: str, holders: dict[str, Any]) -> list[Version]:
    found = client.search_model_versions(f"name='{name}'", max_results=10000)
    return sorted((_version(mv, holders) for mv in found), key=lambda v: v.version)


def _holders_of(rm) -> dict[str, Any]:
    return dict(rm.aliases or {})


@contextmanager
def _lock(workspace: Path, name: str) -> Iterator[None]:
    """One registry change of a name at a time (two promotions racing must not both pass their check)."""
    d = _registry_dir(workspace, name)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / LOCK_FILE, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------------
# reading


def resolve(workspace, ref: str) -> Version:
    """The version a ref names; NotFoundError naming the known names, versions or aliases."""
    name, number, alias = parse_ref(ref)
    ws = Path(workspace)
    client = _client(ws)
    rm = _registered(client, ws, name)
    holders = _holders_of(rm)
    if number is not None:
        versions = _versions(client, name, holders)
        for v in versions:
            if v.version == number:
                return v
        raise NotFoundError(f"{ref}: {name} has no version {number} "
                            f"(known: {', '.join(str(v.version) for v in versions) or 'none'})")
    if alias not in holders:
        known = ", ".join(f"{a} → {name}:{v}" for a, v in sorted(holders.items()))
        raise NotFoundError(f"{ref}: no version of {name} holds the alias {alias!r} "
                            f"(aliases: {known or 'none yet; `tuneloop registry promote NAME:VERSION` sets one'})")
    return _version(client.get_model_version(name, str(holders[alias])), holders)


def list_versions(workspace, name: str | None = None) -> list[Version]:
    """Every version of `name` (of every name when None), by name then version."""
    ws = Path(workspace)
    client = _client(ws)
    names = [name] if name is not None else _known_names(client)
    return [v for n in names for v in _versions(client, n, _holders_of(_registered(client, ws, n)))]


def alias_holder(workspace, name: str, alias: str) -> Version | None:
    """The version holding `name@alias` now, None when no version does (an unknown name is NotFoundError)."""
    ws = Path(workspace)
    client = _client(ws)
    holders = _holders_of(_registered(client, ws, name))
    if alias not in holders:
        return None
    return _version(client.get_model_version(name, str(holders[alias])), holders)


# ----------------------------------------------------------------------------------------------------
# registering: lineage, tracking run, model card


def _sha256_file(path: Path) -> str | None:
    if not path.exists():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git_commit(folder: Path) -> str | None:
    """The commit of the git repository holding `folder`, None outside one (or without git)."""
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _read_report(run_dir: Path) -> dict | None:
    f = Path(run_dir) / REPORT_JSON
    if not f.exists():
        return None
    doc = read_json(f)
    return doc if isinstance(doc, dict) and isinstance(doc.get("headline"), dict) else None


def _report_tags(run_dir: Path) -> dict[str, str]:
    """The headline metrics of the run's report.json and where it is (nothing when there is no report)."""
    report = _read_report(run_dir)
    if report is None:
        return {}
    h = report["headline"]
    tags = {"report": str(Path(run_dir) / REPORT_JSON), "headline.metric": str(h.get("metric")),
            "headline.direction": str(h.get("direction"))}
    for system, value in (h.get("values") or {}).items():
        tags[f"headline.{system}"] = "none" if value is None else repr(float(value))
    test = report.get("test") or {}
    if test.get("fingerprint"):
        tags["report.test_fingerprint"] = str(test["fingerprint"])
    if test.get("n") is not None:
        tags["report.test_n"] = str(test["n"])
    return tags


def _lineage(workspace: Path, run: Run, parent: Version | None, tracking_run: str) -> dict[str, str]:
    import tuneloop

    info = run.info
    tags: dict[str, Any] = {
        "task": info.task, "run_dir": str(run.dir), "run_name": info.name, "method": info.method,
        "base_model": info.base_model, "base_weights_sha256": info.base_weights_sha256,
        "data.train": info.data.train, "data.validation": info.data.validation, "data.test": info.data.test,
        "recipe": str(run.dir / RECIPE), "recipe_name": run.recipe.name,
        "recipe_sha256": _sha256_file(run.dir / RECIPE), "tuneloop_version": tuneloop.__version__,
        "git_commit": _git_commit(workspace), "parent": parent.ref if parent else None,
        "mlflow_run_id": tracking_run,
        "labels": json.dumps(info.labels) if info.labels else None,
        "target": info.target.field if info.target else None,
        **_report_tags(run.dir),
    }
    return {k: _tag(v) for k, v in tags.items() if v is not None}


def _tag(value: Any) -> str:
    s = str(value)
    return s if len(s) <= _TAG_MAX else s[: _TAG_MAX - 1] + "…"


def _tracking_run(workspace: Path, run: Run) -> str:
    """The MLflow run the training logged to; a run folder without one (trained before the registry, or
    copied from another workspace) gets a tracking run now, remembered in its run.json."""
    from mlflow.exceptions import MlflowException

    from .tracking import log_to_mlflow

    run_id = run.info.mlflow_run_id
    if run_id:
        try:
            _client(workspace).get_run(run_id)
            return run_id
        except MlflowException:
            pass  # not in this workspace's store
    metrics = {k: v for k, v in run.train_metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    run_id = log_to_mlflow(workspace, run.recipe.name, run.dir.name, run.recipe.model_dump(mode="json"), metrics,
                           artifacts=[run.dir / RECIPE, run.dir / DATA, run.dir / LOSS_PLOT],
                           tags={"stage": "register"})
    set_mlflow_run_id(run.dir, run_id)
    return run_id


def register(workspace, run, name: str | None = None, parent: str | Version | None = None) -> Version:
    """Register a finished run folder as the next version of `name` (default: its recipe's name), with its
    lineage as tags and a model card. `parent`: the version it was retrained from (NAME:V or NAME@ALIAS)."""
    from mlflow.exceptions import MlflowException

    ws = Path(workspace)
    opened = open_run(run, ws)
    # the source of a version is an absolute path: it is looked up from any working directory
    opened = replace(opened, dir=opened.dir.resolve())
    name = _check_name(name or default_name(opened.recipe.name))
    parent_v = parent if isinstance(parent, Version) else (resolve(ws, parent) if parent else None)
    client = _client(ws)
    with _lock(ws, name):
        try:
            rm = client.get_registered_model(name)
        except MlflowException as e:
            if not _missing(e):
                raise
            rm = client.create_registered_model(name, tags={"task": opened.task},
                                                description=f"tuneloop {opened.task} models")
        task = (rm.tags or {}).get("task")
        if task and task != opened.task:
            raise ConfigError(f"{opened.dir}: a {opened.task} run; {name} holds {task} models (a gate compares "
                              f"versions of one task); register it under another --name")
        for v in _versions(client, name, _holders_of(rm)):
            if v.run_dir == opened.dir:
                raise ConfigError(f"{opened.dir}: already registered as {v.ref}")
        tracking = _tracking_run(ws, opened)
        tags = _lineage(ws, opened, parent_v, tracking)
        mv = client.create_model_version(name, source=str(opened.dir), run_id=tracking, tags=tags,
                                         description=f"{opened.task} run {opened.dir.name}")
        version = _version(mv, {})
        card = write_model_card(ws, version)
        client.set_model_version_tag(name, str(version.version), "model_card", str(card))
        return resolve(ws, version.ref)


# ----------------------------------------------------------------------------------------------------
# the model card


def _interval(values: list[float], seed: int = 0, n_boot: int = 2000) -> tuple[float, float] | None:
    """95% percentile-bootstrap interval of a mean over examples."""
    if len(values) < 2:
        return None
    import numpy as np

    x = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    # in chunks: all resamples of a 10k-example test set at once would be 160 MB
    means = np.concatenate([x[rng.integers(0, len(x), size=(min(100, n_boot - i), len(x)))].mean(axis=1)
                            for i in range(0, n_boot, 100)])
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def headline_intervals(report: dict) -> dict[str, tuple[float, float] | None]:
    """system → the 95% interval of its headline metric, from the report's per-example predictions."""
    field = _PER_EXAMPLE.get(report["headline"]["metric"])
    out: dict[str, tuple[float, float] | None] = {}
    for system, preds in (report.get("predictions") or {}).items():
        vals = [float(p[field]) for p in (preds or {}).values() if p is not None and p.get(field) is not None] \
            if field else []
        out[system] = _interval(vals)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _data_sizes(run_dir: Path) -> dict[str, Any]:
    f = Path(run_dir) / DATA
    try:
        d = json.loads(f.read_text()) if f.exists() else {}
    except json.JSONDecodeError:
        d = {}
    # classify's data.json says `used`; sft and regress say `train_records`
    return {"train": d.get("train_records", d.get("used")), "validation": d.get("val_records"),
            "test": d.get("test_records")}


def model_card(version: Version, run: Run) -> str:
    """A Hugging Face style model card: YAML front matter, then what it is for, data, metrics, limits."""
    import yaml

    info, report = run.info, _read_report(run.dir)
    adapter = is_adapter(run.model_dir)
    metric = report["headline"]["metric"] if report else None
    front: dict[str, Any] = {"base_model": info.base_model, "library_name": "peft" if adapter else "transformers",
                             "tags": ["tuneloop", info.task, info.method], "model_name": version.ref}
    if metric:
        front["metrics"] = [metric]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {version.ref}", ""]

    what = {"classify": "a text classifier", "regress": "a regressor (predicts a number from a rendered row)",
            "sft": "an instruction-tuned text generator"}.get(info.task, info.task)
    lines += ["## What it is for", "",
              f"{what.capitalize()}, fine-tuned by tuneloop ({info.method}) from `{info.base_model}` with the "
              f"recipe `{run.recipe.name}`."]
    if info.labels:
        lines.append(f"Labels: {', '.join(f'`{x}`' for x in info.labels)}.")
    if info.target:
        lines.append(f"Target: `{info.target.field}` (training mean {info.target.mean:.4g}, std "
                     f"{info.target.std:.4g}).")
    lines += ["", "## Data", "", "| split | records | fingerprint |", "|---|---|---|"]
    sizes = _data_sizes(run.dir)
    if report and sizes["test"] is None:
        sizes["test"] = (report.get("test") or {}).get("n")
    for split in ("train", "validation", "test"):
        lines.append(f"| {split} | {_fmt(sizes[split]) if sizes[split] is not None else '—'} | "
                     f"`{getattr(info.data, split) or '—'}` |")

    limits: list[str] = []
    lines += ["", "## Metrics", ""]
    if report is None:
        lines.append("Not measured: the run has no report.json yet.")
        limits.append(f"No evaluation: nothing here says how well it works yet. `tuneloop eval {run.dir}` "
                      f"measures it (a gate does too, and rewrites this card).")
    else:
        test = report.get("test") or {}
        direction = report["headline"].get("direction")
        lines.append(f"On {test.get('n')} test examples (`{test.get('path')}`, fingerprint "
                     f"`{test.get('fingerprint')}`); headline `{metric}` ({direction} is better), with a 95% "
                     f"bootstrap interval over the examples.")
        lines += ["", f"| system | {metric} | 95% interval | other metrics |", "|---|---|---|---|"]
        intervals = headline_intervals(report)
        for system, m in (report.get("systems") or {}).items():
            iv = intervals.get(system)
            others = ", ".join(f"{k} {_fmt(v)}" for k, v in m.items()
                               if k != metric and isinstance(v, (int, float)) and not isinstance(v, bool))
            lines.append(f"| {system} | {_fmt(m.get(metric))} | "
                         f"{f'[{iv[0]:.4f}, {iv[1]:.4f}]' if iv else '—'} | {others or '—'} |")
            if iv is None:
                limits.append(f"`{system}`: no interval (fewer than two per-example scores).")
        if info.data.test and test.get("fingerprint") and test["fingerprint"] != info.data.test:
            limits.append("The report's test set is not the test split training held out (different fingerprints).")
        if test.get("n") is not None and test["n"] < 100:
            limits.append(f"Measured on {test['n']} examples only: the intervals are wide.")
        limits += [str(n) for n in report.get("notes") or []]
        limits.append("Measured on the test set above only: no slices, fairness or robustness checks beyond it.")

    lines += ["", "## Lineage", "", "| | |", "|---|---|"]
    for key in ("base_model", "base_weights_sha256", "data.train", "data.validation", "data.test", "recipe",
                "recipe_sha256", "tuneloop_version", "git_commit", "parent", "mlflow_run_id", "run_dir"):
        if key in version.tags:
            lines.append(f"| {key} | `{version.tags[key]}` |")
    lines += ["", "## Limits", ""] + [f"- {x}" for x in limits]
    return "\n".join(lines) + "\n"


def write_model_card(workspace, version: Version) -> Path:
    """(Re)write a version's card from its run folder as it is now (a report made later shows up)."""
    path = _registry_dir(Path(workspace), version.name) / str(version.version) / MODEL_CARD
    write_text_atomic(path, model_card(version, open_run(version.run_dir)))
    return path


# ----------------------------------------------------------------------------------------------------
# gate records, promotion, rollback, history


def _gate_key(against: Version) -> str:
    return f"gate.{against.name}.{against.version}"


def record_gate(workspace, candidate: Version, against: Version, report_path: Path, passed: bool) -> None:
    """Remember on the candidate that it passed (or failed) the gate against `against`, and which gate report
    says so. The candidate's report tags and card are refreshed: the gate may have evaluated it just now."""
    ws = Path(workspace)
    client = _client(ws)
    cand = resolve(ws, candidate.ref)
    against = resolve(ws, against.ref)
    value = {"against": against.ref, "report": str(Path(report_path).resolve()), "passed": bool(passed),
             "time": _now()}
    client.set_model_version_tag(cand.name, str(cand.version), _gate_key(against), json.dumps(value))
    for v in (cand, against):
        for k, tv in _report_tags(v.run_dir).items():
            if v.tags.get(k) != tv:
                client.set_model_version_tag(v.name, str(v.version), k, tv)
        write_model_card(ws, resolve(ws, v.ref))


def gate_record(candidate: Version, against: Version) -> dict | None:
    """What `record_gate` remembered about `candidate` against `against` (None: never gated against it)."""
    raw = candidate.tags.get(_gate_key(against))
    try:
        return json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return None


def _history_file(workspace: Path, name: str) -> Path:
    return _registry_dir(workspace, name) / HISTORY_FILE


def _append_history(workspace: Path, name: str, event: dict) -> None:
    append_line_durable(_history_file(workspace, name), json.dumps(event, sort_keys=False))


def history(workspace, name: str) -> list[dict]:
    """Every alias change of `name` in time order: {time, alias, from, to, how, gate_report, why, by}."""
    ws = Path(workspace)
    _registered(_client(ws), ws, name)
    f = _history_file(ws, name)
    if not f.exists():
        return []
    raw = f.read_bytes().decode("utf-8")
    lines = raw.split("\n")
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) and not raw.endswith("\n"):
                continue  # a line torn by a crash mid-append: the change it describes did not happen
            raise ConfigError(f"{f}:{i}: not valid JSON ({e.msg})") from None
    return out


def _move(workspace: Path, client, version: Version, alias: str, holder: Version | None, how: str,
          gate_report: str | None, why: str | None) -> Version:
    client.set_registered_model_alias(version.name, alias, str(version.version))
    event = {"time": _now(), "alias": alias, "from": holder.ref if holder else None, "to": version.ref,
             "how": how, "gate_report": gate_report, "why": why, "by": f"{getpass.getuser()}@{socket.gethostname()}"}
    try:
        _append_history(workspace, version.name, event)
    except BaseException:
        # an alias change the history does not record must not stand
        if holder is not None:
            client.set_registered_model_alias(version.name, alias, str(holder.version))
        else:
            client.delete_registered_model_alias(version.name, alias)
        raise
    return resolve(workspace, version.ref)


def promote(workspace, ref: str, alias: str = "production", force: bool = False, why: str | None = None) -> Version:
    """Move `alias` to the version `ref` names. It needs a passing gate report against the alias's current
    holder (see `record_gate`), or `force` with a reason; the first holder of an alias needs neither."""
    ws = Path(workspace)
    _check_alias(alias)
    why = why.strip() if why and why.strip() else None
    if force and why is None:
        raise ConfigError("--force needs --why \"...\": the history records why a promotion skipped the gate")
    name, _, _ = parse_ref(ref)
    client = _client(ws)
    with _lock(ws, name):
        cand = resolve(ws, ref)
        holder = alias_holder(ws, cand.name, alias)
        if holder is not None and holder.version == cand.version:
            return cand  # already there; nothing changes and nothing is recorded
        if holder is None:
            return _move(ws, client, cand, alias, None, "first", None, why)
        record = gate_record(cand, holder)
        passed = bool(record and record.get("passed") and Path(record.get("report", "")).exists())
        if passed:
            return _move(ws, client, cand, alias, holder, "gate", record["report"], why)
        if force:
            return _move(ws, client, cand, alias, holder, "force", record.get("report") if record else None, why)
        if record is None:
            reason = f"it was never gated against {holder.ref}"
        elif not record.get("passed"):
            reason = f"it failed the gate against {holder.ref} ({record.get('report')})"
        else:
            reason = f"its gate report against {holder.ref} is gone ({record.get('report')})"
        raise ConfigError(f"{cand.ref}: not promoted to {name}@{alias}: {reason}. Run `tuneloop gate {cand.ref} "
                          f"--against {name}@{alias} --promote`, or `--force --why \"...\"`")


def _chain(events: list[dict], alias: str) -> list[str]:
    """The chain of holders of `alias` that a rollback walks back: a promotion pushes, a rollback pops."""
    stack: list[str] = []
    for e in events:
        if e.get("alias") != alias:
            continue
        if e.get("how") == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != e.get("to"):
                stack.append(e.get("to"))
        else:
            stack.append(e.get("to"))
    return stack


def rollback(workspace, name: str, alias: str = "production") -> Version:
    """Move `alias` back to the version that held it before the current holder, and record it."""
    ws = Path(workspace)
    _check_alias(alias)
    client = _client(ws)
    with _lock(ws, name):
        holder = alias_holder(ws, name, alias)
        if holder is None:
            raise NotFoundError(f"{name}@{alias}: no version holds this alias; nothing to roll back")
        chain = _chain(history(ws, name), alias)
        if not chain or chain[-1] != holder.ref:
            raise ConfigError(f"{name}@{alias} is held by {holder.ref}, but the history says "
                              f"{chain[-1] if chain else 'nothing'}: the alias was moved outside tuneloop; "
                              f"promote the version you want explicitly")
        if len(chain) < 2:
            raise ConfigError(f"{name}@{alias}: {holder.ref} is the first holder; there is nothing to roll back to")
        target = resolve(ws, chain[-2])
        return _move(ws, client, target, alias, holder, "rollback", None, None)
