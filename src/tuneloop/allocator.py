"""Which malloc a training process runs on: jemalloc where the machine has it, else the system's.

PyTorch takes every CPU tensor straight from malloc. A LoRA step allocates and frees a few gigabytes of
activations of many sizes, and glibc's heap keeps much of what was freed without being able to reuse it for
the next step's differently sized tensors. Measured on bench/train_throughput.py's SFT step (4 x 512 packed
tokens, the bundled 135M model, 2-core AMD EPYC with AVX512-BF16, bf16 peak 0.41 TFLOP/s, 8 steps each,
interleaved): eager peak RSS 3.26-3.47 GiB with glibc, 2.03-2.27 GiB with jemalloc; median step 5.05 s with
jemalloc as configured here against 5.29-6.01 s with glibc; compiled blocks 3.92 s and 2.86 GiB against 4.70 s
and 3.24 GiB. Limiting glibc instead (a fixed mmap threshold) cut memory as far only at 25-100% slower steps.

Why by hand: the allocator is chosen when a process starts (LD_PRELOAD), so a training command starts itself
again once, before torch is imported, with jemalloc preloaded. Nothing else changes; where the library is
missing (it comes from Debian's libjemalloc2, which `make quickstart` and `make test` install where they can) or
`TUNELOOP_MALLOC=system` is set, the process keeps the system's malloc.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "TUNELOOP_MALLOC"  # "system": keep glibc; set to "jemalloc" in the restarted process
# Debian / Ubuntu (x86-64, arm64) and Fedora / Arch library paths of the jemalloc 5 runtime
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2")
# Freed pages are kept for reuse, never handed back to the kernel: with jemalloc's default decay (10 s) and
# with background purging the same steps were 9-30% slower (every purged page faults in again next step),
# for 0.2 GiB less.
MALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
# The commands that train (where the measurements above apply); serving and the rest keep the system's.
COMMANDS = ("train", "quickstart", "sweep", "loop")


def find_jemalloc(paths: tuple[str, ...] = JEMALLOC_PATHS) -> str | None:
    return next((p for p in paths if Path(p).is_file()), None)


def restart_env(environ: dict, library: str | None) -> dict | None:
    """The environment to start again with, or None to carry on as we are (no library, the user said
    `system`, or jemalloc is already preloaded)."""
    preload = environ.get("LD_PRELOAD", "")
    if library is None or environ.get(ENV) in ("system", "jemalloc") or "jemalloc" in preload:
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = f"{library} {preload}".strip()
    env.setdefault("MALLOC_CONF", MALLOC_CONF)
    env[ENV] = "jemalloc"
    return env


def child_env(environ: dict, jemalloc: bool) -> dict:
    """The environment for a child process on jemalloc (preloaded; the library must exist) or on the
    system's malloc, whatever this process runs on: the benches give each run its own tool's."""
    plain = {k: v for k, v in environ.items() if k not in (ENV, "LD_PRELOAD", "MALLOC_CONF")}
    if not jemalloc:
        return dict(plain, **{ENV: "system"})
    library = find_jemalloc()
    if library is None:
        raise FileNotFoundError("no libjemalloc2 on this machine (`make jemalloc` installs it)")
    return restart_env(plain, library)


def in_use() -> str:
    """'jemalloc' when this process has it mapped, else 'system' (recorded with a run's speed figures)."""
    try:
        return "jemalloc" if "libjemalloc" in Path("/proc/self/maps").read_text() else "system"
    except OSError:
        return "system"


def maybe_restart(argv: list[str]) -> None:
    """Start this training command again under jemalloc (os.execve: the same process id, arguments and
    environment plus the preload). Only from the real command line before torch is loaded: a caller that
    runs the CLI inside its own process (tests, notebooks) is left alone."""
    if (sys.platform != "linux" or "torch" in sys.modules or len(argv) < 2 or argv[1] not in COMMANDS
            or list(sys.orig_argv[-len(argv) + 1:]) != list(argv[1:])):
        return
    env = restart_env(dict(os.environ), find_jemalloc())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, list(sys.orig_argv), env)
    except OSError:  # cannot start again (an odd interpreter path): carry on with the system's malloc
        return
