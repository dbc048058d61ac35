"""Recipe `regress`: a numeric head over a pretrained encoder or decoder (daily demand, prices, scores).

Reads top to bottom: data (rows rendered to text, time-ordered hold-out) → target standardised with the
training mean/std → model (one-output head, PEFT method or full) → loop (validation, early stopping,
checkpoints, exact resume) → save, with the target scale in `<run>/target.json` so predictions come back
in real units.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from ..config import Recipe
from ..data.chat import fingerprint, holdout, write_records_jsonl
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
from .common import (
    LoopState,
    plan_steps,
    load_tokenizer,
    log_line,
    load_kwargs,
    load_trainable_state,
    pad_batch,
    pick_dtype,
    plot_losses,
    progress_columns,
    recipe_for_run,
    seed_everything,
    set_threads,
    wrap_method,
)

console = Console(stderr=True)



def build_regressor(model_path: str, method, dtype: torch.dtype, pad_id: int):
    """The base model with a fresh one-output head (predicting the standardised target), wrapped by the method."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=1, problem_type="regression", **load_kwargs(method.name, dtype))
    model.config.pad_token_id = pad_id
    return wrap_method(model, method, "SEQ_CLS", model_path)


def load_records(recipe: Recipe):
    dc = recipe.data
    return load_table(recipe.resolve_path(dc.train), dc.value_field, dc.template, dc.text_field, dc.time_field,
                      dc.lags, dc.format)


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
                          dc.time_field, dc.lags, dc.format)
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

    lengths = [len(e) for e in enc]
    batches_per_epoch, steps_per_epoch, total_steps, eval_every = plan_steps(len(enc), tc)
    heads = ("score", "classifier", "pre_classifier")
    head = [p for n, p in model.named_parameters() if p.requires_grad and any(h in n for h in heads)]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not any(h in n for h in heads)]
    groups = [{"params": body, "lr": tc.lr}] + ([{"params": head, "lr": tc.head_lr or tc.lr}] if head else [])

    # ---- optimizer and position (restored on resume)
    state = LoopState(acc, model, groups, tc, total_steps, run_dir, resume, console.print)
    model, inner, scheduler = state.model, state.inner, state.scheduler
    pos, history, watch = state.pos, state.history, state.watch
    if main and not resume:
        write_recipe(run_dir, recipe_for_run(recipe))
        write_records_jsonl(run_dir / TEST_RECORDS, test)
        write_records_jsonl(run_dir / TRAIN_TAIL, (train_recs + val_recs)[-30:] if ordered else [])

    # ---- loop: mean squared error on the standardised target
    model.train()
    world, rank = acc.num_processes, acc.process_index
    stop, stopped_early = False, False
    window: list[float] = []
    t_train, tokens_at_start = time.time(), pos["seen_tokens"]
    with Progress(*progress_columns(), console=console, disable=not (show_progress and main)) as progress:
        task = progress.add_task("regress", total=total_steps, completed=pos["step"], info="")
        for global_batch in state.global_batches(lengths, tc.batch_size, tc.seed, total_steps):
            mine = global_batch[rank::world] or global_batch[:1]
            ids, mask = pad_batch([enc[i] for i in mine], tok.pad_token_id)
            y = torch.tensor([z[i] for i in mine], dtype=torch.float32)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_autocast):
                pred = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float().view(-1)
            # Sum over my share / size of the global batch, times `world` to undo DDP's averaging.
            sq = ((pred - y.to(dev)) ** 2).sum() if global_batch[rank::world] else pred.sum() * 0
            loss = sq / len(global_batch) * world / tc.grad_accum
            acc.backward(loss)
            pos["seen_tokens"] += sum(lengths[i] for i in global_batch)
            window.append(float(sq.detach()) / len(global_batch))
            if not state.micro_step():
                continue
            step_loss = sum(window[-tc.grad_accum:]) / tc.grad_accum
            if world > 1:
                step_loss = float(acc.reduce(torch.tensor(step_loss, device=dev), reduction="sum"))
            history.append({"step": pos["step"], "loss": step_loss, "lr": scheduler.get_last_lr()[0]})
            tps = (pos["seen_tokens"] - tokens_at_start) / max(1e-9, time.time() - t_train)
            progress.update(task, advance=1, info=f"mse {step_loss:.4f} · {tps:,.0f} tok/s")
            if show_progress and main and not console.is_terminal:
                log_line(console, pos["step"], total_steps, step_loss, tps, time.time() - t_train)

            last = pos["step"] >= total_steps
            if enc_val and (pos["step"] % eval_every == 0 or last):
                # Every process scores all validation rows with the unwrapped model (no DDP collectives).
                pz = predict_z(inner, enc_val, tok.pad_token_id, recipe.eval.batch_size, dev, use_autocast)
                val = sum((a - b) ** 2 for a, b in zip(pz, z_val)) / len(z_val)
                val_mae = sum(abs(a - b) for a, b in zip(pz, z_val)) / len(z_val) * std
                stop = state.record_validation(
                    val, progress.console.print, f"validation mse {val:.4f} · MAE {val_mae:,.3f}", last)
                stopped_early = stop and not last
            if tc.checkpoint_every and pos["step"] % tc.checkpoint_every == 0 and not last and not stop:
                state.checkpoint()
            if last or stop:
                break
    train_seconds = time.time() - t_train

    # ---- save
    if state.best_state is not None:
        load_trainable_state(inner, state.best_state)
    inner.eval()
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
        write_history(run_dir, history, watch.points)
        plot_losses(history, watch.points, run_dir / LOSS_PLOT)
    tail = history[-max(1, len(history) // 10):]
    metrics = {
        "task": "regress",
        "method": mc.name,
        "base_model": recipe.model,
        "model_path": model_path,
        "dtype": str(dtype if mc.name != "full" else torch.float32).replace("torch.", ""),
        "steps": pos["step"],
        "examples": len(train_recs),
        "target_mean": mean,
        "target_std": std,
        "train_tokens": pos["seen_tokens"],
        "train_seconds": round(train_seconds, 2),
        "tokens_per_second": round((pos["seen_tokens"] - tokens_at_start) / max(1e-9, train_seconds), 1),
        "first_loss": history[0]["loss"] if history else None,
        "final_loss": sum(h["loss"] for h in tail) / len(tail) if tail else None,
        "best_val_loss": watch.best if watch.points else None,
        "val_mae": val_mae,
        "best_step": watch.best_step if watch.points else None,
        "stopped_early": stopped_early,
        "overfit_warning_step": watch.overfit_warned_at,
        "trainable_params": trainable,
        "total_params": total_params,
        "processes": world,
        "wall_seconds": round(time.time() - t0, 2),
    }
    if main:
        finish_run(run_dir, recipe_for_run(recipe), metrics, model_path=model_path,
                   target=TargetScale(field=dc.value_field, mean=mean, std=std), fingerprints=Fingerprints(
                       train=fingerprint(train_recs), validation=fingerprint(val_recs), test=fingerprint(test)))
    acc.wait_for_everyone()
    return metrics
