"""Eval that never pays twice: the predictions of systems that do not change between runs (the untuned base
model prompted zero-shot or few-shot, the classical TF-IDF baseline; for sft, dpo, kto and reward runs the
base model's answers, log-probabilities and forgetting scores) are kept in the workspace, keyed by
everything that determines them, so a rerun, a second recipe on the same data, the gate and the loop read
them back instead of recomputing them.

The key (`cache_key`) is a sha256 over a canonical JSON of the parts a system's caller names, always with:
the cache format (`CACHE_VERSION`, bumped whenever the scoring code changes what it returns), the system's
name and the versions of the libraries that compute it. Callers add the model's identity (`model_identity`:
its weights' sha256, `runs.weights_sha256`, and a hash of its config and tokenizer files, which hold the
chat template), the test set's fingerprint and which of its records were scored, the prompt, the label
words, the reading length, the dtype, the device kind and the system's own settings (few-shot examples:
the training records' fingerprint, k, the token budget, the seed). Any change gives another key, so a
changed input is never answered from the cache; the stored parts are compared on read as well, so a
collision or a hand-edited file is a miss, not a wrong answer. Not in the key: the thread count (it
reorders float sums, no more).

Entries are JSON files under `<workspace>/cache/eval/` (`CACHE_DIR`), one per system and key, written
atomically (fileio.py); a damaged one is recomputed and rewritten. A run outside a workspace (`runs/`
folder) has no cache. `tuneloop eval --no-cache` recomputes and rewrites.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from ..fileio import write_json_atomic
from ..runs import weights_sha256

CACHE_VERSION = 1
CACHE_DIR = ("cache", "eval")
# model files beside the weights that change what the model reads or computes
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
               "added_tokens.json")


def workspace_cache_dir(run_dir: Path) -> Path | None:
    """`<workspace>/cache/eval` of a run that lives in a workspace (`<workspace>/runs/<name>`), else None."""
    run_dir = Path(run_dir).resolve()
    if run_dir.parent.name != "runs":
        return None
    return run_dir.parent.parent.joinpath(*CACHE_DIR)


def model_identity(model_path: str) -> dict | None:
    """What identifies a model folder's behaviour: the sha256 of its weights and of its config and tokenizer
    files; None for a hub id or a folder without safetensors (nothing to key on: not cached)."""
    weights = weights_sha256(model_path)
    if weights is None:
        return None
    return {"weights_sha256": weights, "files_sha256": files_sha256(model_path)}


def files_sha256(folder: str | Path) -> str:
    """sha256 over a model folder's config and tokenizer files (MODEL_FILES) that are there."""
    h = hashlib.sha256()
    folder = Path(folder).expanduser()
    for name in MODEL_FILES:
        f = folder / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def generative_base_parts(run, tokenizer_path: str, records: list, **settings) -> dict | None:
    """The key parts of a generative task's `base` system (sft, dpo, kto, reward): the base model's identity,
    the tokenizer the run reads with (sft saves its own beside the adapter: its chat template and pad token
    decide the prompts), what was scored (`records`: any JSON-able list, fingerprinted), the dtype, device,
    library versions and the caller's `settings` (lengths, batch sizes, new tokens, forgetting). None when
    the base model has no identity to key on (a hub id): not cached."""
    from ..infer.device import device

    identity = model_identity(run.base_model_path())
    if identity is None:
        return None
    doc = json.dumps(records, sort_keys=True, ensure_ascii=False, default=str)
    return {"model": identity, "tokenizer": files_sha256(tokenizer_path),
            "records": hashlib.sha256(doc.encode()).hexdigest(), "dtype": run.info.dtype or "float32",
            "device": device().type, "libraries": library_versions("torch", "transformers", "peft"), **settings}


def texts_fingerprint(texts: list[str], labels: list[str] | None = None) -> str:
    """sha256 over texts (and their labels) in order: what a system read from a list it was given."""
    return hashlib.sha256(json.dumps([texts, labels], ensure_ascii=False).encode()).hexdigest()


def library_versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = "missing"
    return out


def cache_key(system: str, parts: dict) -> str:
    doc = {"cache_version": CACHE_VERSION, "system": system, "parts": parts}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


class EvalCache:
    """Cached system outputs in one folder; `root` None (no workspace) or `enabled` False: every lookup
    misses, and with `enabled` False (`--no-cache`) fresh results are still written for the next run."""

    def __init__(self, root: Path | None, enabled: bool = True):
        self.root = Path(root) if root is not None else None
        self.enabled = enabled

    def _file(self, system: str, key: str) -> Path:
        return self.root / f"{system}-{key[:32]}.json"

    def get(self, system: str, parts: dict) -> dict | None:
        if self.root is None or not self.enabled:
            return None
        key = cache_key(system, parts)
        f = self._file(system, key)
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        # the parts as JSON sees them: tuples and lists compare equal after a round trip
        want = json.loads(json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str))
        if not isinstance(doc, dict) or doc.get("key") != key or doc.get("parts") != want \
                or doc.get("cache_version") != CACHE_VERSION:
            return None
        return doc.get("value")

    def put(self, system: str, parts: dict, value: dict) -> Path | None:
        if self.root is None:
            return None
        key = cache_key(system, parts)
        return write_json_atomic(self._file(system, key), {
            "cache_version": CACHE_VERSION, "system": system, "key": key, "parts": parts, "value": value})

    def fetch(self, system: str, parts: dict | None, compute: Callable[[], dict]) -> tuple[dict, bool]:
        """(value, whether it came from the cache): the cached value for `parts`, else `compute()` stored.
        `parts` None: not cacheable (the model has no identity), computed every time."""
        if parts is not None:
            hit = self.get(system, parts)
            if hit is not None:
                return hit, True
        value = compute()
        if parts is not None:
            try:
                self.put(system, parts, value)
            except OSError as e:
                # a read-only or full disk costs the next run a recomputation, not this run its report
                from rich.console import Console

                Console(stderr=True).print(f"eval cache: could not store {system} in {self.root} ({e})",
                                           highlight=False)
        return value, False


def cache_summary(used: dict[str, bool], where: Path | None, enabled: bool) -> dict[str, Any]:
    """The report's `cache` section: per system whether its result was read from the cache."""
    return {"dir": str(where) if where is not None else None, "enabled": enabled and where is not None,
            "systems": {name: {"cached": hit} for name, hit in used.items()}}


def say_reused(system: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"{system}: cached result reused (nothing that determines it changed; --no-cache "
                               f"recomputes)", highlight=False)


def reused_note(used: dict[str, bool], where: Path | None) -> str | None:
    """The report's note naming the systems read back from the cache, or None when none was."""
    hit = [n for n, h in used.items() if h]
    if not hit:
        return None
    return (f"{', '.join(hit)}: read from the eval cache {where} (the same base model, tokenizer, test records, "
            f"lengths, dtype and settings as when computed; their speed is as measured then; "
            f"`tuneloop eval --no-cache` recomputes)")
