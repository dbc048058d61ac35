"""Small helpers shared by the training recipes (devices, precision, seeding, batching)."""

from __future__ import annotations

import random
import time
from typing import Iterator

import numpy as np
import torch

# Inference's building blocks, which the recipes use as they are.
from ..infer.device import device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def length_bucketed_batches(
    lengths: list[int], batch_size: int, seed: int, shuffle: bool = True, bucket_factor: int = 50
) -> list[list[int]]:
    """Batches of similar length, so padding wastes little compute.

    Shuffle, sort within windows of `bucket_factor` batches, cut into batches, shuffle the batches:
    randomness for SGD is kept, padding nearly vanishes.
    """
    idx = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(idx)
    window = batch_size * bucket_factor
    batches: list[list[int]] = []
    for start in range(0, len(idx), window):
        chunk = sorted(idx[start : start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    if shuffle:
        rng.shuffle(batches)
    return batches


class LogLines:
    """Where no live bar can be drawn (log files, CI, `nohup`): a plain progress line every `every_s`
    seconds (and at the last step), with the rate and ETA, so a log never goes silent for minutes."""

    def __init__(self, console, every_s: float = 5.0):
        self.console, self.every_s = console, every_s
        self.last = float("-inf")

    def __call__(self, step: int, total: int, loss: float, tps: float, elapsed: float, left: float) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s and step != total:
            return
        self.last = now
        self.console.print(f"step {step}/{total} · loss {loss:.4f} · {tps:,.0f} tok/s · "
                           f"elapsed {elapsed / 60:.1f} min · ETA {left / 60:.1f} min", highlight=False)


# ----------------------------------------------------------------------------------------------------
# methods: which PEFT config wraps the model (plain data; an unknown name fails with the known ones)

PEFT_METHODS = ("lora", "dora", "qlora", "prompt_tuning", "prefix_tuning")


def check_method_available(name: str) -> None:
    """QLoRA needs CUDA and bitsandbytes; without them it is an error, never a silent switch to LoRA."""
    if name != "qlora":
        return
    import importlib.util

    from ..errors import ConfigError

    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package")
    if missing:
        raise ConfigError(f"method.name: qlora needs {' and '.join(missing)}, which this machine lacks; "
                          f"use method.name: lora (same adapter, full-precision base weights)")


def load_kwargs(method_name: str, dtype: torch.dtype) -> dict:
    """`from_pretrained` keyword arguments for a method: 4-bit NF4 weights for QLoRA, else a dtype."""
    check_method_available(method_name)
    if method_name == "qlora":
        from transformers import BitsAndBytesConfig

        return {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16), "dtype": torch.bfloat16, "device_map": {"": 0}}
    from ..infer.attention import attention_for

    # Full fine-tuning keeps fp32 weights: bf16 master weights lose small updates.
    dtype = torch.float32 if method_name == "full" else dtype
    return {"dtype": dtype, "attn_implementation": attention_for(device(), dtype)}


def linear_module_names(model) -> list[str]:
    """What `all-linear` means, spelled out: every Linear inside the transformer blocks (not the output head)."""
    heads = {"lm_head", "score", "classifier", "pre_classifier", "dense_out"}
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] not in heads and "pooler" not in n
                   and n.count(".") >= 2})


def peft_config(method, task_type: str, n_layers: int | None, tokenizer_path: str | None = None, model=None):
    """The PEFT config for `method` (a MethodConfig), or None for full fine-tuning."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit

    name = method.name
    if name == "full":
        return None
    if name in ("lora", "dora", "qlora"):
        layers, targets = None, method.target_modules
        if method.top_layers is not None and n_layers:
            layers = list(range(max(0, n_layers - method.top_layers), n_layers))
            if targets == "all-linear":
                # PEFT accepts a layer subset only with explicit module names.
                targets = linear_module_names(model)
        return LoraConfig(task_type=task_type, r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout,
                          target_modules=targets, layers_to_transform=layers,
                          use_dora=name == "dora")
    if name == "prompt_tuning":
        if method.prompt_init_text:
            return PromptTuningConfig(task_type=task_type, num_virtual_tokens=method.num_virtual_tokens,
                                      prompt_tuning_init=PromptTuningInit.TEXT,
                                      prompt_tuning_init_text=method.prompt_init_text,
                                      tokenizer_name_or_path=tokenizer_path)
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=method.num_virtual_tokens)
    if name == "prefix_tuning":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=method.num_virtual_tokens)
    from ..errors import ConfigError

    raise ConfigError(f"method.name: unknown method {name!r} (known: full, {', '.join(PEFT_METHODS)})")


def wrap_method(model, method, task_type: str, tokenizer_path: str | None = None):
    """Wrap `model` with the method's adapter; what is trained keeps fp32 master copies."""
    if method.name == "full":
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if method.name == "qlora":
        model = prepare_model_for_kbit_training(model)
    cfg = peft_config(method, task_type, getattr(model.config, "num_hidden_layers", None), tokenizer_path, model)
    model = get_peft_model(model, cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def make_scheduler(optimizer, kind: str, warmup: int, total: int):
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[kind]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


# ----------------------------------------------------------------------------------------------------
# checkpoints: everything needed to continue bit for bit


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def warm_start(model, source, say=None) -> dict:
    """Copy the trained weights of the finished run `source` (its adapter, or its full weights, with the head)
    into `model` before training starts (`train.init_from`). A key the two do not share, or a shape that
    differs, is a ConfigError: the runs must share the base model and method. The one exception is a classify
    head whose labels changed: its rows are copied by label name and a new label's row keeps its fresh start.
    Returns what was copied: {"from", "tensors", "new_labels"}."""
    from pathlib import Path

    from safetensors.torch import load_file

    from ..errors import ConfigError
    from ..runs import ADAPTER_WEIGHTS, open_run

    run = open_run(source)
    if run.is_adapter:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        if not hasattr(model, "peft_config"):
            raise ConfigError(f"train.init_from: {run.dir} holds an adapter; this run trains full weights")
        saved = load_file(str(Path(run.model_dir) / ADAPTER_WEIGHTS))
        current = get_peft_model_state_dict(model)
    else:
        if hasattr(model, "peft_config"):
            raise ConfigError(f"train.init_from: {run.dir} holds full weights; this run trains an adapter")
        saved = {}
        for f in sorted(Path(run.model_dir).glob("*.safetensors")):
            saved.update(load_file(str(f)))
        current = {n: p for n, p in model.named_parameters()}
    old_labels = list(run.info.labels or [])
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    new_labels = [id2label[i] for i in sorted(id2label)] if old_labels else []
    missing = sorted(set(current) - set(saved))
    if missing:
        raise ConfigError(f"train.init_from: {run.dir} has no {missing[0]} ({len(missing)} tensors missing): it "
                          f"was trained with another base model or method")
    merged, grown = {}, []
    for k, cur in current.items():
        t = saved[k]
        if tuple(t.shape) == tuple(cur.shape):
            merged[k] = t
        elif (old_labels and t.ndim >= 1 and t.shape[0] == len(old_labels) and cur.shape[0] == len(new_labels)
              and tuple(t.shape[1:]) == tuple(cur.shape[1:])):
            rows = cur.detach().clone().to(t.dtype)
            for i, label in enumerate(new_labels):
                if label in old_labels:
                    rows[i] = t[old_labels.index(label)]
            merged[k] = rows
            grown = [x for x in new_labels if x not in old_labels]
        else:
            raise ConfigError(f"train.init_from: {k} is {tuple(t.shape)} in {run.dir} and {tuple(cur.shape)} here: "
                              f"the runs must share the base model and method")
    if run.is_adapter:
        set_peft_model_state_dict(model, merged)
    else:
        with torch.no_grad():
            for k, t in merged.items():
                current[k].copy_(t.to(current[k].dtype))
    if say is not None:
        say(f"warm start from {run.dir} ({len(merged)} tensors"
            + (f"; new labels start fresh: {', '.join(grown)})" if grown else ")"))
    return {"from": str(run.dir), "tensors": len(merged), "new_labels": grown}


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_dir, payload: dict) -> None:
    """One folder, replaced in one rename: a kill at any moment leaves the previous checkpoint intact."""
    from ..fileio import atomic_dir

    from ..runs import CHECKPOINT_STATE

    with atomic_dir(ckpt_dir) as tmp:
        torch.save(payload, tmp / CHECKPOINT_STATE)


def load_checkpoint(ckpt_dir) -> dict:
    from pathlib import Path

    from ..errors import NotFoundError
    from ..runs import CHECKPOINT_STATE

    path = Path(ckpt_dir) / CHECKPOINT_STATE
    if not path.exists():
        raise NotFoundError(f"{ckpt_dir}: no checkpoint to resume from (was train.checkpoint_every set?)")
    # Our own file: it holds RNG states and optimizer state, which are not plain tensors.
    return torch.load(path, map_location="cpu", weights_only=False)


# ----------------------------------------------------------------------------------------------------
# validation watch: early stopping, best checkpoint, overfitting warning


class ValWatch:
    """Tracks validations. `update` says whether this one is a new best, whether to stop (patience),
    and whether train loss fell while validation loss rose over the last `window` validations."""

    def __init__(self, patience: int | None, window: int):
        self.patience, self.window = patience, window
        self.best = float("inf")
        self.best_step = 0
        self.bad = 0
        self.points: list[tuple[int, float, float]] = []  # (step, train_loss, val_loss)
        self.overfit_warned_at: int | None = None

    def update(self, step: int, train_loss: float, val_loss: float) -> tuple[bool, bool, bool]:
        self.points.append((step, train_loss, val_loss))
        improved = val_loss < self.best
        if improved:
            self.best, self.best_step, self.bad = val_loss, step, 0
        else:
            self.bad += 1
        stop = self.patience is not None and self.bad >= self.patience
        last = self.points[-self.window:]
        overfit = len(last) == self.window and all(
            b[1] < a[1] and b[2] > a[2] for a, b in zip(last, last[1:]))
        if overfit and self.overfit_warned_at is None:
            self.overfit_warned_at = step
        return improved, stop, overfit

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, d: dict) -> None:
        vars(self).update(d)


def plot_losses(history: list[dict], validations: list[tuple[int, float, float]], path) -> None:
    """Loss curve: train loss per step and validation loss at each validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..fileio import write_bytes_atomic

    fig, ax = plt.subplots(figsize=(7, 4))
    if history:
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train", lw=1)
    if validations:
        ax.plot([v[0] for v in validations], [v[2] for v in validations], "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    from ..plots import figure_png

    fig.tight_layout()
    write_bytes_atomic(path, figure_png(fig, dpi=100))


def log_history_to_mlflow(workspace, run_id: str, history: list[dict], validations) -> None:
    """Per-step curves next to the final numbers, so MLflow draws the loss plot too."""
    import time as _time

    import mlflow
    from mlflow.entities import Metric

    from ..tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(workspace))
    now = int(_time.time() * 1000)
    ms = [Metric("train_loss", float(h["loss"]), now, int(h["step"])) for h in history]
    ms += [Metric("val_loss", float(v[2]), now, int(v[0])) for v in validations]
    for i in range(0, len(ms), 900):  # the store caps a batch at 1000 metrics
        client.log_batch(run_id, metrics=ms[i:i + 900])


def recipe_for_run(recipe):
    """The recipe as stored in a run folder: relative data paths made absolute, so `--resume` and `eval`
    find the data wherever they are started from."""
    r = recipe.model_copy(deep=True)
    r.data.train = recipe.resolve_path(recipe.data.train)
    if recipe.data.test:
        r.data.test = recipe.resolve_path(recipe.data.test)
    return r


def restore_checkpoint(ckpt_dir, model, optimizer, scheduler, watch) -> tuple[dict, list, dict | None]:
    """Put a run back exactly where its last checkpoint left it; returns (position, history, best_state)."""
    ck = load_checkpoint(ckpt_dir)
    load_trainable_state(model, ck["trainable"])
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    watch.load_state_dict(ck["watch"])
    set_rng_state(ck["rng"])
    return ck["position"], ck["history"], ck["best_state"]


def plan_steps(n_rows: int, tc) -> tuple[int, int, int, int]:
    """(batches per epoch, optimizer steps per epoch, total steps, validate every) for `n_rows` rows
    under the recipe's `train` section."""
    import math

    batches_per_epoch = math.ceil(n_rows / tc.batch_size)
    steps_per_epoch = max(1, batches_per_epoch // tc.grad_accum)
    total_steps = tc.max_steps or max(1, math.ceil(steps_per_epoch * tc.epochs))
    return batches_per_epoch, steps_per_epoch, total_steps, tc.eval_every or steps_per_epoch


class LoopState:
    """A resumable training loop's optimizer, scheduler and position, and its checkpoint.

    Builds AdamW over the parameter `groups` and the recipe's warmup schedule, and passes the model
    through `acc.prepare` (DDP when launched on several processes). Carries `pos` (step, epoch, batch
    within the epoch, micro-batch, tokens seen), the loss `history`, the validation `watch` and the
    `best_state` weights; on `resume` all of them, the optimizer, the scheduler and the RNGs come back
    from `run_dir/checkpoints/last`. `checkpoint()` writes them in one atomic folder swap on the main
    process and waits for the others, so every process leaves the call at the same step."""

    def __init__(self, acc, model, groups: list[dict], tc, total_steps: int, run_dir, resume: bool, say):
        from ..runs import checkpoint_dir

        if getattr(tc, "init_from", None) and not resume:
            warm_start(model, tc.init_from, say if acc.is_main_process else None)
        self.params = [p for g in groups for p in g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)
        self.scheduler = make_scheduler(optimizer, tc.scheduler, int(tc.warmup_ratio * total_steps), total_steps)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.inner = acc.unwrap_model(self.model)
        self.acc, self.grad_accum = acc, tc.grad_accum
        self.ckpt_dir = checkpoint_dir(run_dir)
        self.pos = {"step": 0, "epoch": 0, "batch_idx": 0, "micro": 0, "seen_tokens": 0}
        self.history: list[dict] = []
        self.watch = ValWatch(tc.patience, tc.overfit_window)
        self.best_state: dict | None = None
        if resume:
            self.pos, self.history, self.best_state = restore_checkpoint(
                self.ckpt_dir, self.inner, self.optimizer, self.scheduler, self.watch)
            if acc.is_main_process:
                say(f"resumed at step {self.pos['step']} of {total_steps} (epoch {self.pos['epoch']})")

    def global_batches(self, lengths: list[int], batch_size: int, seed: int, total_steps: int) -> Iterator[list[int]]:
        """Global batches from where the loop stands: length-bucketed and reshuffled each epoch with
        `seed + epoch`, so a resumed run goes on with exactly the batches it would have seen."""
        pos = self.pos
        while pos["step"] < total_steps:
            batches = length_bucketed_batches(lengths, batch_size, seed + pos["epoch"])
            while pos["batch_idx"] < len(batches):
                pos["batch_idx"] += 1
                yield batches[pos["batch_idx"] - 1]
            pos["epoch"] += 1
            pos["batch_idx"] = 0

    def micro_step(self) -> bool:
        """Count one backward pass; every `grad_accum`-th, clip, step the optimizer and the schedule.
        Returns whether an optimizer step was taken."""
        self.pos["micro"] += 1
        if self.pos["micro"] % self.grad_accum:
            return False
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pos["step"] += 1
        return True

    def checkpoint(self) -> None:
        if self.acc.is_main_process:
            save_checkpoint(self.ckpt_dir, {
                "trainable": trainable_state(self.inner), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "position": dict(self.pos),
                "history": self.history, "best_state": self.best_state,
                "watch": self.watch.state_dict(), "rng": rng_state()})
        self.acc.wait_for_everyone()

    def record_validation(self, val: float, say, what: str, last: bool) -> bool:
        """Book the validation loss `val` at the current step: keep the best weights, warn once when
        train loss falls while validation rises, count patience. `say` prints (main process only),
        `what` describes the value. Returns whether to stop."""
        pos, watch = self.pos, self.watch
        since = watch.points[-1][0] if watch.points else 0
        recent = [h["loss"] for h in self.history if h["step"] > since]
        improved, stop, overfit = watch.update(pos["step"], sum(recent) / len(recent), val)
        if improved:
            self.best_state = trainable_state(self.inner)
        if self.acc.is_main_process:
            say(f"step {pos['step']}: {what}{' · best' if improved else ''}")
            if overfit and watch.overfit_warned_at == pos["step"]:
                say(f"[yellow]overfitting:[/] train loss fell and validation loss rose over the last "
                    f"{watch.window} validations; the best checkpoint (step {watch.best_step}) is the one kept")
            if stop and not last:
                say(f"early stop: no better validation loss for {watch.patience} validations "
                    f"(best at step {watch.best_step})")
        return stop

