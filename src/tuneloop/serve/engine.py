"""The generation engine: one base model in memory, any number of LoRA adapters over it, continuous batching.

One thread owns the model. Every step it (1) applies queued admin work (load / replace / unload an
adapter, classify calls), (2) admits waiting requests into free slots with one batched prefill, and
(3) runs one decode step for every running request. Requests for different adapters share a batch
through PEFT's mixed-adapter forward (`adapter_names=[...]`, `"__base__"` for the plain model).

Rows of a batch have different lengths, so the KV cache is kept left-padded: a new group of requests is
prefilled on its own and then joined to the running cache by padding both on the left; rows that finish
are dropped with an index-select, and columns that became all padding are trimmed. Position ids are
given per row, so padding never shifts a sequence.

Hot-swap: each load gets a fresh internal adapter name; the public name points at the newest one. A
request holds the internal name it was admitted with, so it finishes on the weights it started with;
a replaced or unloaded adapter is deleted once no request holds it any more.

Every served name knows which version it serves (`AdapterInfo.version`: `NAME:VERSION` for a registered
version, else the run or adapter folder's name); a request records the version it was admitted on, so
its answer names the weights that really produced it, even when a swap lands while it runs.
"""

from __future__ import annotations

import itertools
from collections import deque
import json
import queue
import re
import threading
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import ConfigError, NotFoundError, TuneloopError
from ..runs import ADAPTER_CONFIG, RUN_INFO, Loaded, is_adapter, is_run_dir, load_for_inference, open_run

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch

# Public model names: what a request may put in `model`. No slashes, no `..`: a name is never a path.
# `@` and `:` leave room for registry aliases such as `reviews@production`.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,127}$")


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise ConfigError(
            f"model name {name!r} is not allowed: use letters, digits and _ . @ : - (at most 128, no paths)"
        )
    return name


class QueueFull(TuneloopError):
    """Every slot is busy and the waiting queue is at its bound."""


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    min_tokens: int = 0  # end-of-sequence is suppressed until this many tokens (as in vLLM)


@dataclass
class GenRequest:
    """One generation. The engine calls `on_token(id)` per new token and `on_finish(reason)` once."""

    prompt_ids: list[int]
    params: SamplingParams
    on_token: Callable[[int], None]
    on_finish: Callable[[str], None]
    adapter: str = BASE  # internal adapter name, set by `Engine.submit`
    model_name: str = ""
    version: str = ""  # the version `adapter` is, set by `Engine.submit`
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False
    generator: torch.Generator | None = None
    submitted_at: float = field(default_factory=time.time)


@dataclass
class AdapterInfo:
    name: str  # public
    internal: str  # PEFT adapter name (module-dict key: no dots)
    path: str
    kind: str  # "generate" (causal-LM LoRA over the shared base) or "classify"
    loaded_at: float
    labels: list[str] | None = None
    version: str = ""  # `NAME:VERSION` of a registered version, else the run (or adapter) folder's name
    follows: str | None = None  # `NAME@ALIAS` whose holder this name serves (serve/follow.py keeps it current)


# What a run of each task is served as; a task missing here cannot be served.
# dpo / kto runs are causal LMs with an adapter, served like sft (reward runs score, they do not answer).
SERVED_AS = {"classify": "classify", "sft": "generate", "dpo": "generate", "kto": "generate"}


@dataclass
class _Batch:
    """The running rows and their left-padded KV cache."""

    rows: list[GenRequest]
    cache: object  # transformers DynamicCache
    mask: torch.Tensor  # (rows, columns) 1 = real token
    pos: list[int]  # next position id per row
    last: list[int]  # last token per row (the next step's input)


def read_run_info(path: Path) -> dict:
    """What a run folder or a plain PEFT adapter folder holds: kind, adapter folder, base model."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise NotFoundError(f"{path}: no such folder")
    if is_run_dir(path):
        run = open_run(path)
        kind = SERVED_AS.get(run.task)
        if kind is None:
            raise ConfigError(f"{path}: a {run.task} run; serving knows {', '.join(sorted(SERVED_AS))} runs")
        if kind == "generate" and not run.is_adapter:
            raise ConfigError(
                f"{run.model_dir}: full fine-tuned weights, not a LoRA adapter; serve it as the base "
                f"(tuneloop serve --model {path})"
            )
        if run.info.merged_adapters:
            # The engine puts each adapter on one shared base; this adapter was trained on a base with its
            # parent's adapter merged in, so on the shared base it would answer as neither model.
            raise ConfigError(
                f"{path}: a {run.task} run trained on top of {run.info.parent_run or 'another run'} (its adapter "
                f"merged into the base); the server shares one base between adapters and cannot serve it. Serve "
                f"the parent, or train this run with `model:` set to the base model")
        return {"kind": kind, "adapter_dir": run.model_dir, "labels": run.info.labels, "run_dir": path, "run": run,
                "base_model": run.info.base_model, "model_path": run.info.model_path}
    if is_adapter(path):
        cfg = json.loads((path / ADAPTER_CONFIG).read_text())
        return {"kind": "generate", "adapter_dir": path, "labels": None, "run_dir": None, "run": None,
                "base_model": cfg.get("base_model_name_or_path"), "model_path": cfg.get("base_model_name_or_path")}
    raise NotFoundError(f"{path}: neither a run folder ({RUN_INFO}) nor a PEFT adapter folder ({ADAPTER_CONFIG})")


def _same_model(a: str | None, b: str) -> bool:
    if not a:
        return True  # nothing recorded to compare against
    from ..zoo import ZOO, converted_dir, resolve_model

    try:
        ra = resolve_model(a) if a in ZOO else a
    except TuneloopError:
        ra = a
    pa, pb = Path(ra).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    # An adapter trained against the hub copy of a bundled model fits the bundled one.
    for spec in ZOO.values():
        if ra == spec.hub_id and Path(b).expanduser().resolve() == converted_dir(spec).resolve():
            return True
    return ra == b


class Engine:
    def __init__(self, base: str, *, base_name: str | None = None, dtype: torch.dtype = torch.float32,
                 max_batch: int = 16, max_queue: int = 64, batch_window_ms: float = 5.0,
                 max_prompt_tokens: int = 2048, max_new_tokens: int = 512, device: torch.device | None = None,
                 base_version: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..infer.device import device as default_device
        from ..zoo import resolve_model

        self.device = device or default_device()
        self.base_path = resolve_model(base)
        self.base_name = validate_name(base_name or _default_base_name(base))
        self.base_version = base_version or _default_base_name(base)
        self.dtype = dtype
        self.max_batch, self.max_queue = max_batch, max_queue
        self.batch_window = batch_window_ms / 1000
        self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens
        self.tok = AutoTokenizer.from_pretrained(self.base_path)
        base_model = AutoModelForCausalLM.from_pretrained(self.base_path, dtype=dtype)
        self.model = base_model.to(self.device).eval()
        self.peft = None  # becomes a PeftModel wrapping `model` when the first adapter is loaded
        cfg = self.model.generation_config
        eos = cfg.eos_token_id if cfg is not None and cfg.eos_token_id is not None else self.tok.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else next(iter(self.stop_ids), 0)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30

        self.adapters: dict[str, AdapterInfo] = {}
        self.classifiers: dict[str, Loaded] = {}
        self._refs: dict[str, int] = {}  # internal adapter → requests holding it
        self._retired: set[str] = set()  # internal adapters to delete once unreferenced
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: list[GenRequest] = []
        self._ops: queue.Queue = queue.Queue()
        self._batch: _Batch | None = None
        self._stop = False
        self._rng = torch.Generator().manual_seed(0)
        # Observability: read by /metrics and by tests.
        self.token_times: deque = deque(maxlen=100_000)  # (time, rows) per decode step, for tokens/s
        self.stats = {"steps": 0, "rows": 0, "tokens": 0, "cancelled": 0, "batch_sizes": {}, "prefills": 0,
                      "max_batch_seen": 0}
        self._thread = threading.Thread(target=self._loop, name="tuneloop-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ names
    def resolve(self, name: str) -> tuple[str, AdapterInfo | None]:
        """A request's `model` → ("base" | "generate" | "classify", adapter). The one place names resolve.

        A registry alias is served under its own name (`reviews@production`), loaded like any adapter.
        """
        validate_name(name)
        if name == self.base_name:
            return "base", None
        info = self.adapters.get(name)
        if info is None:
            known = ", ".join([self.base_name, *sorted(self.adapters)])
            raise NotFoundError(f"model {name!r} is not served here (served: {known})")
        return info.kind, info

    def list_models(self) -> list[dict]:
        out = [{"id": self.base_name, "kind": "base", "path": self.base_path, "created": 0,
                "version": self.base_version, "follows": None}]
        for a in sorted(self.adapters.values(), key=lambda a: a.name):
            out.append({"id": a.name, "kind": a.kind, "path": a.path, "created": int(a.loaded_at),
                        "version": a.version, "follows": a.follows})
        return out

    # ------------------------------------------------------------------ requests
    def queue_depth(self) -> int:
        return len(self._waiting)

    def running(self) -> int:
        b = self._batch
        return len(b.rows) if b else 0

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.time()
        return sum(n for t, n in list(self.token_times) if t > now - window) / window

    def submit(self, req: GenRequest, model_name: str) -> None:
        kind, info = self.resolve(model_name)
        if kind == "classify":
            raise ConfigError(f"model {model_name!r} is a classification run: use /v1/classify")
        with self._lock:
            # Re-read under the lock: an unload may have happened since resolve().
            info = self.adapters.get(model_name) if info is not None else None
            if kind != "base" and info is None:
                raise NotFoundError(f"model {model_name!r} was just unloaded")
            busy = len(self._waiting) + self.running()
            if busy >= self.max_batch and len(self._waiting) >= self.max_queue:
                raise QueueFull(f"server busy: {self.running()} running, {len(self._waiting)} waiting (limit "
                                f"{self.max_queue}); retry shortly")
            req.adapter = info.internal if info else BASE
            req.model_name = model_name
            req.version = info.version if info else self.base_version
            if req.params.seed is not None:
                req.generator = torch.Generator().manual_seed(int(req.params.seed))
            self._refs[req.adapter] = self._refs.get(req.adapter, 0) + 1
            self._waiting.append(req)
            self._wake.notify()

    def cancel(self, req: GenRequest) -> None:
        """Free a request's slot (client gone, stop string seen). Takes effect before the next step."""
        req.cancelled = True
        with self._lock:
            self._wake.notify()

    # ------------------------------------------------------------------ admin (runs on the engine thread)
    def call(self, fn: Callable[[], object]) -> Future:
        fut: Future = Future()
        self._ops.put((fn, fut))
        with self._lock:
            self._wake.notify()
        return fut

    def load_adapter(self, name: str, path: str | Path, version: str | None = None,
                     follows: str | None = None) -> Future:
        """Load or replace adapter `name` from a run folder or a PEFT folder; returns a Future of AdapterInfo.

        `version` names what it is (default: the folder's name); `follows` is the `NAME@ALIAS` it came from.
        """
        validate_name(name)
        if name == self.base_name:
            raise ConfigError(f"adapter name {name!r} is the base model's name")
        info = read_run_info(Path(path))
        info["version"] = version or Path(path).expanduser().resolve().name
        info["follows"] = follows
        if info["kind"] == "classify":
            # A classifier carries its own head and is loaded beside the shared base, so any base fits.
            return self.call(lambda: self._load_classifier(name, info))
        if not _same_model(info["model_path"], self.base_path) and not _same_model(info["base_model"], self.base_path):
            raise ConfigError(f"{path}: trained on {info['base_model'] or info['model_path']}, but this server's "
                              f"base model is {self.base_path}")
        _check_lora(info["adapter_dir"])
        return self.call(lambda: self._load_lora(name, info))

    def unload_adapter(self, name: str) -> Future:
        validate_name(name)
        if name not in self.adapters:
            loaded = ", ".join(sorted(self.adapters)) or "none"
            raise NotFoundError(f"adapter {name!r} is not loaded (loaded: {loaded})")
        return self.call(lambda: self._unload(name))

    def _load_lora(self, name: str, info: dict) -> AdapterInfo:
        from peft import PeftModel

        internal = f"a{next(self._ids)}"
        path = str(info["adapter_dir"])
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, path, adapter_name=internal)
            self.peft.eval()
        else:
            try:
                self.peft.load_adapter(path, adapter_name=internal)
            except BaseException:
                # Leave no half-loaded adapter behind; the one served under `name` stays as it was.
                if internal in self.peft.peft_config:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", UserWarning)
                        self.peft.delete_adapter(internal)
                raise
        new = AdapterInfo(name=name, internal=internal, path=str(info["run_dir"] or path), kind="generate",
                          loaded_at=time.time(), version=info["version"], follows=info["follows"])
        with self._lock:
            old = self.adapters.get(name)
            self.adapters[name] = new
            self.classifiers.pop(name, None)
        if old is not None and old.kind == "generate":
            self._retire(old.internal)
        return new

    def _load_classifier(self, name: str, info: dict) -> AdapterInfo:
        loaded = load_for_inference(info["run"], self.device)
        new = AdapterInfo(name=name, internal="", path=str(info["run_dir"]), kind="classify",
                          loaded_at=time.time(), labels=loaded.labels, version=info["version"],
                          follows=info["follows"])
        with self._lock:
            old = self.adapters.get(name)
            self.adapters[name] = new
            self.classifiers[name] = loaded
        if old is not None and old.kind == "generate":
            self._retire(old.internal)
        return new

    def _unload(self, name: str) -> AdapterInfo | None:
        with self._lock:
            old = self.adapters.pop(name, None)
            self.classifiers.pop(name, None)
        if old is not None and old.kind == "generate":
            self._retire(old.internal)
        return old

    def _retire(self, internal: str) -> None:
        with self._lock:
            self._retired.add(internal)
        self._collect()

    def _collect(self) -> None:
        """Delete retired adapters that no request holds any more (engine thread only)."""
        with self._lock:
            free = [a for a in self._retired if self._refs.get(a, 0) == 0]
            for a in free:
                self._retired.discard(a)
                self._refs.pop(a, None)
        for a in free:
            with warnings.catch_warnings():
                # PEFT re-points its "active" adapter; irrelevant here, every forward names its adapters.
                warnings.simplefilter("ignore", UserWarning)
                self.peft.delete_adapter(a)

    def classify(self, name: str, texts: list[str], max_length: int | None = None) -> Future:
        """A Future of (labels, class probabilities for `texts`, the version that computed them); each text
        is read up to `max_length` tokens, by default as far as the run's report read them (`eval.max_length`),
        so the service delivers the measured accuracy."""
        kind, info = self.resolve(name)
        if kind != "classify":
            raise ConfigError(f"model {name!r} is not a classification run (classification runs: "
                              f"{', '.join(sorted(self.classifiers)) or 'none'})")
        with self._lock:  # the classifier and its version from the same load, even mid-swap
            info, clf = self.adapters.get(name), self.classifiers.get(name)
        if clf is None:
            raise NotFoundError(f"model {name!r} was just unloaded")
        version = info.version

        def run():
            from ..infer.predict import predict_classifier

            spec = clf.input
            probs = predict_classifier(clf.model, clf.tokenizer, texts, batch_size=16,
                                       max_length=max_length or spec.max_length, dtype=clf.dtype,
                                       show_progress=False, template=spec.template or "{text}",
                                       as_chat=spec.as_chat, system=spec.system_prompt, truncate=spec.truncate,
                                       offsets=clf.decision, chunks=spec.chunks, clean=spec.clean)
            return clf.labels, probs, version

        return self.call(run)

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._lock:
                while not self._stop and self._ops.empty() and not self._waiting and self._batch is None:
                    self._wake.wait(timeout=1.0)
                if self._stop:
                    break
            self._run_ops()
            try:
                self._admit()
                self._step()
            except Exception as e:  # a model error must not kill the server: fail the rows, go on
                self._fail_all(e)

        for r in list(self._waiting) + (self._batch.rows if self._batch else []):
            self._finish(r, "cancelled")

    def _run_ops(self) -> None:
        while True:
            try:
                fn, fut = self._ops.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to whoever waits on the future
                fut.set_exception(e)

    def _admit(self) -> None:
        with self._lock:  # a client that left while waiting frees its queue place at once
            gone = [r for r in self._waiting if r.cancelled]
            self._waiting = [r for r in self._waiting if not r.cancelled]
        for r in gone:
            self._finish(r, "cancelled")
        b = self._batch
        free = self.max_batch - (len(b.rows) if b else 0)
        if free <= 0 or not self._waiting:
            return
        if b is None and self.batch_window > 0:
            # The batch is empty: wait a moment so requests arriving together start together.
            time.sleep(self.batch_window)
        with self._lock:
            new = [r for r in self._waiting if not r.cancelled][:free]
            taken = set(map(id, new))
            self._waiting = [r for r in self._waiting if id(r) not in taken]
        if new:
            self._prefill(new)

    def _forward(self, rows, ids, mask, pos, cache):
        model = self.peft if self.peft is not None else self.model
        kw = {}
        if self.peft is not None:
            kw["adapter_names"] = [r.adapter for r in rows]
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                    use_cache=True, logits_to_keep=1, **kw)
        return out.logits[:, -1].float()

    def _prefill(self, rows: list[GenRequest]) -> None:
        from transformers import DynamicCache

        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.prompt_ids)
            ids[i, width - n:] = torch.tensor(r.prompt_ids)
            mask[i, width - n:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(rows, ids, mask, pos, cache)
        self.stats["prefills"] += 1
        # pos holds the position of each row's last token; _emit moves it to the sampled token's.
        new = _Batch(rows=rows, cache=cache, mask=mask, pos=[len(r.prompt_ids) - 1 for r in rows],
                     last=[0] * len(rows))
        self._emit(new, logits)
        self._batch = new if self._batch is None else _merge(self._batch, new)
        self._prune()

    def _step(self) -> None:
        b = self._batch
        if b is None:
            return
        n = len(b.rows)
        dev = self.device
        ids = torch.tensor(b.last, dtype=torch.long, device=dev).unsqueeze(1)
        b.mask = torch.cat([b.mask, torch.ones((n, 1), dtype=torch.long, device=dev)], dim=1)
        pos = torch.tensor(b.pos, dtype=torch.long, device=dev).unsqueeze(1)
        logits = self._forward(b.rows, ids, b.mask, pos, b.cache)
        self.stats["steps"] += 1
        self.stats["rows"] += n
        self.token_times.append((time.time(), n))
        self.stats["batch_sizes"][n] = self.stats["batch_sizes"].get(n, 0) + 1
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], n)
        self._emit(b, logits)
        self._prune()

    def _emit(self, b: _Batch, logits: torch.Tensor) -> None:
        """Pick each row's next token, hand it out, and mark rows that are done."""
        tokens = self._sample(b.rows, logits)
        for i, r in enumerate(b.rows):
            if r.finished:
                continue
            if r.cancelled:
                self._finish(r, "cancelled")
                continue
            t = tokens[i]
            b.last[i] = t
            b.pos[i] += 1
            if t in self.stop_ids:
                self._finish(r, "stop")
                continue
            r.generated.append(t)
            self.stats["tokens"] += 1
            try:
                r.on_token(t)
            except Exception:  # its receiver is gone (event loop closed): drop this row, not the batch
                r.cancelled = True
                self._finish(r, "cancelled")
                continue
            if len(r.generated) >= r.params.max_new_tokens or b.pos[i] >= self.max_positions:
                self._finish(r, "length")

    def _sample(self, rows: list[GenRequest], logits: torch.Tensor) -> list[int]:
        logits = logits.cpu()  # per-request seeded generators live on the CPU
        early = [i for i, r in enumerate(rows) if len(r.generated) < r.params.min_tokens]
        if early and self.stop_ids:
            logits[torch.tensor(early).unsqueeze(1), torch.tensor(sorted(self.stop_ids)).unsqueeze(0)] = float("-inf")
        out = logits.argmax(-1).tolist()
        for i, r in enumerate(rows):
            p = r.params
            if p.temperature < 1e-4:  # below this, sampling is argmax anyway and division overflows
                continue
            x = logits[i] / p.temperature
            if p.top_p < 1.0:
                sorted_x, order = x.sort(descending=True)
                cum = sorted_x.softmax(-1).cumsum(-1)
                drop = cum - sorted_x.softmax(-1) >= p.top_p  # keep the smallest set reaching top_p
                x = x.clone()
                x[order[drop]] = float("-inf")
            probs = x.softmax(-1)
            if torch.isfinite(probs).all():  # one odd row must not fail the whole batch
                out[i] = int(torch.multinomial(probs, 1, generator=r.generator or self._rng))
        return out

    def _prune(self) -> None:
        """Drop finished rows from the batch and columns that are padding in every remaining row."""
        b = self._batch
        if b is None:
            return
        keep = [i for i, r in enumerate(b.rows) if not (r.finished or r.cancelled)]
        for i, r in enumerate(b.rows):
            if r.cancelled and not r.finished:
                self._finish(r, "cancelled")
        if not keep:
            self._batch = None
            return
        if len(keep) < len(b.rows):
            idx = torch.tensor(keep, device=b.mask.device)
            for layer in b.cache.layers:
                layer.keys = layer.keys.index_select(0, idx)
                layer.values = layer.values.index_select(0, idx)
            b.mask = b.mask.index_select(0, idx)
            b.rows = [b.rows[i] for i in keep]
            b.pos = [b.pos[i] for i in keep]
            b.last = [b.last[i] for i in keep]
        # The mask has one more column than the cache (the token about to be fed) only mid-step; here they match.
        lead = int((b.mask.sum(0) == 0).long().cumprod(0).sum())
        if lead:
            b.mask = b.mask[:, lead:]
            for layer in b.cache.layers:
                layer.keys = layer.keys[:, :, lead:]
                layer.values = layer.values[:, :, lead:]

    def _finish(self, r: GenRequest, reason: str) -> None:
        if r.finished:
            return
        r.finished = True
        self.stats["cancelled"] += reason == "cancelled"
        with self._lock:
            self._refs[r.adapter] = max(0, self._refs.get(r.adapter, 1) - 1)
        try:
            r.on_finish(reason)
        except Exception:
            pass  # nobody is listening any more; the slot is freed all the same
        finally:
            if self._retired:
                self._collect()

    def _fail_all(self, e: Exception) -> None:
        rows = self._batch.rows if self._batch else []
        self._batch = None
        for r in rows:
            self._finish(r, f"error: {type(e).__name__}: {e}")


def _merge(a: _Batch, b: _Batch) -> _Batch:
    """Join two left-padded batches: pad the shorter cache on the left, then stack rows."""
    ta, tb = a.mask.shape[1], b.mask.shape[1]
    t = max(ta, tb)

    def lpad(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
        if n == 0:
            return x
        shape = list(x.shape)
        shape[dim] = n
        return torch.cat([torch.zeros(shape, dtype=x.dtype, device=x.device), x], dim=dim)

    for la, lb in zip(a.cache.layers, b.cache.layers):
        la.keys = torch.cat([lpad(la.keys, t - ta, 2), lpad(lb.keys, t - tb, 2)], dim=0)
        la.values = torch.cat([lpad(la.values, t - ta, 2), lpad(lb.values, t - tb, 2)], dim=0)
    a.mask = torch.cat([lpad(a.mask, t - ta, 1), lpad(b.mask, t - tb, 1)], dim=0)
    a.rows += b.rows
    a.pos += b.pos
    a.last += b.last
    return a


def _check_lora(adapter_dir: Path) -> None:
    cfg = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    if cfg.get("peft_type") != "LORA":
        raise ConfigError(f"{adapter_dir}/{ADAPTER_CONFIG}: peft_type {cfg.get('peft_type')!r} cannot share a "
                          "mixed-adapter batch; only LoRA adapters are served over the shared base")
    if cfg.get("use_dora"):
        raise ConfigError(f"{adapter_dir}/{ADAPTER_CONFIG}: use_dora: DoRA adapters cannot share a mixed batch "
                          "(PEFT limitation); merge it into full weights and serve those as the base")


def _default_base_name(base: str) -> str:
    from ..zoo import ZOO

    if base in ZOO:
        return base
    name = Path(base).name or "base"
    return re.sub(r"[^A-Za-z0-9_.@:-]+", "-", name).strip("-.") or "base"
