"""Where and how fast inference (and training) runs: the device, the precision, the CPU threads."""

from __future__ import annotations

import os

import torch


def set_threads(threads: int | None) -> None:
    """`threads` (the recipe's `train.threads`), else OMP_NUM_THREADS, else every core this process may use.

    OMP_NUM_THREADS is how a user (or a test runner with one process per core) shares a machine between
    processes; torch reads it at start-up, and setting all cores here would undo it."""
    n = threads or _env_threads() or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)


def _env_threads() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def bf16_supported(dev: torch.device) -> bool:
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # oneDNN reports whether the CPU has native bf16 dot products (AVX512-BF16 or AMX).
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def pick_dtype(precision: str, dev: torch.device) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "bf16" or (precision == "auto" and bf16_supported(dev)):
        return torch.bfloat16
    return torch.float32
