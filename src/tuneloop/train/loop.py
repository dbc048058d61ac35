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

from ..infer.batching import progress_columns
from .common import LoopState, load_trainable_state, log_line, plan_steps

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
        loss_name: str = "loss") -> Fitted:
    """Train `model` on rows `0..len(lengths)-1` under the recipe's `train` section `tc`.

    `groups` are AdamW parameter groups (each with its `lr`); `acc` is the run's `Accelerator`;
    `console` a rich Console the progress bar and messages go to; `name` labels the bar, `loss_name`
    the loss in it. With `resume`, the optimizer, schedule, RNGs, position and history come back from
    `run_dir/checkpoints/last`. `validate` None means no validation (nothing extra per step)."""
    if not lengths:
        from ..errors import ConfigError

        raise ConfigError("data.train: no training records left after the validation hold-out (data.val_ratio)")
    main = acc.is_main_process
    dev = acc.device
    batches_per_epoch, _, total_steps, eval_every = plan_steps(len(lengths), tc)
    state = LoopState(acc, model, groups, tc, total_steps, run_dir, resume, console.print)
    model, inner, scheduler = state.model, state.inner, state.scheduler
    pos, history, watch = state.pos, state.history, state.watch

    model.train()
    world, rank = acc.num_processes, acc.process_index
    stop, stopped_early = False, False
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
            if show_progress and main and not console.is_terminal:
                log_line(console, pos["step"], total_steps, step_loss, tps, time.time() - t_train)

            last = pos["step"] >= total_steps
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
    }
    return Fitted(inner, history, watch.points, metrics)


