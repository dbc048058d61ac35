"""Recipe `reward`: a Bradley-Terry reward model on (prompt, chosen, rejected) pairs: a scalar head over the
model reads the whole conversation and scores it; training pushes r(chosen) above r(rejected) with the loss
-log sigmoid(r_chosen - r_rejected - margin) (TRL's RewardTrainer's, the margin from the pair's `margin`
with `train.use_margin`). Evaluation uses it as a judge (win rate of one run's answers over another's).

Reads top to bottom: data (pairs → both conversations as token ids) → model (one-output head, PEFT method
or full) → fit (the shared loop) → save.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from ..config import Recipe
from ..data.records import fingerprint, write_jsonl
from ..fileio import atomic_dir
from ..infer.batching import pad_batch, sorted_batches
from ..infer.device import pick_dtype, set_threads
from ..infer.encode import load_tokenizer
from ..runs import (LOSS_PLOT, MODEL, TEST_RECORDS, Fingerprints, finish_run, write_data_info, write_history,
                    write_recipe)
from ..zoo import resolve_model
from .common import load_kwargs, plot_losses, recipe_for_run, seed_everything, wrap_method
from .fastpath import compile_blocks
from .loop import fit
from .preference import encode_pairs, read_splits, too_short

console = Console(stderr=True)


def bradley_terry(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Per-pair loss -log sigmoid(r_c - r_r - margin): the chance the chosen answer wins, under Bradley-Terry."""
    return -F.logsigmoid(r_chosen - r_rejected - margin)


def build_reward_model(model_path: str, method, dtype: torch.dtype, pad_id: int):
    """The base model with a fresh one-output head, wrapped by the method."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, **load_kwargs(method.name, dtype))
    model.config.pad_token_id = pad_id
    model.config.use_cache = False  # as build_classifier: no key/value cache to fill
    return wrap_method(model, method, "SEQ_CLS", model_path)


def pair_rewards(model, rows, idx: list[int], pad_id: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected) of the pairs `idx`: both sides in one right-padded forward."""
    ids, mask = pad_batch([rows[i][0] for i in idx] + [rows[i][2] for i in idx], pad_id)
    r = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()[:, 0]
    return r[:len(idx)], r[len(idx):]


@torch.no_grad()
def reward_metrics(model, rows, margins: list[float], pad_id: int, batch_size: int, dev, autocast: bool) -> dict:
    """Mean Bradley-Terry loss and accuracy (chosen scored above rejected)."""
    model.eval()
    loss = right = 0.0
    for b in sorted_batches([len(r[0]) + len(r[2]) for r in rows], batch_size):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            rc, rr = pair_rewards(model, rows, b, pad_id, dev)
        loss += float(bradley_terry(rc, rr, torch.tensor([margins[i] for i in b], device=dev)).sum())
        right += float((rc > rr).sum())
    model.train()
    n = max(1, len(rows))
    return {"loss": loss / n, "accuracy": right / n}


def train_reward(recipe: Recipe, run_dir: Path, show_progress: bool = True, resume: bool = False) -> dict:
    from accelerate import Accelerator

    t0 = time.time()
    tc, dc, mc = recipe.train, recipe.data, recipe.method
    acc = Accelerator(cpu=not torch.cuda.is_available())
    main = acc.is_main_process
    set_threads(tc.threads)
    seed_everything(tc.seed)
    dev = acc.device

    # ---- data: held-out test pairs (written to the run folder for eval), validation, training
    train_recs, val_recs, test, n_all = read_splits(recipe, "reward")

    model_path = resolve_model(recipe.model)
    tok = load_tokenizer(model_path, chat=True)
    rows, kept, report = encode_pairs(tok, train_recs, tc.max_length)
    val_rows, val_kept, _ = encode_pairs(tok, val_recs, tc.max_length)
    too_short(rows, tc.max_length)

    def margins_of(recs, idx):
        return [float(recs[i].margin or 0.0) if tc.use_margin else 0.0 for i in idx]

    margins, val_margins = margins_of(train_recs, kept), margins_of(val_recs, val_kept)

    # ---- model
    dtype = pick_dtype(tc.precision, dev)
    model = build_reward_model(model_path, mc, dtype, tok.pad_token_id)
    use_autocast = dtype == torch.bfloat16 and mc.name != "full"
    if tc.compile:
        compile_blocks(model, dynamic=True)  # pairs are padded to their own longest answer
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    heads = ("score", "classifier")
    head = [p for n, p in model.named_parameters() if p.requires_grad and any(h in n for h in heads)]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not any(h in n for h in heads)]
    groups = [{"params": body, "lr": tc.lr}] + ([{"params": head, "lr": tc.head_lr or tc.lr}] if head else [])
    if main and not resume:
        write_recipe(run_dir, recipe_for_run(recipe))
        write_jsonl(run_dir / TEST_RECORDS, test)

    # ---- fit: Bradley-Terry summed over my pairs, divided by the pairs of the whole global batch
    def loss_fn(model, mine: list[int], batch: list[int]) -> torch.Tensor:
        rc, rr = pair_rewards(model, rows, mine, tok.pad_token_id, dev)
        return bradley_terry(rc, rr, torch.tensor([margins[i] for i in mine], device=dev)).sum() / len(batch)

    def validate(inner) -> tuple[float, str]:
        m = reward_metrics(inner, val_rows, val_margins, tok.pad_token_id, recipe.eval.batch_size, dev, use_autocast)
        return m["loss"], f"validation loss {m['loss']:.4f} · accuracy {m['accuracy']:.3f}"

    fitted = fit(acc, model, groups, tc, [len(r[0]) + len(r[2]) for r in rows], loss_fn,
                 validate if val_rows else None, run_dir, resume, console, autocast=use_autocast, name="reward",
                 show_progress=show_progress, loss_name="bt loss")
    inner, history, fm = fitted.model, fitted.history, fitted.metrics
    final = (reward_metrics(inner, val_rows, val_margins, tok.pad_token_id, recipe.eval.batch_size, dev,
                            use_autocast) if val_rows else {})

    # ---- save: the best validation checkpoint when there was validation, else the last weights
    if main:
        with atomic_dir(run_dir / MODEL) as tmp:
            inner.save_pretrained(tmp)
        write_data_info(run_dir, {
            "train": dc.train, "test": dc.test, "fingerprint": fingerprint(train_recs + val_recs + test),
            "records": n_all, "train_records": len(train_recs), "val_records": len(val_recs),
            "test_records": len(test), "with_margin": sum(1 for m in margins if m), "truncation": report})
        write_history(run_dir, history, fitted.validations)
        plot_losses(history, fitted.validations, run_dir / LOSS_PLOT)
    metrics = {
        "task": "reward",
        "method": mc.name,
        "base_model": recipe.model,
        "model_path": model_path,
        "dtype": str(dtype if mc.name != "full" else torch.float32).replace("torch.", ""),
        "examples": len(rows),
        "truncated_answers": report["truncated"],
        "dropped_records": report["dropped"],
        **fm,
        "val_accuracy": final.get("accuracy"),
        "trainable_params": trainable,
        "total_params": total_params,
        "wall_seconds": round(time.time() - t0, 2),
    }
    if main:
        finish_run(run_dir, recipe_for_run(recipe), metrics, model_path=model_path, fingerprints=Fingerprints(
            train=fingerprint(train_recs), validation=fingerprint(val_recs), test=fingerprint(test)))
    # finish_run removed the checkpoints on the main process; every process leaves together
    acc.wait_for_everyone()
    return metrics
