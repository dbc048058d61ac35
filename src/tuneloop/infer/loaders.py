"""A trained model back from its run folder's `model/`, one loader per task (`LOADERS`, plain data).

Each takes plain arguments: the `model/` folder, whether it holds a PEFT adapter (else full weights), the
base model's path, the tokenizer's path, the dtype training used and the device; it returns (model in eval
mode on the device, tokenizer). `runs.load_for_inference` is the one caller that knows run folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .attention import attention_for, keep_adapter_inputs_bf16
from .encode import load_tokenizer


def _load_head(model_dir: Path, adapter: bool, model_path: str, tokenizer_path: str, dtype: torch.dtype,
               dev: torch.device, **head):
    """A sequence-classification head (`head`: its size and label names) over the base model: the base in
    the dtype and attention training used, with the run's adapter on it, or the run's full weights."""
    from transformers import AutoModelForSequenceClassification

    tok = load_tokenizer(tokenizer_path)
    if adapter:
        from peft import PeftModel

        base = AutoModelForSequenceClassification.from_pretrained(
            model_path, dtype=dtype, attn_implementation=attention_for(dev, dtype), **head)
        base.config.pad_token_id = tok.pad_token_id
        model = PeftModel.from_pretrained(base, str(model_dir))
        if dtype == torch.bfloat16:
            keep_adapter_inputs_bf16(model)  # inference runs under bf16 autocast, as training did
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
        model.config.pad_token_id = tok.pad_token_id
    return model.to(dev).eval(), tok


def load_classifier(model_dir: Path, adapter: bool, model_path: str, tokenizer_path: str, dtype: torch.dtype,
                    dev: torch.device, labels: list[str] | None = None, base=None):
    """A classification head (with its adapter) over the base model."""
    labels = labels or []
    return _load_head(model_dir, adapter, model_path, tokenizer_path, dtype, dev, num_labels=len(labels),
                      id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})


def load_regressor(model_dir: Path, adapter: bool, model_path: str, tokenizer_path: str, dtype: torch.dtype,
                   dev: torch.device, labels: list[str] | None = None, base=None):
    """A one-output head (predicting the standardised target) over the base model."""
    return _load_head(model_dir, adapter, model_path, tokenizer_path, dtype, dev, num_labels=1,
                      problem_type="regression")


def merge_adapters(model, adapters: list[str] | tuple[str, ...]):
    """`model` with each adapter folder merged into its weights, in order (a dpo run started from an sft
    run: the sft adapter goes into the base before the dpo adapter is put on, as in training)."""
    from peft import PeftModel

    for a in adapters:
        model = PeftModel.from_pretrained(model, str(a)).merge_and_unload()
    return model


def load_generator(model_dir: Path, adapter: bool, model_path: str, tokenizer_path: str, dtype: torch.dtype,
                   dev: torch.device, labels: list[str] | None = None, base=None, merged: tuple[str, ...] = ()):
    """A causal LM: the adapter over the base (`base`, when one is already loaded, else a fresh one), or
    the full fine-tuned weights. `merged`: adapters merged into a fresh base first (a shared `base` is then
    not used, since merging would change it for its other users)."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tokenizer_path, chat=True)
    load = {"dtype": dtype, "attn_implementation": attention_for(dev, dtype)}
    if adapter:
        from peft import PeftModel

        base = base if base is not None and not merged else AutoModelForCausalLM.from_pretrained(model_path, **load)
        model = PeftModel.from_pretrained(merge_adapters(base, merged), str(model_dir))
        if dtype == torch.bfloat16:
            keep_adapter_inputs_bf16(model)  # inference runs under bf16 autocast, as training did
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **load)
    return model.to(dev).eval(), tok


def load_reward(model_dir: Path, adapter: bool, model_path: str, tokenizer_path: str, dtype: torch.dtype,
                dev: torch.device, labels: list[str] | None = None, base=None):
    """A reward model: a one-output (scalar) head over the base model, reading the whole conversation."""
    return _load_head(model_dir, adapter, model_path, tokenizer_path, dtype, dev, num_labels=1)


LOADERS: dict[str, Callable] = {
    "classify": load_classifier,
    "regress": load_regressor,
    "sft": load_generator,
    "dpo": load_generator,
    "kto": load_generator,
    "reward": load_reward,
}
