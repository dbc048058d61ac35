"""Recipe `kto`: Kahneman-Tversky Optimization on unpaired answers marked desirable or undesirable (thumbs,
ratings), so feedback needs no second answer to the same prompt.

Reads top to bottom: data (the `kto` shape, or pairs split into a desirable and an undesirable answer) →
model (the start model with a new adapter; the reference is that adapter switched off) → fit (the shared
loop) → save.

With r = log p(answer) - log p_ref(answer) and z a batch estimate of KL(policy || reference) (the same
answers after other prompts of the batch, as TRL does: prompt i with the answer of i - 1), a desirable
answer costs desirable_weight * (1 - sigmoid(beta (r - z))) and an undesirable one undesirable_weight *
(1 - sigmoid(beta (z - r))). z is taken over the whole global batch on every process, without gradient,
so N processes take the step one would. A batch of one kind only (length bucketing groups them when
desirable answers are longer than undesirable ones) has z close to r, and learns little from that step.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console

from ..config import Recipe
from ..data.records import fingerprint, write_jsonl
from ..fileio import atomic_dir
from ..infer.attention import keep_adapter_inputs_bf16
from ..infer.batching import sorted_batches
from ..infer.device import pick_dtype, set_threads
from ..infer.encode import load_tokenizer
from ..infer.preference import encode_answer
from ..runs import (LOSS_PLOT, MODEL, TEST_RECORDS, Fingerprints, finish_run, start_point, write_data_info,
                    write_history, write_recipe)
from .common import plot_losses, recipe_for_run, seed_everything
from .fastpath import compile_blocks, lean_saves
from .loop import fit
from .preference import (Scorer, answer_hook, encode_answers, load_policy, read_splits, seqs, system_of,
                         too_short)

console = Console(stderr=True)


# ----------------------------------------------------------------------------------------------------
# the loss


def kto_losses(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
               beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per-answer KTO loss (TRL's KTOTrainer formula, `loss_type: kto`); `kl` the detached batch estimate."""
    ratio = logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable, good, bad)


@torch.no_grad()
def kl_estimate(inner, scorer: Scorer, tok, records, idx: list[int], max_length: int, dev) -> torch.Tensor:
    """mean(log p - log p_ref) of mismatched (prompt i, answer of i - 1) over the rows `idx`, at least 0."""
    rows = []
    for j, i in enumerate(idx):
        r, other = records[i], records[idx[j - 1]]
        enc = encode_answer(tok, r.prompt, other.completion, max_length, system_of(r))
        if enc is not None:
            rows.append((enc[0], enc[1]))
    if not rows:
        return torch.zeros((), device=dev)
    batch = seqs(rows, tok.pad_token_id, dev)
    policy = scorer.policy(inner, batch)[0]
    return (policy - scorer.reference(inner, batch)).mean().clamp(min=0)


def kto_batch(model, inner, scorer: Scorer, tok, records, rows, idx: list[int], kl_idx: list[int],
              max_length: int, dev, tc) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-answer losses, implicit rewards beta * r, desirable flags) of the rows `idx`, the KL taken over `kl_idx`."""
    kl = kl_estimate(inner, scorer, tok, records, kl_idx, max_length, dev)
    batch = seqs([(rows[i][0], rows[i][1]) for i in idx], tok.pad_token_id, dev)
    logps = scorer.policy(model, batch)[0]
    ref = scorer.reference(inner, batch)
    desirable = torch.tensor([rows[i][2] for i in idx], device=dev)
    losses = kto_losses(logps, ref, desirable, kl, tc.beta, tc.desirable_weight, tc.undesirable_weight)
    return losses, tc.beta * (logps - ref).detach(), desirable


@torch.no_grad()
def kto_metrics(inner, scorer: Scorer, tok, records, rows, batch_size: int, max_length: int, dev, autocast: bool,
                tc) -> dict:
    """Mean KTO loss, and the share of answers on the right side of the reference (desirable ones made
    more likely, undesirable ones less)."""
    inner.eval()
    loss = right = 0.0
    for b in sorted_batches([len(r[0]) for r in rows], batch_size):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            losses, rewards, desirable = kto_batch(inner, inner, scorer, tok, records, rows, b, b, max_length, dev, tc)
        loss += float(losses.sum())
        right += float(((rewards > 0) == desirable).sum())
    inner.train()
    n = max(1, len(rows))
    return {"loss": loss / n, "reward_accuracy": right / n}


# ----------------------------------------------------------------------------------------------------
# the recipe


def _encode(tok, records, max_length: int):
    enc, report = encode_answers(tok, records, [r.completion for r in records], max_length)
    kept = [r for r, e in zip(records, enc) if e is not None]
    rows = [(e[0], e[1], r.label == "desirable") for r, e in zip(records, enc) if e is not None]
    return kept, rows, report


def train_kto(recipe: Recipe, run_dir: Path, show_progress: bool = True, resume: bool = False) -> dict:
    from accelerate import Accelerator

    t0 = time.time()
    tc, dc, mc = recipe.train, recipe.data, recipe.method
    acc = Accelerator(cpu=not torch.cuda.is_available())
    main = acc.is_main_process
    set_threads(tc.threads)
    seed_everything(tc.seed)
    dev = acc.device

    # ---- data: held-out test answers (written to the run folder for eval), validation, training
    train_recs, val_recs, test, n_all = read_splits(recipe, "kto", unpaired=True)

    start = start_point(recipe.model, run_dir.parent.parent)
    tok = load_tokenizer(start.base, chat=True)
    train_kept, rows, report = _encode(tok, train_recs, tc.max_length)
    val_kept, val_rows, _ = _encode(tok, val_recs, tc.max_length)
    too_short(rows, tc.max_length)
    desirable = sum(r[2] for r in rows)
    if main and (report["truncated"] or report["dropped"]):
        console.print(f"[yellow]truncation:[/] {report['truncated']} answers cut at {tc.max_length} tokens; "
                      f"{report['dropped']} of {report['records']} dropped because the prompt alone is longer")
    ratio = (tc.desirable_weight * desirable) / max(1e-9, tc.undesirable_weight * (len(rows) - desirable))
    if main and desirable and desirable < len(rows) and not 1 <= 1 / ratio <= 4 / 3:
        console.print(f"[yellow]kto balance:[/] {desirable} desirable, {len(rows) - desirable} undesirable; the KTO "
                      f"paper advises undesirable_weight x undesirable / (desirable_weight x desirable) in [1, 4/3], "
                      f"it is {1 / ratio:.2f}")

    # ---- model: a new adapter over the start model; the reference is that adapter switched off
    dtype = pick_dtype(tc.precision, dev)
    base, model = load_policy(start, mc, dtype, "kto")
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

    # ---- fit: the KTO loss summed over my answers, divided by the answers of the whole global batch
    def loss_fn(model, mine: list[int], batch: list[int]) -> torch.Tensor:
        losses, _, _ = kto_batch(model, acc.unwrap_model(model), scorer, tok, train_kept, rows, mine, batch,
                                 tc.max_length, dev, tc)
        return losses.sum() / len(batch)

    def validate(inner) -> tuple[float, str]:
        m = kto_metrics(inner, scorer, tok, val_kept, val_rows, recipe.eval.batch_size, tc.max_length, dev,
                        use_autocast, tc)
        return m["loss"], f"validation kto loss {m['loss']:.4f} · reward accuracy {m['reward_accuracy']:.3f}"

    fitted = fit(acc, model, groups, tc, [len(r[0]) for r in rows], loss_fn, validate if val_rows else None,
                 run_dir, resume, console, autocast=use_autocast, name="kto", show_progress=show_progress,
                 loss_name="kto loss")
    inner, history, fm = fitted.model, fitted.history, fitted.metrics
    final = (kto_metrics(inner, scorer, tok, val_kept, val_rows, recipe.eval.batch_size, tc.max_length, dev,
                         use_autocast, tc) if val_rows else {})

    # ---- save: the best validation checkpoint when there was validation, else the last weights
    if main:
        with atomic_dir(run_dir / MODEL) as tmp:
            inner.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        write_data_info(run_dir, {
            "train": dc.train, "test": dc.test, "fingerprint": fingerprint(train_recs + val_recs + test),
            "records": n_all, "train_records": len(train_recs), "val_records": len(val_recs),
            "test_records": len(test), "desirable": desirable, "undesirable": len(rows) - desirable,
            "truncation": report, "start_run": str(start.run) if start.run else None})
        write_history(run_dir, history, fitted.validations)
        plot_losses(history, fitted.validations, run_dir / LOSS_PLOT)
    metrics = {
        "task": "kto",
        "method": mc.name,
        "base_model": recipe.model,
        "model_path": start.base,
        "dtype": str(dtype).replace("torch.", ""),
        "beta": tc.beta,
        "examples": len(rows),
        "desirable": desirable,
        "truncated_answers": report["truncated"],
        "dropped_records": report["dropped"],
        **fm,
        "val_reward_accuracy": final.get("reward_accuracy"),
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
