"""Where and how fast inference (and training) runs: the device, the precision, the CPU threads."""

from __future__ import annotations

import os

import torch


def set_threads(threads: int | None) -> None:
    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)


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
