"""A trained model back from its run folder's `model/`, one loader per task (`LOADERS`, plain data).

Each takes plain arguments: the `model/` folder, whether it holds a PEFT adapter (else full weights), the
base model's path, the tokenizer's path, the dtype training used and the device; it returns (model in eval
mode on the device, tokenizer). `runs.load_for_inference` is the one caller that knows run folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .attention import attention_for, bf16_matmuls, keep_adapter_inputs_bf16
from .encode import load_tokenizer


# The output layers of the heads (`*ForSequenceClassification.score`, encoders' `classifier`)
HEAD_MODULES = ("score", "classifier")


def _fp32_linear(self, x):
    # bound to its own module, so PEFT's copy of the head (deepcopy) computes with the copy's weights
    with torch.autocast(x.device.type, enabled=False):
        return torch.nn.functional.linear(x.float(), self.weight, self.bias)


def head_in_fp32(model, cast: bool = True) -> int:
    """The head's weights in fp32 (`cast`) and its products computed in fp32, outside autocast; returns
    how many Linear layers. With bf16 weights under bf16 autocast the head is the step that moves the
    probabilities most (bench/eval_throughput.py --attribute): its logits come out in bf16, 8 bits of
    mantissa, which for logits of 10-20 is a step of 0.06-0.125, and the trained fp32 head weights would be
    rounded to bf16 as they load. Call it with `cast` before PEFT copies the head (so the saved weights load
    into fp32 unrounded) and again after (so the copy computes in fp32 too); it costs nothing measurable
    (a d x num_labels product)."""
    import types

    n = 0
    for name, m in model.named_modules():
        if not any(part in HEAD_MODULES for part in name.split(".")):
            continue
        if isinstance(m, torch.nn.Linear):
            if cast:
                m.float()
            m.forward = types.MethodType(_fp32_linear, m)
            n += 1
    return n


def _load_head(model_dir: Path, adapter: bool, model_path: str, tokenizer_path: str, dtype: torch.dtype,
               dev: torch.device, **head):
    """A sequence-classification head (`head`: its size and label names) over the base model: the base in
    the dtype and attention training used, with the run's adapter on it, or the run's full weights."""
    from transformers import AutoModelForSequenceClassification

    tok = load_tokenizer(tokenizer_path)
    bf16 = dtype == torch.bfloat16
    if adapter:
        from peft import PeftModel

        # bf16: loaded in fp32, then only the products' weights go to bf16 (`bf16_matmuls`): a bf16 residual
        # stream moved probabilities by up to 0.10 against fp32, this layout by 0.02 (bench/eval_throughput.py)
        base = AutoModelForSequenceClassification.from_pretrained(
            model_path, dtype=torch.float32 if bf16 else dtype, attn_implementation=attention_for(dev, dtype), **head)
        base.config.pad_token_id = tok.pad_token_id
        if bf16:
            head_in_fp32(base)
        model = PeftModel.from_pretrained(base, str(model_dir))
        if bf16:
            keep_adapter_inputs_bf16(model)  # inference runs under bf16 autocast, as training did
            head_in_fp32(model)
            bf16_matmuls(model)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), **({"dtype": torch.float32, "attn_implementation": attention_for(dev, dtype)} if bf16 else {}))
        model.config.pad_token_id = tok.pad_token_id
        if bf16:
            head_in_fp32(model)
            bf16_matmuls(model)
    # a head reads each input once: no key/value cache (filling one copies every layer's keys and values)
    model.config.use_cache = False
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
