"""Recipe `regress`: a numeric head over a pretrained encoder or decoder (daily demand, prices, scores).

Reads top to bottom: data (rows rendered to text, time-ordered hold-out) → target standardised with the
training mean/std → model (one-output head, PEFT method or full) → fit (the shared loop, train/loop.py:
validation, early stopping, checkpoints, exact resume) → save, with the target scale in
`<run>/target.json` so predictions come back in real units.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from rich.console import Console

from ..config import Recipe
from ..data.chat import holdout
from ..data.records import fingerprint, write_jsonl
from ..data.tabular import load_table
from ..errors import ConfigError
from ..fileio import atomic_dir
from ..infer.predict import predict_z
from ..runs import (
    LOSS_PLOT,
    MODEL,
    TEST_RECORDS,
    TRAIN_TAIL,
    Fingerprints,
    TargetScale,
    finish_run,
    write_data_info,
    write_history,
    write_recipe,
)
from ..zoo import resolve_model
from ..infer.batching import pad_batch
from ..infer.device import pick_dtype, set_threads
from ..infer.encode import load_tokenizer
from .common import load_kwargs, plot_losses, recipe_for_run, seed_everything, wrap_method
from .loop import fit

console = Console(stderr=True)



def build_regressor(model_path: str, method, dtype: torch.dtype, pad_id: int):
    """The base model with a fresh one-output head (predicting the standardised target), wrapped by the method."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=1, problem_type="regression", **load_kwargs(method.name, dtype))
    model.config.pad_token_id = pad_id
    model.config.use_cache = False  # as build_classifier: no key/value cache to fill
    return wrap_method(model, method, "SEQ_CLS", model_path)


def load_records(recipe: Recipe):
    dc = recipe.data
    # the declared slice fields ride along into the held-out test.jsonl, so eval can slice by them
    return load_table(recipe.resolve_path(dc.train), dc.value_field, dc.template, dc.text_field, dc.time_field,
                      dc.lags, dc.format, keep=tuple(recipe.eval.slices))


def train_regressor(recipe: Recipe, run_dir: Path, show_progress: bool = True, resume: bool = False) -> dict:
    from accelerate import Accelerator

    t0 = time.time()
    tc, dc, mc = recipe.train, recipe.data, recipe.method
    acc = Accelerator(cpu=not torch.cuda.is_available())
    main = acc.is_main_process
    set_threads(tc.threads)
    seed_everything(tc.seed)
    dev = acc.device

    # ---- data: a time column means the held-out rows are the latest ones, never a random sample
    records = load_records(recipe)
    n_all = len(records)
    ordered = dc.time_field is not None
    if dc.test:
        test = load_table(recipe.resolve_path(dc.test), dc.value_field, dc.template, dc.text_field,
                          dc.time_field, dc.lags, dc.format, keep=tuple(recipe.eval.slices))
    else:
        records, test = holdout(records, dc.test_ratio or 0.0, tc.seed, ordered=ordered)
    train_recs, val_recs = holdout(records, dc.val_ratio, tc.seed + 1, ordered=ordered)
    if dc.max_train_examples:
        train_recs = train_recs[-dc.max_train_examples:] if ordered else train_recs[: dc.max_train_examples]
    if len(train_recs) < 2:
        raise ConfigError(f"data.train: {len(train_recs)} training records left after the hold-outs; need at least 2")
    ys = [r.value for r in train_recs]
    mean = sum(ys) / len(ys)
    std = math.sqrt(sum((y - mean) ** 2 for y in ys) / len(ys)) or 1.0

    model_path = resolve_model(recipe.model)
    tok = load_tokenizer(model_path)
    enc = tok([r.text for r in train_recs], truncation=True, max_length=tc.max_length)["input_ids"]
    enc_val = tok([r.text for r in val_recs], truncation=True, max_length=tc.max_length)["input_ids"] if val_recs else []
    z = [(y - mean) / std for y in ys]
    z_val = [(r.value - mean) / std for r in val_recs]

    # ---- model
    dtype = pick_dtype(tc.precision, dev)
    model = build_regressor(model_path, mc, dtype, tok.pad_token_id)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    use_autocast = dtype == torch.bfloat16 and mc.name != "full"

    heads = ("score", "classifier", "pre_classifier")
    head = [p for n, p in model.named_parameters() if p.requires_grad and any(h in n for h in heads)]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not any(h in n for h in heads)]
    groups = [{"params": body, "lr": tc.lr}] + ([{"params": head, "lr": tc.head_lr or tc.lr}] if head else [])
    if main and not resume:
        write_recipe(run_dir, recipe_for_run(recipe))
        write_jsonl(run_dir / TEST_RECORDS, test)
        write_jsonl(run_dir / TRAIN_TAIL, (train_recs + val_recs)[-30:] if ordered else [])

    # ---- fit: squared error on the standardised target, summed over my rows / size of the global batch
    def loss_fn(model, mine: list[int], batch: list[int]) -> torch.Tensor:
        ids, mask = pad_batch([enc[i] for i in mine], tok.pad_token_id)
        y = torch.tensor([z[i] for i in mine], dtype=torch.float32)
        pred = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float().view(-1)
        return ((pred - y.to(dev)) ** 2).sum() / len(batch)

    def validate(model) -> tuple[float, str]:
        # Every process scores all validation rows (no DDP collectives).
        pz = predict_z(model, enc_val, tok.pad_token_id, recipe.eval.batch_size, dev, use_autocast)
        val = sum((a - b) ** 2 for a, b in zip(pz, z_val)) / len(z_val)
        val_mae = sum(abs(a - b) for a, b in zip(pz, z_val)) / len(z_val) * std
        return val, f"validation mse {val:.4f} · MAE {val_mae:,.3f}"

    fitted = fit(acc, model, groups, tc, [len(e) for e in enc], loss_fn, validate if enc_val else None,
                 run_dir, resume, console, autocast=use_autocast, name="regress", show_progress=show_progress,
                 loss_name="mse")
    inner, history = fitted.model, fitted.history

    # ---- save: the best validation checkpoint when there was validation, else the last weights
    val_mae = None
    if enc_val:
        pz = predict_z(inner, enc_val, tok.pad_token_id, recipe.eval.batch_size, dev, use_autocast)
        val_mae = sum(abs(a - b) for a, b in zip(pz, z_val)) / len(z_val) * std
    if main:
        with atomic_dir(run_dir / MODEL) as tmp:
            inner.save_pretrained(tmp)
        write_data_info(run_dir, {
            "train": dc.train, "test": dc.test, "fingerprint": fingerprint(train_recs + val_recs + test),
            "records": n_all, "train_records": len(train_recs), "val_records": len(val_recs),
            "test_records": len(test), "time_ordered": ordered})
        write_history(run_dir, history, fitted.validations)
        plot_losses(history, fitted.validations, run_dir / LOSS_PLOT)
    metrics = {
        "task": "regress",
        "method": mc.name,
        "base_model": recipe.model,
        "model_path": model_path,
        "dtype": str(dtype if mc.name != "full" else torch.float32).replace("torch.", ""),
        "examples": len(train_recs),
        "target_mean": mean,
        "target_std": std,
        **fitted.metrics,
        "val_mae": val_mae,
        "trainable_params": trainable,
        "total_params": total_params,
        "wall_seconds": round(time.time() - t0, 2),
    }
    if main:
        finish_run(run_dir, recipe_for_run(recipe), metrics, model_path=model_path,
                   target=TargetScale(field=dc.value_field, mean=mean, std=std), fingerprints=Fingerprints(
                       train=fingerprint(train_recs), validation=fingerprint(val_recs), test=fingerprint(test)))
    # finish_run removed the checkpoints on the main process; every process leaves together
    acc.wait_for_everyone()
    return metrics
