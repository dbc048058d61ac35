"""Recipe `dpo`: Direct Preference Optimization on (prompt, chosen, rejected) pairs.

Reads top to bottom: data (pairs → chosen and rejected answers as chat turns with an answer mask) → model
(the start model: a base, or an sft/dpo/kto run with its adapter merged; a new adapter on top) → fit (the
shared loop, train/loop.py: validation, early stopping, checkpoints, exact resume) → save.

The loss compares how much more likely the policy makes each answer than the reference does: with
d = beta * ((log p(chosen) - log p_ref(chosen)) - (log p(rejected) - log p_ref(rejected))), `sigmoid` is
-log sigmoid(d). The reference is the policy with its adapter off (train/preference.py), so the loss is
exactly log 2 at step 0. The formulas are TRL's DPOTrainer's, checked against it in
tests/test_train_preference.py. Each pair is one row [prompt | chosen | rejected] under a tree attention
mask (`train.pair_rows`): the prompt is computed once per pair instead of twice, for policy and reference.
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
from ..infer.attention import keep_adapter_inputs_bf16
from ..infer.batching import sorted_batches
from ..infer.device import pick_dtype, set_threads
from ..infer.encode import load_tokenizer
from ..runs import (LOSS_PLOT, MODEL, TEST_RECORDS, Fingerprints, finish_run, start_point, write_data_info,
                    write_history, write_recipe)
from .common import plot_losses, recipe_for_run, seed_everything
from .fastpath import compile_blocks, lean_saves
from .loop import fit
from .preference import Scorer, answer_hook, encode_pairs, load_policy, read_splits, seqs, too_short

console = Console(stderr=True)


# ----------------------------------------------------------------------------------------------------
# the loss


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
               chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair DPO loss from summed answer log-probs of policy and reference (TRL's formulas).
    `ipo` needs the answer token counts: its log-ratios are per token."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    d = beta * (chosen_ratio - rejected_ratio)
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)
    if loss_type == "hinge":
        return torch.relu(1 - d)
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the answer token counts")
        gap = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        return (gap - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        return (-(1 - label_smoothing) * F.logsigmoid(d) + label_smoothing * F.logsigmoid(-d)) / (1 - 2 * label_smoothing)
    raise ValueError(f"unknown loss_type {loss_type!r} (known: sigmoid, ipo, hinge, robust)")


def pair_scores(model, inner, scorer: Scorer, rows, idx: list[int], pad_id: int, dev, pair_rows: bool = True):
    """(policy chosen, policy rejected, ref chosen, ref rejected, chosen tokens, rejected tokens) of the pairs
    `idx`: with `pair_rows` each pair as one row sharing its prompt where the model allows it
    (`Scorer.pairs`), else as two sequences."""
    shared = scorer.pairs(model, inner, rows, idx, pad_id, dev) if pair_rows else None
    if shared is not None:
        return shared
    pairs = [rows[i] for i in idx]
    batch = seqs([(p[0], p[1]) for p in pairs] + [(p[2], p[3]) for p in pairs], pad_id, dev)
    logps, counts = scorer.policy(model, batch)
    ref = scorer.reference(inner, batch)
    n = len(idx)
    return logps[:n], logps[n:], ref[:n], ref[n:], counts[:n], counts[n:]


@torch.no_grad()
def pair_metrics(inner, scorer: Scorer, rows, pad_id: int, batch_size: int, dev, autocast: bool, tc,
                 pair_rows: bool = True) -> dict:
    """Mean DPO loss, reward accuracy (implicit reward of chosen above rejected) and mean reward margin."""
    inner.eval()
    loss = acc = margin = 0.0
    for b in sorted_batches([len(r[0]) + len(r[2]) for r in rows], batch_size):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            c, r, rc, rr, nc, nr = pair_scores(inner, inner, scorer, rows, b, pad_id, dev, pair_rows)
        gap = tc.beta * ((c - rc) - (r - rr))
        loss += float(dpo_losses(c, r, rc, rr, tc.beta, tc.loss_type, tc.label_smoothing, nc, nr).sum())
        acc += float((gap > 0).sum())
        margin += float(gap.sum())
    inner.train()
    n = max(1, len(rows))
    return {"loss": loss / n, "reward_accuracy": acc / n, "reward_margin": margin / n}


# ----------------------------------------------------------------------------------------------------
# the recipe


def train_dpo(recipe: Recipe, run_dir: Path, show_progress: bool = True, resume: bool = False) -> dict:
    from accelerate import Accelerator

    t0 = time.time()
    tc, dc, mc = recipe.train, recipe.data, recipe.method
    acc = Accelerator(cpu=not torch.cuda.is_available())
    main = acc.is_main_process
    set_threads(tc.threads)
    seed_everything(tc.seed)
    dev = acc.device

    # ---- data: held-out test pairs (written to the run folder for eval), validation, training
    train_recs, val_recs, test, n_all = read_splits(recipe, "dpo")

    start = start_point(recipe.model, run_dir.parent.parent)
    tok = load_tokenizer(start.base, chat=True)
    rows, _, report = encode_pairs(tok, train_recs, tc.max_length)
    val_rows, _, _ = encode_pairs(tok, val_recs, tc.max_length)
    too_short(rows, tc.max_length)
    if main and (report["truncated"] or report["dropped"]):
        console.print(f"[yellow]truncation:[/] {report['truncated']} answers cut at {tc.max_length} tokens; "
                      f"{report['dropped']} of {report['records']} pairs dropped because the prompt alone is longer")

    # ---- model: a new adapter over the start model; the reference is that adapter switched off
    dtype = pick_dtype(tc.precision, dev)
    base, model = load_policy(start, mc, dtype, "dpo")
    use_autocast = dtype == torch.bfloat16
    if use_autocast:
        keep_adapter_inputs_bf16(model)
    if tc.compile:
        compile_blocks(base)
    elif use_autocast:
        lean_saves(base)  # eager only: compiled blocks choose what to keep for backward themselves
    scorer = Scorer(*answer_hook(base, mc))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": tc.lr}]
    if main and not resume:
        write_recipe(run_dir, recipe_for_run(recipe))
        write_jsonl(run_dir / TEST_RECORDS, test)

    # ---- fit: the DPO loss summed over my pairs, divided by the pairs of the whole global batch
    def loss_fn(model, mine: list[int], batch: list[int]) -> torch.Tensor:
        c, r, rc, rr, nc, nr = pair_scores(model, acc.unwrap_model(model), scorer, rows, mine, tok.pad_token_id, dev,
                                           tc.pair_rows)
        return dpo_losses(c, r, rc, rr, tc.beta, tc.loss_type, tc.label_smoothing, nc, nr).sum() / len(batch)

    def validate(inner) -> tuple[float, str]:
        m = pair_metrics(inner, scorer, val_rows, tok.pad_token_id, recipe.eval.batch_size, dev, use_autocast, tc,
                         tc.pair_rows)
        return m["loss"], (f"validation dpo loss {m['loss']:.4f} · reward accuracy {m['reward_accuracy']:.3f} · "
                           f"margin {m['reward_margin']:.3f}")

    fitted = fit(acc, model, groups, tc, [len(r[0]) + len(r[2]) for r in rows], loss_fn,
                 validate if val_rows else None, run_dir, resume, console, autocast=use_autocast, name="dpo",
                 show_progress=show_progress, loss_name="dpo loss")
    inner, history, fm = fitted.model, fitted.history, fitted.metrics
    final = (pair_metrics(inner, scorer, val_rows, tok.pad_token_id, recipe.eval.batch_size, dev, use_autocast, tc,
                          tc.pair_rows) if val_rows else {})

    # ---- save: the best validation checkpoint when there was validation, else the last weights
    if main:
        with atomic_dir(run_dir / MODEL) as tmp:
            inner.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        write_data_info(run_dir, {
            "train": dc.train, "test": dc.test, "fingerprint": fingerprint(train_recs + val_recs + test),
            "records": n_all, "train_records": len(train_recs), "val_records": len(val_recs),
            "test_records": len(test), "truncation": report, "start_run": str(start.run) if start.run else None})
        write_history(run_dir, history, fitted.validations)
        plot_losses(history, fitted.validations, run_dir / LOSS_PLOT)
    metrics = {
        "task": "dpo",
        "method": mc.name,
        "base_model": recipe.model,
        "model_path": start.base,
        "dtype": str(dtype).replace("torch.", ""),
        "loss_type": tc.loss_type,
        "beta": tc.beta,
        "examples": len(rows),
        "truncated_answers": report["truncated"],
        "dropped_records": report["dropped"],
        **fm,
        "val_reward_accuracy": final.get("reward_accuracy"),
        "val_reward_margin": final.get("reward_margin"),
        "trainable_params": trainable,
        "total_params": total_params,
        "wall_seconds": round(time.time() - t0, 2),
    }
    if main:
        finish_run(run_dir, recipe_for_run(recipe), metrics, model_path=start.base, start=start,
                   fingerprints=Fingerprints(train=fingerprint(train_recs), validation=fingerprint(val_recs),
                                             test=fingerprint(test)))
    # finish_run removed the checkpoints on the main process; every process leaves together
    acc.wait_for_everyone()
    return metrics
