"""A run's model as plain weights: its adapters merged into the base in fp32, then cast.

Merging in the training dtype would round `W + BA` once per adapter in bf16; merging in fp32 and
casting once rounds only at the end, and the export measures what that one cast costs.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..infer.loaders import LOADERS
from ..runs import Run

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def load_run(run: Run, dtype: torch.dtype):
    """(model, tokenizer) of the run as trained, on the CPU, with its base in `dtype` (its adapters on it,
    not merged)."""
    merged = {"merged": run.info.merged_adapters} if run.info.merged_adapters else {}
    return LOADERS[run.task](run.model_dir, run.is_adapter, run.base_model_path(), run.tokenizer_path(), dtype,
                             torch.device("cpu"), labels=run.info.labels, **merged)


def merged_fp32(run: Run):
    """(plain transformers model in fp32, tokenizer): every adapter of the run merged into its base."""
    model, tok = load_run(run, torch.float32)
    if run.is_adapter:
        peft_type = str(getattr(model.peft_config.get("default"), "peft_type", "")).split(".")[-1]
        if peft_type != "LORA":
            raise ConfigError(f"{run.dir}: a {run.info.method} run; its {peft_type.lower()} virtual tokens are "
                              f"inputs, not weights, so they cannot be merged into the model; serve the run "
                              f"itself with `tuneloop serve`, or train it with method.name: lora")
        model = model.merge_and_unload()
    model.float().eval()
    # the pad token the loaders set on the config travels with the folder, so plain transformers pads the same
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def cast(model, dtype: torch.dtype):
    """The model with its floating-point weights in `dtype` (in place; returns it)."""
    model.to(dtype)
    model.config.dtype = dtype
    return model
