"""Recipe `sft`: causal-LM supervised fine-tuning on chat records, loss on the assistant's answers only.

Reads top to bottom: data (chat template → token ids + answer mask, truncation report, packing) → model
(PEFT method or full) → loop (validation, early stopping, checkpoints, exact resume) → save.

Scale-out needs no other code: under `accelerate launch` / `torchrun` every process takes its share of
each global batch, and the loss is normalised by the token count of the whole global batch, so N
processes compute the same update as one.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from ..config import Recipe
from ..data.chat import fingerprint, holdout, load_chat, write_records_jsonl
from ..errors import ConfigError
from ..fileio import atomic_dir
from ..infer.encode import IGNORE, collate, encode_chat, load_tokenizer
from ..runs import (
    LOSS_PLOT,
    MODEL,
    TEST_RECORDS,
    Fingerprints,
    finish_run,
    write_data_info,
    write_history,
    write_recipe,
)
from ..zoo import resolve_model
from .fastpath import FinalHidden, compile_blocks, keep_adapter_inputs_bf16, linear_cross_entropy
from .common import (
    LoopState,
    plan_steps,
    log_line,
    load_kwargs,
    load_trainable_state,
    pick_dtype,
    plot_losses,
    progress_columns,
    recipe_for_run,
    seed_everything,
    set_threads,
    sorted_batches,
    wrap_method,
)

console = Console(stderr=True)


# ----------------------------------------------------------------------------------------------------
# data: the model's own chat template, with a mask that is true on answer tokens only


def encode_all(tok, records, max_length: int) -> tuple[list[tuple[list[int], list[int]]], dict]:
    """Encode and truncate. A record whose prompt (system + first user turn) alone fills `max_length` is
    dropped, never cut inside its prompt; a record cut inside an answer is kept and counted."""
    out, truncated, dropped, dropped_where = [], 0, 0, []
    for r in records:
        ids, labels = encode_chat(tok, r.messages)
        if len(ids) > max_length:
            first_answer = next((j for j, l in enumerate(labels) if l != IGNORE), len(ids))
            if first_answer >= max_length - 1:
                dropped += 1
                dropped_where.append(r.source)
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            truncated += 1
        out.append((ids, labels))
    return out, {"records": len(records), "truncated": truncated, "dropped": dropped,
                 "dropped_examples": dropped_where[:5]}


def pack(examples: list[tuple[list[int], list[int]]], max_length: int, seed: int):
    """Greedy packing in a seeded order into rows of at most `max_length` tokens.

    Each row carries position ids that restart at 0 for every example: transformers then builds a
    block-diagonal causal mask (no attention across examples), and the first token of an example is never
    a label for the last token of the one before (labels there are IGNORE: a template starts with a role
    header, never an answer).
    """
    import random

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows, cur = [], ([], [], [])
    for i in order:
        ids, labels = examples[i]
        if cur[0] and len(cur[0]) + len(ids) > max_length:
            rows.append(cur)
            cur = ([], [], [])
        cur[0].extend(ids)
        cur[1].extend([IGNORE] + labels[1:])
        cur[2].extend(range(len(ids)))
    if cur[0]:
        rows.append(cur)
    return rows


def n_targets(batch: dict) -> int:
    """Tokens that carry a loss (labels are shifted by one inside the model)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


NO_LOGITS = torch.zeros(0, dtype=torch.long)


def summed_loss(model, batch: dict, dev, hidden: FinalHidden | None, out_weight) -> torch.Tensor:
    """Sum of the next-token losses over the batch's answer tokens.

    With `hidden`, the model is asked for no logits at all (`logits_to_keep` empty) and the loss is computed
    from its final hidden states on the answer positions only; otherwise the model's own loss
    (`num_items_in_batch=1` turns its mean into a sum).
    `use_cache=False` matters: with a cache object transformers ignores the packed position ids when
    building the mask, and packed examples would attend to each other."""
    on_dev = {k: v.to(dev) for k, v in batch.items()}
    if hidden is None:
        return model(**on_dev, num_items_in_batch=1, use_cache=False).loss
    labels = on_dev.pop("labels")
    model(**on_dev, use_cache=False, logits_to_keep=NO_LOGITS.to(dev))
    return linear_cross_entropy(hidden.take(), out_weight, labels)[0]


# ----------------------------------------------------------------------------------------------------
# validation


@torch.no_grad()
def validation_loss(model, rows, pad_id: int, batch_size: int, dev, acc, autocast: bool,
                    hidden: FinalHidden | None = None, out_weight=None) -> float:
    """Mean NLL per answer token over the validation rows (shared across processes)."""
    model.eval()
    lengths = [len(r[0]) for r in rows]
    batches = list(sorted_batches(lengths, batch_size))[acc.process_index::acc.num_processes]
    total = torch.zeros(2, dtype=torch.float64)
    for b in batches:
        batch = collate([rows[i] for i in b], pad_id, packed=False)
        n = n_targets(batch)
        if n == 0:
            continue
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            loss = summed_loss(model, batch, dev, hidden, out_weight)
        total += torch.tensor([loss.double().item(), n], dtype=torch.float64)
    total = acc.reduce(total.to(dev), reduction="sum").cpu() if acc.num_processes > 1 else total
    model.train()
    return float(total[0] / max(1.0, float(total[1])))


# ----------------------------------------------------------------------------------------------------
# the recipe


def train_sft(recipe: Recipe, run_dir: Path, show_progress: bool = True, resume: bool = False) -> dict:
    from accelerate import Accelerator

    t0 = time.time()
    tc, dc, mc = recipe.train, recipe.data, recipe.method
    if tc.packing and mc.name in ("prompt_tuning", "prefix_tuning"):
        raise ConfigError(f"train.packing: cannot pack with method {mc.name} (virtual tokens shift the "
                          f"positions of every packed example); use packing: false")
    acc = Accelerator(cpu=not torch.cuda.is_available())
    main = acc.is_main_process
    set_threads(tc.threads)
    seed_everything(tc.seed)
    dev = acc.device

    # ---- data: held-out test (written to the run folder for eval), validation, training
    records = load_chat(recipe.resolve_path(dc.train), dc.format)
    n_all = len(records)
    if dc.test:
        test = load_chat(recipe.resolve_path(dc.test), dc.format)
    else:
        records, test = holdout(records, dc.test_ratio or 0.0, tc.seed)
    train_recs, val_recs = holdout(records, dc.val_ratio, tc.seed + 1)
    if dc.max_train_examples:
        train_recs = train_recs[: dc.max_train_examples]

    model_path = resolve_model(recipe.model)
    tok = load_tokenizer(model_path, chat=True)
    enc_train, report = encode_all(tok, train_recs, tc.max_length)
    enc_val, report_val = encode_all(tok, val_recs, tc.max_length)
    if not enc_train:
        raise ConfigError(f"train.max_length: {tc.max_length} tokens is too short for every record's prompt")
    if main and (report["truncated"] or report["dropped"]):
        console.print(f"[yellow]truncation:[/] {report['truncated']} of {report['records']} training records cut "
                      f"inside an answer at {tc.max_length} tokens; {report['dropped']} dropped because the "
                      f"prompt alone is longer" + (f" (e.g. {report['dropped_examples'][0]})"
                                                    if report["dropped"] else ""))
    if tc.packing:
        rows = pack(enc_train, tc.max_length, tc.seed)
    else:
        rows = [(ids, labels, list(range(len(ids)))) for ids, labels in enc_train]
    val_rows = [(ids, labels, list(range(len(ids)))) for ids, labels in enc_val]

    # ---- model
    dtype = pick_dtype(tc.precision, dev)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, **load_kwargs(mc.name, dtype))
    model = wrap_method(base, mc, "CAUSAL_LM", model_path)
    if mc.name == "full":
        model.gradient_checkpointing_disable()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    use_autocast = dtype == torch.bfloat16 and mc.name != "full"
    if use_autocast:
        keep_adapter_inputs_bf16(model)
    # The loss is taken from the final hidden states on answer tokens only (fastpath.linear_cross_entropy);
    # prompt and prefix tuning change the sequence inside PEFT's forward, so they keep the model's own loss.
    hidden = None if mc.name in ("prompt_tuning", "prefix_tuning") else FinalHidden(base)
    if tc.compile:
        compile_blocks(base)
    out_weight = base.get_output_embeddings().weight

    lengths = [len(r[0]) for r in rows]
    batches_per_epoch, steps_per_epoch, total_steps, eval_every = plan_steps(len(rows), tc)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": tc.lr}]

    # ---- optimizer and position (restored on resume)
    state = LoopState(acc, model, groups, tc, total_steps, run_dir, resume, console.print)
    model, inner, scheduler = state.model, state.inner, state.scheduler
    pos, history, watch = state.pos, state.history, state.watch
    if main and not resume:
        write_recipe(run_dir, recipe_for_run(recipe))
        write_records_jsonl(run_dir / TEST_RECORDS, test)

    # ---- loop
    model.train()
    world, rank = acc.num_processes, acc.process_index
    stop, stopped_early = False, False
    window_losses: list[float] = []
    t_train, tokens_at_start = time.time(), pos["seen_tokens"]
    with Progress(*progress_columns(), console=console, disable=not (show_progress and main)) as progress:
        task = progress.add_task("sft", total=total_steps, completed=pos["step"], info="")
        for global_batch in state.global_batches(lengths, tc.batch_size, tc.seed, total_steps):
            n_global = n_targets(collate([rows[i] for i in global_batch], tok.pad_token_id, tc.packing))
            mine = global_batch[rank::world]
            # A process with no share still joins the gradient all-reduce, with a zero loss.
            batch = collate([rows[i] for i in (mine or global_batch[:1])], tok.pad_token_id, tc.packing)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_autocast):
                # normalised by the answer tokens of the whole global batch (see the module doc)
                batch_loss = summed_loss(model, batch, dev, hidden, out_weight) / max(1, n_global)
            # DDP averages gradients over processes; scaling by `world` turns that back into the sum.
            loss = batch_loss * (world if mine else 0) / tc.grad_accum
            acc.backward(loss)
            pos["seen_tokens"] += sum(len(rows[i][0]) for i in global_batch)
            window_losses.append(batch_loss.detach().item() * world if mine else 0.0)
            if not state.micro_step():
                continue
            step_loss = sum(window_losses[-tc.grad_accum:]) / tc.grad_accum
            if world > 1:
                step_loss = float(acc.reduce(torch.tensor(step_loss, device=dev), reduction="mean"))
            # tokens = all tokens of the step (no pads: rows are packed or bucketed); time since the
            # start of training, so a benchmark can leave the warm-up steps out
            history.append({"step": pos["step"], "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                            "tokens": pos["seen_tokens"] - (history[-1].get("seen", tokens_at_start) if history else tokens_at_start),
                            "seen": pos["seen_tokens"], "seconds": round(time.time() - t_train, 4)})
            tps = (pos["seen_tokens"] - tokens_at_start) / max(1e-9, time.time() - t_train)
            progress.update(task, advance=1, info=f"loss {step_loss:.4f} · {tps:,.0f} tok/s")
            if show_progress and main and not console.is_terminal:
                log_line(console, pos["step"], total_steps, step_loss, tps, time.time() - t_train)

            last = pos["step"] >= total_steps
            if val_rows and (pos["step"] % eval_every == 0 or last):
                # The unwrapped model: a DDP forward is a collective (buffer sync), and processes
                # hold different numbers of validation batches.
                val = validation_loss(inner, val_rows, tok.pad_token_id, recipe.eval.batch_size, dev, acc,
                                      use_autocast, hidden, out_weight)
                stop = state.record_validation(
                    val, progress.console.print, f"validation loss {val:.4f} (perplexity {math.exp(val):.2f})", last)
                stopped_early = stop and not last
            if tc.checkpoint_every and (pos["step"] % tc.checkpoint_every == 0) and not last and not stop:
                state.checkpoint()
            if last or stop:
                break
    train_seconds = time.time() - t_train

    # ---- save: the best validation checkpoint when there was validation, else the last weights
    if state.best_state is not None:
        load_trainable_state(inner, state.best_state)
    inner.eval()
    if main:
        with atomic_dir(run_dir / MODEL) as tmp:
            inner.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        write_data_info(run_dir, {
            "train": dc.train, "test": dc.test, "fingerprint": fingerprint(train_recs + val_recs + test),
            "records": n_all, "train_records": len(train_recs), "val_records": len(val_recs),
            "test_records": len(test), "truncation": report, "val_truncation": report_val})
        write_history(run_dir, history, watch.points)
        plot_losses(history, watch.points, run_dir / LOSS_PLOT)
    tail = history[-max(1, len(history) // 10):]
    metrics = {
        "task": "sft",
        "method": mc.name,
        "base_model": recipe.model,
        "model_path": model_path,
        "dtype": str(dtype if mc.name != "full" else torch.float32).replace("torch.", ""),
        "steps": pos["step"],
        "epochs_done": round(pos["epoch"] + pos["batch_idx"] / max(1, batches_per_epoch), 3),
        "examples": len(enc_train),
        "packed_rows": len(rows) if tc.packing else None,
        "truncated_records": report["truncated"],
        "dropped_records": report["dropped"],
        "train_tokens": pos["seen_tokens"],
        "train_seconds": round(train_seconds, 2),
        "tokens_per_second": round((pos["seen_tokens"] - tokens_at_start) / max(1e-9, train_seconds), 1),
        "first_loss": history[0]["loss"] if history else None,
        "final_loss": sum(h["loss"] for h in tail) / len(tail) if tail else None,
        "best_val_loss": watch.best if watch.points else None,
        "best_val_perplexity": math.exp(watch.best) if watch.points else None,
        "best_step": watch.best_step if watch.points else None,
        "stopped_early": stopped_early,
        "overfit_warning_step": watch.overfit_warned_at,
        "trainable_params": trainable,
        "total_params": total_params,
        "processes": world,
        "wall_seconds": round(time.time() - t0, 2),
    }
    if main:
        finish_run(run_dir, recipe_for_run(recipe), metrics, model_path=model_path, fingerprints=Fingerprints(
            train=fingerprint(train_recs), validation=fingerprint(val_recs), test=fingerprint(test)))
    acc.wait_for_everyone()
    return metrics
