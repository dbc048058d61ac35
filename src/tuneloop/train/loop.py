"""The one training loop every task runs: `fit`.

A task brings its model, its parameter groups, the lengths of its training rows and two functions:
its loss on a batch of rows, and (optionally) its validation. `fit` does the rest, the same for every
task: AdamW and the warm-up schedule, length-bucketed global batches reshuffled per epoch, gradient
accumulation and clipping, bf16 autocast, the loss history, validation every `train.eval_every` steps
with early stopping, the overfitting warning and the best weights kept, atomic checkpoints every
`train.checkpoint_every` steps and exact resume from them, and `accelerate launch` / `torchrun` DDP.

How scale-out stays exact: each process takes every `world`-th row of a global batch, and the task's
loss on those rows is its *share* of the global batch's loss (summed over its rows, divided by the
size of the whole global batch, in examples or tokens). DDP averages gradients over processes, so
the share is scaled by `world` before backward: N processes then take the same step as one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from rich.progress import Progress

from .. import allocator
from ..infer.batching import progress_columns
from . import budget as budgets
from .common import LogLines, LoopState, load_trainable_state, plan_steps

# (model, my rows, the whole global batch) -> my share of the global batch's loss (see the module doc)
LossFn = Callable[[torch.nn.Module, list[int], list[int]], torch.Tensor]
# (unwrapped model) -> (validation loss, what to print about it); called on every process at once
ValidateFn = Callable[[torch.nn.Module], tuple[float, str]]


@dataclass
class Fitted:
    """What `fit` leaves: the unwrapped model holding the weights to save (the best validation ones
    when there was validation, else the last), the loss history and the numbers every task reports."""

    model: torch.nn.Module
    history: list[dict]
    validations: list[tuple[int, float, float]]  # (step, train loss, validation loss)
    metrics: dict


def fit(acc, model, groups: list[dict], tc, lengths: list[int], loss_fn: LossFn, validate: ValidateFn | None,
        run_dir: Path, resume: bool, console, *, autocast: bool, name: str, show_progress: bool = True,
        loss_name: str = "loss", strata: list | None = None, val_tokens: int = 0,
        probe_loss_fn: LossFn | None = None) -> Fitted:
    """Train `model` on rows `0..len(lengths)-1` under the recipe's `train` section `tc`.

    `groups` are AdamW parameter groups (each with its `lr`); `acc` is the run's `Accelerator`;
    `console` a rich Console the progress bar and messages go to; `name` labels the bar, `loss_name`
    the loss in it. With `resume`, the optimizer, schedule, RNGs, position and history come back from
    `run_dir/checkpoints/last`. `validate` None means no validation (nothing extra per step).

    With `train.time_budget`, the run is first sized to it (budget.py): `strata` (one per row, e.g. its
    label) keep the class shares when examples must be left out, `val_tokens` (the validation rows'
    tokens) prices each validation, `probe_loss_fn` (default `loss_fn`) is what the budget's probe times: a
    first-epoch step, where `loss_fn` keeps state across calls (the frozen-layer cache would replay the probe's
    second sight of a batch, verifying and compiling once inside the timing). Training also stops once the
    budget is spent, whatever the plan said."""
    if not lengths:
        from ..errors import ConfigError

        raise ConfigError("data.train: no training records left after the validation hold-out (data.val_ratio)")
    main = acc.is_main_process
    dev = acc.device
    t_fit = time.time()
    plan = None
    if tc.time_budget is not None:
        plan = _sized(acc, model, probe_loss_fn or loss_fn, lengths, tc, strata, val_tokens if validate is not None else 0,
                      run_dir, resume, autocast)
        if main:
            console.print(plan.message(), highlight=False)
        if plan.rows is not None:
            rows, row_loss = plan.rows, loss_fn
            lengths = [lengths[i] for i in rows]

            def loss_fn(m, mine, batch):  # the loop counts kept rows; the task knows them by their own index
                return row_loss(m, [rows[i] for i in mine], [rows[i] for i in batch])
        tc = tc.model_copy(update={"max_steps": plan.steps})
    batches_per_epoch, _, total_steps, eval_every = plan_steps(len(lengths), tc)
    state = LoopState(acc, model, groups, tc, total_steps, run_dir, resume, console.print)
    model, inner, scheduler = state.model, state.inner, state.scheduler
    pos, history, watch = state.pos, state.history, state.watch

    model.train()
    world, rank = acc.num_processes, acc.process_index
    stop, stopped_early, budget_stop = False, False, None
    log_line = LogLines(console)
    first_step = pos["step"]
    # The ETA is priced from the steps after the first: the first one compiles (train.compile) and warms the
    # allocator, and counting it once said 44 minutes for a 6-minute run (the FAQ recipe, compiled).
    eta_said = first_step + max(3, min(5, total_steps // 20))
    t_steady = None
    window: list[float] = []
    t_train, tokens_at_start = time.time(), pos["seen_tokens"]
    with Progress(*progress_columns(), console=console, disable=not (show_progress and main)) as progress:
        task = progress.add_task(name, total=total_steps, completed=pos["step"], info="")
        for global_batch in state.global_batches(lengths, tc.batch_size, tc.seed, total_steps):
            mine = global_batch[rank::world]
            # A process with no share still joins the gradient all-reduce, with a zero loss.
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                share = loss_fn(model, mine or global_batch[:1], global_batch)
            if not mine:
                share = share * 0
            acc.backward(share * world / tc.grad_accum)
            pos["seen_tokens"] += sum(lengths[i] for i in global_batch)
            window.append(share.detach().item())
            if not state.micro_step():
                continue
            step_loss = sum(window[-tc.grad_accum:]) / tc.grad_accum
            if world > 1:
                step_loss = float(acc.reduce(torch.tensor(step_loss, device=dev), reduction="sum"))
            # tokens = all tokens of the step; time since the start of training, so a benchmark can
            # leave the warm-up steps out
            history.append({"step": pos["step"], "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                            "tokens": pos["seen_tokens"] - (history[-1].get("seen", tokens_at_start) if history else tokens_at_start),
                            "seen": pos["seen_tokens"], "seconds": round(time.time() - t_train, 4)})
            tps = (pos["seen_tokens"] - tokens_at_start) / max(1e-9, time.time() - t_train)
            progress.update(task, advance=1, info=f"{loss_name} {step_loss:.4f} · {tps:,.0f} tok/s")
            if t_steady is None:
                t_steady, steady_from = time.time(), pos["step"]
                left = (time.time() - t_train) / max(1, pos["step"] - first_step) * (total_steps - pos["step"])
            else:
                left = (time.time() - t_steady) / (pos["step"] - steady_from) * (total_steps - pos["step"])
            if show_progress and main and not console.is_terminal:
                log_line(pos["step"], total_steps, step_loss, tps, time.time() - t_train, left)
            if main and pos["step"] == eta_said and pos["step"] < total_steps:
                console.print(f"step {pos['step']}/{total_steps}: {tps:,.0f} tokens/s; training ends in about "
                              f"{budgets.fmt_s(left)} ({time.strftime('%H:%M', time.localtime(time.time() + left))})",
                              highlight=False)

            last = pos["step"] >= total_steps
            if plan is not None and not last and time.time() - t_fit > plan.budget_s:
                # Slower than measured (a busy machine): the budget wins over the plan.
                budget_stop = pos["step"]
                last = True
                if main:
                    console.print(f"[yellow]time budget spent[/] at step {pos['step']} of {total_steps}; stopping here")
            if validate is not None and (pos["step"] % eval_every == 0 or last):
                # The unwrapped model: a DDP forward is a collective (buffer sync), and processes may
                # hold different numbers of validation batches.
                val, what = validate(inner)
                stop = state.record_validation(val, progress.console.print, what, last)
                stopped_early = stop and not last
            if tc.checkpoint_every and pos["step"] % tc.checkpoint_every == 0 and not last and not stop:
                state.checkpoint()
            if last or stop:
                break
    train_seconds = time.time() - t_train

    if state.best_state is not None:
        load_trainable_state(inner, state.best_state)
    inner.eval()
    tail = history[-max(1, len(history) // 10):]
    metrics = {
        "steps": pos["step"],
        "epochs_done": round(pos["epoch"] + pos["batch_idx"] / max(1, batches_per_epoch), 3),
        "train_tokens": pos["seen_tokens"],
        "train_seconds": round(train_seconds, 2),
        "tokens_per_second": round((pos["seen_tokens"] - tokens_at_start) / max(1e-9, train_seconds), 1),
        "first_loss": history[0]["loss"] if history else None,
        "final_loss": sum(h["loss"] for h in tail) / len(tail) if tail else None,
        "best_val_loss": watch.best if watch.points else None,
        "best_step": watch.best_step if watch.points else None,
        "stopped_early": stopped_early,
        "overfit_warning_step": watch.overfit_warned_at,
        "processes": world,
        "malloc": allocator.in_use(),  # jemalloc or the system's: it moves speed and memory (allocator.py)
    }
    if plan is not None:
        # the examples the run really trained on: fewer than the plan kept when the budget stopped it early
        # (each step reads batch_size x grad_accum of them, the first epoch without repeats)
        trained = plan.kept if budget_stop is None else min(plan.kept, budget_stop * tc.batch_size * tc.grad_accum)
        metrics["budget"] = {**plan.record(), "rows": None, "stopped_at_budget": budget_stop,
                             "trained_rows": trained, "fit_seconds": round(time.time() - t_fit, 2)}
    return Fitted(inner, history, watch.points, metrics)




def _sized(acc, model, loss_fn, lengths, tc, strata, val_tokens, run_dir, resume, autocast) -> "budgets.Plan":
    """The run's plan under `train.time_budget`: measured and made now, or read back when resuming (a
    resumed run must see the batches the first attempt planned). Every process gets the main one's plan."""
    if resume:
        plan = budgets.read(run_dir)
        if plan is not None:
            return plan
    from accelerate.utils import broadcast_object_list

    from ..config import duration_seconds

    rate, probe_s = budgets.measure(model, loss_fn, lengths, tc.batch_size, tc.seed, acc.device, autocast,
                                    acc.num_processes, acc.process_index)
    if acc.num_processes > 1:
        # Each process runs its 1/world share of a batch at once: the slowest share sets the step's pace.
        rate = float(acc.gather(torch.tensor([rate], device=acc.device)).max()) / acc.num_processes
    every = tc.eval_every

    def n_validations(steps: int, per_epoch: int) -> int:
        if not val_tokens:
            return 0
        e = every or per_epoch
        return steps // e + (1 if steps % e else 0)

    made = [budgets.plan(duration_seconds(tc.time_budget), rate, probe_s, lengths, tc, strata, val_tokens,
                         n_validations, plan_steps) if acc.is_main_process else None]
    if acc.num_processes > 1:
        broadcast_object_list(made)
    plan = made[0]
    if acc.is_main_process:
        budgets.write(run_dir, plan)
    return plan
