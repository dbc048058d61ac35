"""Recipe `sft`: causal-LM supervised fine-tuning on chat records, loss on the assistant's answers only.

Reads top to bottom: data (chat template → token ids + answer mask, truncation report, packing) → model
(PEFT method or full) → fit (the shared loop, train/loop.py: validation, early stopping, checkpoints,
exact resume) → save.

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

from ..config import Recipe
from ..data.chat import holdout, load_chat
from ..data.records import fingerprint, write_jsonl
from ..errors import ConfigError
from ..fileio import atomic_dir
from ..infer.encode import IGNORE, collate, encode_chat, fit_prompt, load_tokenizer
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
from ..infer.attention import keep_adapter_inputs_bf16
from ..infer.batching import sorted_batches
from ..infer.device import pick_dtype, set_threads
from .fastpath import FinalHidden, compile_blocks, lean_saves, linear_cross_entropy
from .common import load_kwargs, plot_losses, recipe_for_run, seed_everything, wrap_method
from .loop import fit

console = Console(stderr=True)


# ----------------------------------------------------------------------------------------------------
# data: the model's own chat template, with a mask that is true on answer tokens only


def fit_records(tok, records, max_length: int, answer_room: int, truncate: str) -> tuple[list, dict]:
    """Records whose prompts are cut to leave `answer_room` tokens (infer.encode.fit_prompt), and what
    was cut: {records, tokens, median_prompt_tokens (before cutting)}."""
    import dataclasses
    import statistics

    out, cut, tokens, sizes = [], 0, 0, []
    for r in records:
        m, n = fit_prompt(tok, r.messages, max_length, answer_room, truncate)
        sizes.append(len(tok(r.messages[0]["content"] if r.messages else "", add_special_tokens=False)["input_ids"]))
        if n:
            cut, tokens = cut + 1, tokens + n
            r = dataclasses.replace(r, messages=m)
        out.append(r)
    return out, {"records": cut, "tokens": tokens, "median_prompt_tokens": int(statistics.median(sizes)) if sizes else 0}


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
    prompts_cut = None
    if dc.answer_room:
        train_recs, prompts_cut = fit_records(tok, train_recs, tc.max_length, dc.answer_room, dc.truncate)
        val_recs, _ = fit_records(tok, val_recs, tc.max_length, dc.answer_room, dc.truncate)
        if main and prompts_cut["records"]:
            console.print(f"long prompts: {prompts_cut['records']} of {len(train_recs)} training prompts cut to "
                          f"{tc.max_length - dc.answer_room} tokens (data.truncate: {dc.truncate}; "
                          f"{prompts_cut['tokens']:,} document tokens left out, median prompt "
                          f"{prompts_cut['median_prompt_tokens']} tokens)", highlight=False)
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
    elif use_autocast:
        lean_saves(base)  # eager only: compiled blocks choose what to keep for backward themselves
    out_weight = base.get_output_embeddings().weight

    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": tc.lr}]
    if main and not resume:
        write_recipe(run_dir, recipe_for_run(recipe))
        write_jsonl(run_dir / TEST_RECORDS, test)

    # ---- fit: loss summed over the answer tokens of my rows, normalised by those of the whole global
    # batch (see the module doc)
    def loss_fn(model, mine: list[int], batch: list[int]) -> torch.Tensor:
        n_global = n_targets(collate([rows[i] for i in batch], tok.pad_token_id, tc.packing))
        mine_batch = collate([rows[i] for i in mine], tok.pad_token_id, tc.packing)
        return summed_loss(model, mine_batch, dev, hidden, out_weight) / max(1, n_global)

    def validate(model) -> tuple[float, str]:
        val = validation_loss(model, val_rows, tok.pad_token_id, recipe.eval.batch_size, dev, acc,
                              use_autocast, hidden, out_weight)
        return val, f"validation loss {val:.4f} (perplexity {math.exp(val):.2f})"

    fitted = fit(acc, model, groups, tc, [len(r[0]) for r in rows], loss_fn, validate if val_rows else None,
                 run_dir, resume, console, autocast=use_autocast, name="sft", show_progress=show_progress,
                 val_tokens=sum(len(r[0]) for r in val_rows))
    inner, history, fm = fitted.model, fitted.history, fitted.metrics

    # ---- save: the best validation checkpoint when there was validation, else the last weights
    if main:
        with atomic_dir(run_dir / MODEL) as tmp:
            inner.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        write_data_info(run_dir, {
            "train": dc.train, "test": dc.test, "fingerprint": fingerprint(train_recs + val_recs + test),
            "records": n_all, "train_records": len(train_recs), "val_records": len(val_recs),
            "test_records": len(test), "truncation": report, "val_truncation": report_val})
        write_history(run_dir, history, fitted.validations)
        plot_losses(history, fitted.validations, run_dir / LOSS_PLOT)
    metrics = {
        "task": "sft",
        "method": mc.name,
        "base_model": recipe.model,
        "model_path": model_path,
        "dtype": str(dtype if mc.name != "full" else torch.float32).replace("torch.", ""),
        "examples": len(enc_train),
        "packed_rows": len(rows) if tc.packing else None,
        "truncated_records": report["truncated"],
        "dropped_records": report["dropped"],
        "prompts_cut": prompts_cut["records"] if prompts_cut else 0,
        "prompt_tokens_cut": prompts_cut["tokens"] if prompts_cut else 0,
        **fm,
        "best_val_perplexity": math.exp(fm["best_val_loss"]) if fm["best_val_loss"] is not None else None,
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
