"""Workspaces and THE run folder: every file name inside a run, its typed description (`RunInfo`, kept in
`run.json`), and the two ways in: `open_run` (read it) and `load_for_inference` (get a model that reads
inputs exactly as training did). Every reader (eval, serve, sweep, quickstart, resume) goes through them.

A run folder holds:

    run.json            RunInfo: format version, task, status, base model + weights hash, data fingerprints,
                        labels, input spec, metrics, times (written at start, on failure, at the end)
    recipe.yaml         the recipe it was trained with (data paths absolute; users read and may edit it)
    data.json           what the recipe's data loader found (counts, truncation)
    labels.json         classify: the label order of the head
    decision.json       classify, when fitted: per-class logit offsets tuned on validation (infer/decision.py)
    target.json         regress: the target's field, mean and std (predictions come back in real units)
    train_metrics.json  the training metrics
    history.json        {"train": [{step, loss, lr, ...}], "validation": [[step, train_loss, val_loss], ...]}
    loss.png            the loss curve
    test.jsonl          the held-out test records (sft, regress; when the recipe has no data.test)
    train_tail.jsonl    regress: the latest training rows (the seasonal baseline looks back into them)
    model/              the adapter (PEFT) or the full weights; sft, dpo and kto also keep the tokenizer here
                        (dpo / kto started from another run: its adapter is over the base with that run's
                        adapters merged in, `RunInfo.merged_adapters`)
    checkpoints/last/   while training: the state `--resume` continues from
    report.json/.html   after `tuneloop eval`; generations.jsonl for sft
    FAILED              a marker that training stopped with an error
    exports/            `tuneloop export`'s folders (merged, adapter, gguf, int8), each with its card
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError, NotFoundError
from .fileio import read_json, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from .config import Recipe

DEFAULT_WORKSPACE = "workspace"
FORMAT_VERSION = 1

# ---- the names of everything inside a run folder (spelled here only)
RUN_INFO = "run.json"
RECIPE = "recipe.yaml"
DATA = "data.json"
LABELS = "labels.json"
TARGET = "target.json"
TRAIN_METRICS = "train_metrics.json"
BUDGET = "budget.json"  # the plan under train.time_budget (train/budget.py)
HISTORY = "history.json"
LOSS_PLOT = "loss.png"
TEST_RECORDS = "test.jsonl"
TRAIN_TAIL = "train_tail.jsonl"
MODEL = "model"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last"
CHECKPOINT_STATE = "state.pt"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
GENERATIONS = "generations.jsonl"
DECISION = "decision.json"  # classify: the decision rule fitted on validation (per-class logit offsets)
POOLER = "pooler.safetensors"
FAILED = "FAILED"
FORECASTER = "forecaster.pkl"  # forecast: the boosting models (backtest, all data), lags, scales, residual weight
SERIES = "series.pkl"  # forecast: the time table it was trained on (the history `tuneloop forecast` extends)
BACKTEST_JSON = "backtest.json"  # forecast: the rolling-origin backtest report (and backtest.html)
BACKTEST_HTML = "backtest.html"
EXPORTS = "exports"  # `tuneloop export` writes here by default, one folder per format
# PEFT's and transformers' own names inside model/, which tell an adapter from full weights
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CONFIG = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


def workspace_path(workspace: str | os.PathLike | None = None) -> Path:
    ws = Path(workspace or os.environ.get("TUNELOOP_WORKSPACE") or DEFAULT_WORKSPACE).expanduser().resolve()
    ws.mkdir(parents=True, exist_ok=True)
    return ws


def new_run_dir(workspace: Path, name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = workspace / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for n in range(1000):
        d = runs / (f"{safe}-{stamp}" + (f"-{n}" if n else ""))
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run folder under {runs}")


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run keeps the checkpoint `--resume` continues from."""
    return Path(run_dir) / CHECKPOINTS / LAST_CHECKPOINT


def is_adapter(model_dir: Path) -> bool:
    return (Path(model_dir) / ADAPTER_CONFIG).exists()


def is_run_dir(path: Path) -> bool:
    """A folder that is (or was, in an older format) a run folder."""
    p = Path(path)
    return any((p / f).exists() for f in (RUN_INFO, RECIPE, TRAIN_METRICS))


# ----------------------------------------------------------------------------------------------------
# the typed description


class ChunkSpec(BaseModel):
    """classify with `data.long_inputs: chunk`: how a document is split into windows and pooled."""

    model_config = ConfigDict(extra="forbid")
    overlap: int = Field(description="Text tokens a window shares with the one before.")
    max_chunks: int = Field(description="Windows per document at most.")
    pooling: Literal["mean", "max", "attention"] = Field(description="How the windows' representations pool.")


class InputSpec(BaseModel):
    """How the model reads one input, exactly as training did: inference must build the same tokens."""

    model_config = ConfigDict(extra="forbid")
    template: str | None = Field(None, description="classify: the text's template (`{text}` marks it); "
                                                   "regress: the row template the data layer rendered")
    as_chat: bool = Field(False, description="The template is wrapped as the user turn of the chat template.")
    system_prompt: str | None = Field(None, description="The system turn (chat inputs).")
    truncate: Literal["end", "middle"] = Field("end", description="How a long text is cut.")
    max_length: int = Field(description="Tokens read at inference: eval.max_length, else train.max_length.")
    chunks: ChunkSpec | None = Field(None, description="Chunked reading (None: one window, truncated).")
    clean: Literal["email"] | None = Field(None, description="The cleaning step every text goes through first.")


class TargetScale(BaseModel):
    """regress: predictions are standardised; value = z * std + mean."""

    model_config = ConfigDict(extra="forbid")
    field: str
    mean: float
    std: float


class Fingerprints(BaseModel):
    """Content hashes of each split the run used (None where the split was not known to training)."""

    model_config = ConfigDict(extra="forbid")
    train: str | None = None
    validation: str | None = None
    test: str | None = None


class RunInfo(BaseModel):
    """`run.json`: what a run is. The recipe itself is `recipe.yaml` (parsed once, by `open_run`)."""

    model_config = ConfigDict(extra="forbid")
    format_version: int = FORMAT_VERSION
    task: str
    name: str
    status: Literal["running", "failed", "finished"]
    created: str
    finished: str | None = None
    base_model: str = Field(description="The recipe's `model`: a zoo name, a folder or a hub id.")
    model_path: str | None = Field(None, description="What `base_model` resolved to when training ran.")
    base_weights_sha256: str | None = Field(None, description="sha256 over the base's safetensors files.")
    method: str
    dtype: str | None = None
    labels: list[str] | None = None
    target: TargetScale | None = None
    input: InputSpec
    data: Fingerprints = Field(default_factory=Fingerprints)
    metrics: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    mlflow_run_id: str | None = Field(None, description="The MLflow tracking run this run was logged to "
                                                        "(the registry links a version to it).")
    parent_run: str | None = Field(None, description="dpo / kto: the run folder this run started from (its "
                                                     "model is the reference), None when it started from a base.")
    merged_adapters: list[str] = Field(default_factory=list, description="Adapter folders merged into the base, "
                                       "in order, before this run's own adapter goes on (the parent run's chain).")


def input_spec(recipe: "Recipe") -> InputSpec:
    """The input spec of a recipe. Inference reads as far as the report measured (`eval.max_length`),
    else as far as training read."""
    dc = recipe.data
    max_length = recipe.eval.max_length or recipe.train.max_length
    if recipe.task == "classify":
        chunks = ChunkSpec(overlap=dc.chunk_overlap, max_chunks=dc.max_chunks, pooling=dc.chunk_pooling) \
            if dc.long_inputs == "chunk" else None
        return InputSpec(template=dc.input_template, as_chat=dc.as_chat, system_prompt=dc.system_prompt,
                         truncate=dc.truncate, max_length=max_length, chunks=chunks, clean=dc.clean)
    if recipe.task == "regress":
        return InputSpec(template=dc.template, max_length=max_length)
    return InputSpec(as_chat=True, max_length=max_length)  # sft: the conversation carries its own turns


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _hash_cache_file() -> Path:
    from .zoo import cache_dir

    return cache_dir() / "weights-sha256.json"


def weights_sha256(model_path: str | os.PathLike) -> str | None:
    """sha256 over the bytes of a model folder's safetensors files (sorted by name), None for a hub id or
    a folder without them. Cached by path, size and mtime: a run does not re-read 500 MB of weights."""
    folder = Path(model_path).expanduser()
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = f"{folder.resolve()}|{stats}"
    cache_file = _hash_cache_file()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    # entries of folders that are gone (temporary models, deleted runs) are dropped as new ones come
    cache = {k: v for k, v in cache.items() if Path(k.split("|", 1)[0]).is_dir()}
    cache[key] = h.hexdigest()
    try:
        write_json_atomic(cache_file, cache)
    except OSError:
        pass  # a read-only cache costs a re-hash next time, nothing else
    return cache[key]


def _write_info(run_dir: Path, info: RunInfo) -> None:
    write_json_atomic(Path(run_dir) / RUN_INFO, info.model_dump(mode="json"))


def _read_info(run_dir: Path) -> RunInfo | None:
    f = Path(run_dir) / RUN_INFO
    if not f.exists():
        return None
    doc = read_json(f)
    version = doc.get("format_version") if isinstance(doc, dict) else None
    if version != FORMAT_VERSION:
        raise ConfigError(f"{f}: format_version {version!r}, this tuneloop reads {FORMAT_VERSION}; "
                          f"retrain the run with this version")
    try:
        return RunInfo.model_validate(doc)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ConfigError(f"{f}: {where}: {first['msg']}") from None


def start_run(run_dir: Path, recipe: "Recipe") -> RunInfo:
    """Mark a run as running (a fresh one, or one being resumed: its creation time stays)."""
    old = _read_info(run_dir) if (Path(run_dir) / RUN_INFO).exists() else None
    info = old.model_copy(update={"status": "running", "finished": None, "error": None}) if old else RunInfo(
        task=recipe.task, name=recipe.name, status="running", created=_now(), base_model=recipe.model,
        method=recipe.method.name, input=input_spec(recipe))
    _write_info(run_dir, info)
    (Path(run_dir) / FAILED).unlink(missing_ok=True)
    return info


def fail_run(run_dir: Path, recipe: "Recipe", error: BaseException) -> None:
    """Mark a run as failed: `run.json` says so, and a FAILED marker says it at a glance."""
    info = _read_info(run_dir) if (Path(run_dir) / RUN_INFO).exists() else None
    info = info or RunInfo(task=recipe.task, name=recipe.name, status="failed", created=_now(),
                           base_model=recipe.model, method=recipe.method.name, input=input_spec(recipe))
    text = f"{type(error).__name__}: {error}".strip()
    _write_info(run_dir, info.model_copy(update={"status": "failed", "finished": _now(), "error": text[:2000]}))
    write_text_atomic(Path(run_dir) / FAILED, "training did not finish\n")


def set_mlflow_run_id(run_dir: Path, run_id: str) -> RunInfo:
    """Remember the MLflow tracking run of a run folder in its `run.json`."""
    info = _read_info(run_dir)
    if info is None:
        raise NotFoundError(f"{run_dir}: not a run folder (no {RUN_INFO})")
    info = info.model_copy(update={"mlflow_run_id": run_id})
    _write_info(run_dir, info)
    return info


def write_recipe(run_dir: Path, recipe: "Recipe") -> None:
    from .config import recipe_to_yaml

    write_text_atomic(Path(run_dir) / RECIPE, recipe_to_yaml(recipe))


def write_data_info(run_dir: Path, data: dict) -> None:
    write_json_atomic(Path(run_dir) / DATA, data)


def write_history(run_dir: Path, train: list[dict], validation: list) -> None:
    """The loss history, one shape for every task."""
    write_json_atomic(Path(run_dir) / HISTORY, {"train": train, "validation": [list(v) for v in validation]})


def write_decision(run_dir: Path, decision: dict) -> None:
    write_json_atomic(Path(run_dir) / DECISION, decision)


def read_decision(run_dir: Path) -> dict | None:
    """The run's decision rule, or None (plain argmax)."""
    f = Path(run_dir) / DECISION
    return read_json(f) if f.exists() else None


def read_history(run_dir: Path) -> dict:
    f = Path(run_dir) / HISTORY
    return json.loads(f.read_text()) if f.exists() else {"train": [], "validation": []}


def finish_run(run_dir: Path, recipe: "Recipe", metrics: dict, *, model_path: str,
               fingerprints: Fingerprints, labels: list[str] | None = None,
               target: TargetScale | None = None, start: "StartPoint | None" = None) -> RunInfo:
    """The end of a recipe's save section: labels / target scale, train_metrics.json, the finished
    `run.json`, and no checkpoint left (nothing to resume). Written last: a run is finished only once
    `run.json` says so."""
    run_dir = Path(run_dir)
    if labels is not None:
        write_json_atomic(run_dir / LABELS, labels)
    if target is not None:
        write_json_atomic(run_dir / TARGET, target.model_dump())
    write_json_atomic(run_dir / TRAIN_METRICS, metrics)
    old = _read_info(run_dir) if (run_dir / RUN_INFO).exists() else None
    info = RunInfo(
        task=recipe.task, name=recipe.name, status="finished", created=old.created if old else _now(),
        finished=_now(), base_model=recipe.model, model_path=model_path,
        base_weights_sha256=weights_sha256(model_path), method=recipe.method.name, dtype=metrics.get("dtype"),
        labels=labels, target=target, input=input_spec(recipe), data=fingerprints,
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None},
        parent_run=str(start.run) if start is not None and start.run is not None else None,
        merged_adapters=list(start.merged) if start is not None else [])
    _write_info(run_dir, info)
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    (run_dir / FAILED).unlink(missing_ok=True)
    return info


# ----------------------------------------------------------------------------------------------------
# reading a run


@dataclass
class Run:
    """An opened run folder: its typed info, its recipe (parsed once) and the paths of its files."""

    dir: Path
    info: RunInfo
    recipe: "Recipe"

    @property
    def task(self) -> str:
        return self.info.task

    @property
    def model_dir(self) -> Path:
        return self.dir / MODEL

    @property
    def is_adapter(self) -> bool:
        return is_adapter(self.model_dir)

    @property
    def train_metrics(self) -> dict:
        f = self.dir / TRAIN_METRICS
        return json.loads(f.read_text()) if f.exists() else dict(self.info.metrics)

    def base_model_path(self) -> str:
        """The base model of this run, found one way: the folder training used if it is still there, else
        the recipe's model resolved on this machine (a zoo name to its cached folder, a hub id as is)."""
        p = self.info.model_path
        if p and Path(p).expanduser().is_dir():
            return p
        from .zoo import resolve_model

        try:
            return resolve_model(self.info.base_model)
        except NotFoundError as e:
            raise NotFoundError(f"{self.dir}: its base model {self.info.base_model!r} is not on this machine "
                                f"({e})") from None

    def tokenizer_path(self) -> str:
        """sft saves the tokenizer it trained with beside the adapter; the heads read the base's."""
        if (self.model_dir / TOKENIZER_CONFIG).exists():
            return str(self.model_dir)
        return self.base_model_path()


def locate_run(run: str | os.PathLike, workspace: Path | None = None) -> Path:
    """A run folder given as a path, or as a name under `<workspace>/runs/`."""
    p = Path(run).expanduser()
    if not p.is_dir() and workspace is not None and (Path(workspace) / "runs" / str(run)).is_dir():
        p = Path(workspace) / "runs" / str(run)
    if not p.is_dir():
        raise NotFoundError(f"{run}: no such run folder")
    return p


def open_run(run: "str | os.PathLike | Run", workspace: Path | None = None, finished: bool = True) -> Run:
    """Open a run folder (a path or a name under `<workspace>/runs/`). `finished`: refuse one whose training
    did not finish (False for `--resume`)."""
    if isinstance(run, Run):
        return run
    p = locate_run(run, workspace)
    info = _read_info(p)
    if info is None:
        if is_run_dir(p):
            raise ConfigError(f"{p}: a run folder from an older tuneloop (no {RUN_INFO} with a format_version); "
                              f"retrain it with this version")
        raise NotFoundError(f"{p}: not a run folder (no {RUN_INFO})")
    if finished and info.status != "finished":
        hint = (f"`tuneloop train --resume {p}` continues it" if checkpoint_dir(p).exists()
                else "it left no checkpoint; train it again")
        raise ConfigError(f"{p}: training did not finish (status {info.status}); {hint}")
    if not (p / RECIPE).exists():
        raise NotFoundError(f"{p}: {RECIPE} is missing")
    from .config import load_recipe

    return Run(dir=p, info=info, recipe=load_recipe(p / RECIPE))


# The tasks whose run a dpo / kto recipe may start from: causal LMs whose adapter can be merged into the base.
STARTS_FROM = ("sft", "dpo", "kto")


@dataclass
class StartPoint:
    """What a recipe's `model` starts training from: the base model (`from_pretrained` path), the adapter
    folders merged into it first (in order), and the run they come from (None for a plain model)."""

    base: str
    merged: list[str]
    run: Path | None = None


def start_point(model: str, workspace: Path | None = None) -> StartPoint:
    """Resolve a recipe's `model`: a zoo name / folder / hub id as it is, or a run folder (a path, a name
    under `<workspace>/runs/`, or a registry ref NAME:VERSION / NAME@ALIAS) of an sft, dpo or kto run. A
    run's adapter is merged into its base (after the adapters it was itself started on), so the new run's
    reference is exactly that run's model; a run with full weights is itself the base."""
    from .zoo import resolve_model

    folder = None
    p = Path(model).expanduser()
    if p.is_dir() and is_run_dir(p):
        folder = p
    elif workspace is not None and not p.is_dir() and (Path(workspace) / "runs" / model).is_dir():
        folder = Path(workspace) / "runs" / model
    elif workspace is not None and not p.exists():
        from .registry import is_ref, resolve

        if is_ref(model):
            folder = resolve(workspace, model).run_dir
    if folder is None:
        return StartPoint(base=resolve_model(model), merged=[])
    run = open_run(folder)
    if run.task not in STARTS_FROM:
        raise ConfigError(f"model: {folder} is a {run.task} run; training can start from a "
                          f"{', '.join(STARTS_FROM)} run (a causal LM)")
    if not run.is_adapter:
        return StartPoint(base=str(run.model_dir), merged=[], run=run.dir)
    return StartPoint(base=run.base_model_path(), merged=[*run.info.merged_adapters, str(run.model_dir)], run=run.dir)


@dataclass
class Loaded:
    """A run ready for inference: the model (eval mode, on `device`), its tokenizer and how it reads inputs."""

    run: Run
    task: str
    model: Any
    tokenizer: Any
    dtype: Any
    device: Any
    input: InputSpec
    labels: list[str] | None = None
    target: TargetScale | None = None
    # classify: the decision rule's offsets in label order (decision.json), None for plain argmax
    decision: list[float] | None = None

    @property
    def autocast(self) -> bool:
        """bf16 weights compute under bf16 autocast (fp32 adapters included), as in training."""
        import torch

        return self.dtype == torch.bfloat16


def load_for_inference(run: "Run | str | os.PathLike", device=None, base=None) -> Loaded:
    """The run's trained model, loaded by its task's loader (infer/loaders.py). `base`: an already loaded
    base model to put the adapter on (eval loads the base once for both systems)."""
    import torch

    from .infer.device import device as default_device
    from .infer.loaders import LOADERS

    run = open_run(run)
    if run.task not in LOADERS:
        raise ConfigError(f"{run.dir}: task {run.task!r} has no inference loader (known: {', '.join(sorted(LOADERS))})")
    dev = device or default_device()
    dtype = getattr(torch, run.info.dtype or "float32")
    # a run started from another carries the adapters merged into its base before its own
    merged = {"merged": run.info.merged_adapters} if run.info.merged_adapters else {}
    model, tok = LOADERS[run.task](run.model_dir, run.is_adapter, run.base_model_path(), run.tokenizer_path(),
                                   dtype, dev, labels=run.info.labels, base=base, **merged)
    decision = None
    if run.task == "classify":
        from .infer.decision import offsets_for

        decision = offsets_for(read_decision(run.dir), run.info.labels or [])
    if run.info.input.chunks is not None:
        from .infer.chunks import load_pooler

        load_pooler(model, run.info.input.chunks.pooling, run.dir / POOLER)
    return Loaded(run=run, task=run.task, model=model, tokenizer=tok, dtype=dtype, device=dev,
                  input=run.info.input, labels=run.info.labels, target=run.info.target, decision=decision)
