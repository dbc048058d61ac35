"""What a served name may be loaded from while serving, and the version name it is served under.

`/admin/adapters` reads server files on a client's word, so it loads only two kinds of things: a folder
inside the workspace (a run folder, or a run's name under `<workspace>/runs/`), checked after resolving
symlinks and `..`, or a registered version (`NAME:VERSION`, or `NAME@ALIAS`, which the server then
follows). Anything else is refused before a byte of it is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..runs import MODEL


class OutsideWorkspace(ConfigError):
    """A path that resolves outside the workspace (absolute elsewhere, `..`, or a symlink out of it)."""


@dataclass(frozen=True)
class Source:
    path: Path  # the run (or adapter) folder to load
    version: str  # what it is: `NAME:VERSION` for a registered version, else the folder's name
    follows: str | None = None  # `NAME@ALIAS` when the name should follow that alias


def inside_workspace(workspace: Path, target: str) -> Path:
    """`target` (absolute, relative to the workspace, or a run name under `<workspace>/runs/`) resolved, if
    it stays inside the workspace; OutsideWorkspace otherwise."""
    ws = Path(workspace).expanduser().resolve()
    raw = Path(target).expanduser()
    if raw.is_absolute():
        candidates = [raw]
    else:  # a client's relative path means the workspace's, never the server's working folder
        candidates = [ws / "runs" / raw, ws / raw]
    for c in candidates:
        # resolve() follows every symlink and `..`, so what is checked is what would be read.
        real = c.resolve()
        if real != ws and not real.is_relative_to(ws):
            raise OutsideWorkspace(f"path {target!r}: resolves to {real}, outside the workspace {ws}; the "
                                   "server loads only run folders inside its workspace or registered versions "
                                   "(NAME:VERSION, NAME@ALIAS)")
        if real.exists():
            return real
    return candidates[-1].resolve()


def source_for(workspace: Path | None, target: str) -> Source:
    """A `path` from `/admin/adapters` → what to load. Registered versions go through the registry."""
    if workspace is None:
        raise OutsideWorkspace(f"path {target!r}: this server has no workspace, so it loads nothing while "
                               "serving")
    # A ref has a `:` or an `@`; only then is the registry (and MLflow with it) imported.
    if (":" in target or "@" in target) and _is_ref(target):
        return source_for_ref(workspace, target)
    path = inside_workspace(workspace, target)
    if (path / MODEL).exists():  # a run's weights are read from its model/ folder: no link out of it either
        inside_workspace(workspace, str(path / MODEL))
    return Source(path=path, version=path.name)


def source_for_ref(workspace: Path, ref: str) -> Source:
    """`NAME:VERSION` or `NAME@ALIAS` → the registered version's run folder (NotFoundError when unknown)."""
    from .. import registry

    _, _, alias = registry.parse_ref(ref)
    v = registry.resolve(workspace, ref)
    return Source(path=Path(v.run_dir), version=v.ref, follows=ref if alias else None)


def _is_ref(text: str) -> bool:
    from .. import registry

    return registry.is_ref(text)
