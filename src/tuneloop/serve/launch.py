"""`tuneloop serve`: turn `--model` arguments into one base model plus adapters, check the key rules, run.

A `--model` may be a registered version: `NAME:VERSION`, or `NAME@ALIAS`, which is then followed (the
server loads each new holder of the alias as it changes; serve/follow.py).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from pathlib import Path

from ..errors import ConfigError, NotFoundError
from ..runs import ADAPTER_CONFIG, MODEL, MODEL_CONFIG, is_adapter, is_run_dir, open_run
from ..zoo import ZOO
from .engine import SERVED_AS, _default_base_name, validate_name
from .sources import Source, source_for_ref

log = logging.getLogger("tuneloop.serve")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_keys_from(options: list[str] | None) -> list[str]:
    keys = [k for k in (options or []) if k]
    keys += [k.strip() for k in os.environ.get("TUNELOOP_API_KEYS", "").split(",") if k.strip()]
    return keys


def parse_models(specs: list[str], workspace: Path | None) -> tuple[tuple[str, str] | None, list[tuple[str, str]]]:
    """`--model` values → (base (name, path) or None, [(adapter name, folder)]).

    A value is `NAME=PATH` or just a zoo name, HF folder, run folder, PEFT adapter folder or a run name
    under `<workspace>/runs/`. Adapters are named after their folder unless NAME= is given.
    """
    base: tuple[str, str] | None = None
    adapters: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, target = spec.partition("=")
        if not sep:
            name, target = "", spec
        p = Path(target).expanduser()
        if not p.is_dir() and workspace is not None and (workspace / "runs" / target).is_dir():
            p = workspace / "runs" / target
        if target in ZOO and not p.is_dir():
            kind, path = "base", target
        elif p.is_dir():
            # a classify run with full weights (or an int8 export of one) is a classifier, not the base
            if is_run_dir(p) and not is_adapter(p / MODEL) and (p / MODEL / MODEL_CONFIG).exists() \
                    and SERVED_AS.get(open_run(p).task) == "generate":
                kind, path = "base", str(open_run(p).model_dir)  # a full fine-tuning run: its weights are the base
            elif is_adapter(p) or is_run_dir(p):
                kind, path = "adapter", str(p)
            elif (p / MODEL_CONFIG).exists():
                kind, path = "base", str(p)
            else:
                raise NotFoundError(f"--model {spec}: {p} is neither a model folder, a run folder nor a PEFT adapter")
        else:
            raise NotFoundError(f"--model {spec}: not a zoo model ({', '.join(sorted(ZOO))}), a folder, or a run "
                                f"under {workspace / 'runs' if workspace else '<workspace>/runs'}")
        if kind == "base":
            if base is not None:
                raise ConfigError(f"--model {spec}: a second base model; one server holds one base "
                                  f"(already {base[1]}); serve adapters over it instead")
            base = (validate_name(name or (p.name if p.is_dir() and target not in ZOO else
                                           _default_base_name(target))), path)
        else:
            adapters.append((validate_name(name or p.resolve().name), path))
    names = [a for a, _ in adapters] + ([base[0]] if base else [])
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"--model: the name {sorted(dup)[0]!r} is used twice; give one NAME=PATH")
    return base, adapters


def resolve_refs(specs: list[str], workspace: Path | None) -> tuple[list[str], dict[str, Source]]:
    """Registered versions among `--model` values → `NAME=RUN_FOLDER` specs, and what each name is.

    A ref is served under its own text (`reviews@production`) unless NAME= is given.
    """
    out, sources = [], {}
    for spec in specs:
        name, sep, target = spec.partition("=")
        if not sep:
            name, target = "", spec
        if ":" in target or "@" in target:  # only then can it be a ref, and is the registry (MLflow) imported
            from .. import registry

            if registry.is_ref(target):
                if workspace is None:
                    raise ConfigError(f"--model {spec}: a registry ref needs a workspace (--workspace)")
                src = source_for_ref(workspace, target)
                name = validate_name(name or target)
                sources[name] = src
                spec = f"{name}={src.path}"
        out.append(spec)
    return out, sources


def base_for(adapters: list[tuple[str, str]]) -> tuple[str, str]:
    """With no base given, serve the one the first adapter was trained on (a run's base is found the one
    way `Run.base_model_path` finds it)."""
    path = Path(adapters[0][1]).expanduser()
    if is_run_dir(path):
        run = open_run(path)
        return _default_base_name(run.info.base_model), run.base_model_path()
    cand = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if cand and (Path(cand).expanduser().is_dir() or cand in ZOO):
        return _default_base_name(cand), cand
    raise NotFoundError(f"{adapters[0][1]}: its base model ({cand}) is not on this machine; give it with --model")


def build_engine(specs: list[str], workspace: Path | None, dtype: str = "auto", **limits):
    from ..infer.device import device, pick_dtype
    from .engine import Engine

    if not specs:
        raise ConfigError("give at least one --model (a zoo name, a model folder, a run or an adapter folder)")
    specs, sources = resolve_refs(specs, workspace)
    base, adapters = parse_models(specs, workspace)
    if base is None:
        base = base_for(adapters)
    names = {"auto": "auto", "bfloat16": "bf16", "bf16": "bf16", "float32": "fp32", "fp32": "fp32"}
    if dtype not in names:
        raise ConfigError(f"--dtype {dtype!r}: known: auto, bfloat16, float32")
    base_src = sources.get(base[0])
    if base_src is not None and base_src.follows:
        # Full weights are the engine's base, which is never hot-swapped (only adapters are).
        log.warning("%s: %s is a full fine-tuning run, served as the base; it is not swapped when %s moves",
                    base[0], base_src.version, base_src.follows)
    engine = Engine(base[1], base_name=base[0], dtype=pick_dtype(names[dtype], device()),
                    base_version=base_src.version if base_src else None, **limits)
    try:
        for name, path in adapters:
            src = sources.get(name)
            try:
                engine.load_adapter(name, path, version=src.version if src else None,
                                    follows=src.follows if src else None).result()
            except (OSError, ValueError, KeyError, RuntimeError) as e:  # unreadable or mismatched adapter files
                raise ConfigError(f"--model {name}: could not load {path}: {type(e).__name__}: {e}") from None
    except BaseException:
        engine.close()
        raise
    return engine


def serve(specs: list[str], host: str, port: int, api_keys: list[str], workspace: Path, dtype: str = "auto",
          threads: int | None = None, log_responses: bool = True, admin_keys: list[str] | None = None,
          max_body_bytes: int = 1 << 20, follow_interval: float = 2.0, **limits) -> None:
    import torch
    import uvicorn

    from ..feedback import FeedbackStore
    from .app import ServeSettings, create_app

    keys = api_keys_from(api_keys)
    if not is_loopback(host) and not keys:
        raise ConfigError(f"--host {host}: binding beyond loopback needs API keys (--api-key KEY or "
                          "TUNELOOP_API_KEYS=k1,k2)")
    if max_body_bytes < 1 or follow_interval <= 0:
        raise ConfigError(f"--max-body-bytes {max_body_bytes} / --follow-interval {follow_interval}: both must be "
                          "above 0")
    if not log.handlers:  # uvicorn sets up its own loggers only; alias switches must show in the server's log
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    if threads:
        torch.set_num_threads(threads)
    engine = build_engine(specs, workspace, dtype, **limits)
    admin = [k for k in (admin_keys or []) if k]
    admin += [k.strip() for k in os.environ.get("TUNELOOP_ADMIN_KEYS", "").split(",") if k.strip()]
    settings = ServeSettings(api_keys=keys, admin_keys=admin, max_prompt_tokens=limits.get("max_prompt_tokens", 2048),
                             max_new_tokens=limits.get("max_new_tokens", 512), log_responses=log_responses,
                             max_body_bytes=max_body_bytes, workspace=workspace, follow_interval=follow_interval)
    from .routers.review import load_review_settings

    review_settings = load_review_settings(workspace)
    app = create_app(engine, settings, FeedbackStore.for_workspace(workspace), review_settings)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        engine.close()


def review(workspace: Path, host: str, port: int, rubric: list[str] | None = None,
           reviews_per_item: int | None = None, local_reviewer: bool | None = None, store_url: str | None = None) -> None:
    """`tuneloop review`: the review page over the workspace's feedback store, no model loaded."""
    import uvicorn

    from ..feedback import FeedbackStore
    from .app import create_review_app
    from .routers.review import load_review_settings

    settings = load_review_settings(workspace, rubric=rubric, reviews_per_item=reviews_per_item,
                                    local_reviewer=local_reviewer)
    store = FeedbackStore(store_url) if store_url else FeedbackStore.for_workspace(workspace)
    if not is_loopback(host):
        log.warning("review on %s: reviewers need their keys; only this machine may review without one", host)
    try:
        uvicorn.run(create_review_app(store, settings), host=host, port=port, log_level="info")
    finally:
        store.close()
