"""Serving follows the registry: a name loaded from `NAME@ALIAS` keeps serving whoever holds that alias.

A thread looks at the alias of every such name every `interval` seconds; when the holder changed (a
promotion, a rollback) it loads the new holder under the same served name through the engine's hot-swap,
so requests in flight finish on the version they started with and new ones get the new version. A version
that fails to load leaves the old one serving; the failure is logged once per version, and that version is
not tried again until the alias moves on. A registry that cannot be read is logged and looked at again at
the next tick. Nothing here can stop the server.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from .engine import Engine

log = logging.getLogger("tuneloop.serve")


class Follower:
    def __init__(self, engine: Engine, workspace: Path, interval: float = 2.0, load_timeout: float = 600.0):
        self.engine, self.workspace = engine, Path(workspace)
        self.interval, self.load_timeout = interval, load_timeout
        self.failed: dict[str, str] = {}  # served name → the version that would not load
        self.switches: list[dict] = []  # every switch made: {"name", "from", "to", "time"}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tuneloop-follow", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 10)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # a bug here must not end the following, let alone the server
                log.exception("following the registry aliases failed; trying again in %ss", self.interval)

    def check(self) -> list[dict]:
        """One look at every followed alias; returns the switches it made."""
        from .. import registry

        made = []
        followed = [a for a in list(self.engine.adapters.values()) if a.follows]
        for info in followed:
            name, _, alias = registry.parse_ref(info.follows)
            try:
                holder = registry.alias_holder(self.workspace, name, alias)
            except Exception as e:  # the store is locked, moved, or broken: keep serving, look again later
                log.warning("%s: cannot read the registry (%s: %s); %s keeps serving %s", info.follows,
                            type(e).__name__, e, info.name, info.version)
                continue
            if holder is None:
                continue
            if self.failed.get(info.name) not in (None, holder.ref):
                del self.failed[info.name]  # the alias moved on: that version gets another try if it comes back
            if holder.ref == info.version or self.failed.get(info.name) == holder.ref:
                continue
            current = self.engine.adapters.get(info.name)
            if current is not info:  # replaced or unloaded through /admin meanwhile: that wins
                continue
            try:
                fut = self.engine.load_adapter(info.name, holder.run_dir, version=holder.ref, follows=info.follows)
                new = fut.result(timeout=self.load_timeout)
            except Exception as e:
                self.failed[info.name] = holder.ref
                log.error("%s: %s now holds %s, but it did not load (%s: %s); %s keeps serving %s",
                          info.name, info.follows, holder.ref, type(e).__name__, e, info.name, info.version)
                continue
            self.failed.pop(info.name, None)
            switch = {"name": info.name, "from": info.version, "to": holder.ref, "time": new.loaded_at}
            self.switches.append(switch)
            made.append(switch)
            log.info("%s: %s moved from %s to %s; now serving %s", info.name, info.follows, info.version,
                     holder.ref, holder.ref)
        return made
