"""Workspaces and run folders. A workspace holds a user's runs, tracking store and feedback store."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from .errors import NotFoundError

DEFAULT_WORKSPACE = "workspace"


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


def find_run(run: str | os.PathLike, workspace: Path | None = None) -> Path:
    """A run folder given as a path, or as a name under `<workspace>/runs/`."""
    p = Path(run).expanduser()
    if not p.is_dir() and workspace is not None and (workspace / "runs" / str(run)).is_dir():
        p = workspace / "runs" / str(run)
    if not p.is_dir():
        raise NotFoundError(f"{run}: no such run folder")
    if not (p / "recipe.yaml").exists():
        raise NotFoundError(f"{p}: not a run folder (no recipe.yaml)")
    return p
