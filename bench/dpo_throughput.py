"""DPO LoRA training throughput: tuneloop against TRL's DPOTrainer, in one sitting, on the same pairs.

    python bench/dpo_throughput.py [--steps 10] [--warmup 2] [--batch 4] [--max-length 256] [--quick]

Model: the bundled SmolLM2-135M-Instruct. Pairs: the construction FAQ's questions (503), the firm's answer
chosen and the answer to the next question rejected (a fluent, wrong answer), HELD_OUT pairs held out.
LoRA r16 / alpha 32 / dropout 0 on all linear layers, AdamW lr 5e-4 linear decay, clipping at 1.0, beta
0.1, sigmoid loss, `batch` pairs per optimizer step, every run the same number of steps. Each run in its
own process (so peak RSS is its own):

- `trl_default`: DPOTrainer as its docs write it: the model by path (fp32 weights), DPOConfig defaults
  (bf16 autocast, gradient checkpointing on, the reference = the policy with the adapter off).
- `trl_best`: the same plus what TRL offers here: bf16 weights, gradient checkpointing off, reference
  log-probs precomputed once before training (`precompute_ref_log_probs`; its time is not in tokens/s).
  `padding_free` is not offered: since TRL's DPO refactor it warns and falls back to padding.
- `tuneloop`: `train_dpo` with a recipe of the same settings: bf16 weights, GEMM attention, answer-only
  log-probs from the final hidden states (no full logits), the reference with the adapter off, each pair
  one row [prompt | chosen | rejected] under a tree attention mask (`train.pair_rows`: the prompt computed
  once, not twice; tokens are still counted as chosen + rejected with their prompts, so MFU is effective).

Measured: tokens (chosen + rejected, no padding) per second over the steps after `warmup`, peak RSS, MFU =
tokens/s x 4 x parameters x (1 + 1/3 for the reference forward) / bf16 matmul peak measured here first.
Loss check: every trained adapter is scored on the same held-out pairs by one function (tuneloop's
validation: mean DPO loss against the untouched model); the losses must agree with tuneloop's within
LOSS_TOLERANCE (relative) and be below log 2 (the untrained loss), so speed never comes from less work.

`--quick` (3 steps, 1 warm-up, 2 pairs of 128 tokens, 8 held out) only proves the script runs. The last
line is `RESULT {json}`; results also go to bench/results/dpo_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from train_throughput import matmul_peak, peak_rss_bytes, split_faq, throughput  # noqa: E402

SEED = 0
LR = 5e-4  # LoRA-sized: at 5e-5, 10 steps leave every held-out loss at log 2, so the loss check could not tell
BETA = 0.1
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
LOSS_TOLERANCE = 0.05
RUNS = ("trl_default", "trl_best", "tuneloop")


def faq_pairs(held_out: int):
    """(train, held-out) preference records: the firm's answer over the next question's answer."""
    from tuneloop.data.records import Record

    train, held = split_faq()
    out = []
    for recs in (train, held):
        pairs = []
        for i, r in enumerate(recs):
            other = recs[(i + 1) % len(recs)]
            pairs.append(Record(prompt=r.messages[-2]["content"], chosen=r.messages[-1]["content"],
                                rejected=other.messages[-1]["content"]))
        out.append(pairs)
    return out[0], out[1][:held_out]


def heldout_dpo_loss(model, tok, pairs, max_length: int) -> float:
    """Mean DPO loss (beta BETA) of a PeftModel on the held-out pairs, the reference its adapter switched off."""
    import torch

    from tuneloop.infer.logprobs import FinalHidden
    from tuneloop.train.dpo import pair_metrics
    from tuneloop.train.preference import Scorer, encode_pairs

    rows, _, _ = encode_pairs(tok, pairs, max_length)
    base = model.get_base_model()
    hidden = FinalHidden(base)
    tc = type("TC", (), {"beta": BETA, "loss_type": "sigmoid", "label_smoothing": 0.0})
    m = pair_metrics(model, Scorer(hidden, base.get_output_embeddings().weight), rows, tok.pad_token_id, 8,
                     torch.device("cpu"), True, tc)
    hidden.handle.remove()
    return m["loss"]


def load_adapter(model_path: str, adapter_dir: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    return PeftModel.from_pretrained(base, str(adapter_dir))


# ----------------------------------------------------------------------------------------------------
# one run (a child process)


def run_trl(kind: str, args, workdir: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from tuneloop.infer.encode import load_tokenizer
    from tuneloop.zoo import resolve_model

    model_path = resolve_model("smollm2-135m-instruct")
    train, held = faq_pairs(args.held_out)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r.prompt}],
                             "chosen": [{"role": "assistant", "content": r.chosen}],
                             "rejected": [{"role": "assistant", "content": r.rejected}]} for r in train])
    best = kind == "trl_best"
    tok = load_tokenizer(model_path)
    cfg = DPOConfig(
        output_dir=str(workdir / kind), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to="none", seed=SEED, max_length=args.max_length, beta=BETA,
        dataloader_num_workers=0, disable_tqdm=True, use_cpu=True,
        **({"gradient_checkpointing": False, "precompute_ref_log_probs": True,
            "model_init_kwargs": {"dtype": "bfloat16"}} if best else {}),
    )
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model_path, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora)
    tokens: list[int] = []
    inner = trainer.data_collator

    def counting(features):
        batch = inner(features)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting
    ends: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            ends.append(time.perf_counter())

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer.add_callback(Clock())
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    rss = peak_rss_bytes()
    # the precompute pass collates every training batch first: the steps' batches are the last ones
    step_tokens = tokens[-len(ends):]
    trainer.model.save_pretrained(workdir / "adapter")
    result = throughput(ends, step_tokens, args.warmup)
    result.update(kind=kind, train_wall_s=wall, train_losses=losses, peak_rss_bytes=rss,
                  heldout_loss=heldout_dpo_loss(load_adapter(model_path, workdir / "adapter"), tok, held,
                                                args.max_length),
                  gradient_checkpointing=cfg.gradient_checkpointing, precompute_ref=cfg.precompute_ref_log_probs)
    return result


def run_tuneloop(args, workdir: Path) -> dict:
    from tuneloop.config import Recipe
    from tuneloop.data.records import write_jsonl
    from tuneloop.infer.encode import load_tokenizer
    from tuneloop.train.dpo import train_dpo

    train, held = faq_pairs(args.held_out)
    write_jsonl(workdir / "pairs.jsonl", train)
    recipe = Recipe.model_validate({
        "name": "bench-dpo", "task": "dpo", "model": "smollm2-135m-instruct",
        "data": {"train": str(workdir / "pairs.jsonl"), "val_ratio": 0.0},
        "method": {"name": "lora", **LORA, "target_modules": "all-linear"},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "lr": LR, "warmup_ratio": 0.0,
                  "scheduler": "linear", "weight_decay": 0.0, "max_length": args.max_length, "seed": SEED,
                  "beta": BETA, "compile": args.compile},
    })
    run_dir = workdir / "runs" / "tuneloop-run"
    run_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    metrics = train_dpo(recipe, run_dir, show_progress=False)
    wall = time.perf_counter() - t0
    rss = peak_rss_bytes()
    hist = json.loads((run_dir / "history.json").read_text())["train"]
    result = throughput([h["seconds"] for h in hist], [h["tokens"] for h in hist], args.warmup)
    tok = load_tokenizer(metrics["model_path"], chat=True)
    result.update(kind="tuneloop", train_wall_s=wall, train_losses=[h["loss"] for h in hist], peak_rss_bytes=rss,
                  heldout_loss=heldout_dpo_loss(load_adapter(metrics["model_path"], run_dir / "model"), tok, held,
                                                args.max_length),
                  gradient_checkpointing=False, precompute_ref=False)
    return result


def child(kind: str, args) -> None:
    import torch

    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix=f"bench-dpo-{kind}-") as d:
        if kind == "base":
            from tuneloop.zoo import resolve_model

            m = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m-instruct"))
            result = {"kind": "base", "params": sum(p.numel() for p in m.parameters())}
        elif kind == "tuneloop":
            result = run_tuneloop(args, Path(d))
        else:
            result = run_trl(kind, args, Path(d))
    print("CHILD " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------
# the sitting


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    ap.add_argument("--batch", type=int, default=4, help="pairs per step")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--held-out", type=int, default=50, help="held-out pairs the losses are checked on")
    ap.add_argument("--compile", action="store_true", help="tuneloop with train.compile (regional torch.compile)")
    ap.add_argument("--quick", action="store_true", help="3 steps of 2 pairs x 128 tokens: proves the script runs")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--runs", default=",".join(RUNS), help="which runs, comma-separated")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup, args.batch, args.max_length, args.held_out = 3, 1, 2, 128, 8
    if args.child:
        return child(args.child, args)
    if args.steps <= args.warmup + 1:
        ap.error("--steps must exceed --warmup by at least 2")

    import torch
    from rich.console import Console
    from rich.table import Table

    console = Console()
    torch.set_num_threads(args.threads)
    console.print(f"threads {args.threads} · steps {args.steps} (first {args.warmup} not timed) · "
                  f"{args.batch} pairs x {args.max_length} tokens per step")
    peak = matmul_peak(1.0 if args.quick else 3.0)
    console.print(f"matmul peak here: bf16 {peak['bfloat16']:.3f} TFLOP/s, fp32 {peak['float32']:.3f} TFLOP/s")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONWARNINGS="ignore")
    kinds = ["base"] + [k.strip() for k in args.runs.split(",") if k.strip()]
    for k in kinds[1:]:
        if k not in RUNS:
            ap.error(f"--runs: unknown run {k!r} (known: {', '.join(RUNS)})")
    results: dict[str, dict] = {}
    for kind in kinds:
        cmd = [sys.executable, __file__, "--child", kind, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch", str(args.batch), "--max-length", str(args.max_length), "--held-out", str(args.held_out),
               "--threads", str(args.threads)] + (["--compile"] if args.compile else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("CHILD ")), None)
        if proc.returncode or line is None:
            console.print(proc.stdout[-3000:], proc.stderr[-6000:], markup=False)
            raise SystemExit(f"run {kind} failed (exit {proc.returncode})")
        results[kind] = r = json.loads(line[len("CHILD "):])
        if kind != "base":
            console.print(f"{kind}: {r['median_step_tokens_per_s']:,.0f} tok/s, peak RSS "
                          f"{r['peak_rss_bytes'] / 2**30:.2f} GiB, held-out dpo loss {r['heldout_loss']:.4f}")

    # policy forward + backward (x3) and the reference forward (x1): 4/3 of an SFT step's 4 x params FLOPs
    flops_per_token = 4 * results["base"]["params"] * 4 / 3
    ours = results.get("tuneloop")
    table = Table(title="DPO LoRA training, SmolLM2-135M-Instruct, construction FAQ pairs")
    for col in ("run", "tokens/s", "median step tok/s", "MFU", "peak RSS", "held-out dpo loss", "tuneloop vs"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for kind in kinds[1:]:
        r = results[kind]
        r["mfu"] = r["median_step_tokens_per_s"] * flops_per_token / (peak["bfloat16"] * 1e12)
        ratio = ours["median_step_tokens_per_s"] / r["median_step_tokens_per_s"] if ours else float("nan")
        table.add_row(kind, f"{r['tokens_per_s']:,.0f}", f"{r['median_step_tokens_per_s']:,.0f}", f"{r['mfu']:.1%}",
                      f"{r['peak_rss_bytes'] / 2**30:.2f} GiB", f"{r['heldout_loss']:.4f}",
                      f"{ratio:.2f}x" if kind != "tuneloop" else "")
    console.print(table)
    checks = {}
    if ours:
        for kind in kinds[1:]:
            r = results[kind]
            rel = abs(r["heldout_loss"] - ours["heldout_loss"]) / ours["heldout_loss"]
            checks[kind] = {"relative_difference": rel, "agrees": rel <= LOSS_TOLERANCE,
                            "below_log2": r["heldout_loss"] < math.log(2)}
            console.print(f"loss check {kind}: {rel:.2%} from tuneloop's (tolerance {LOSS_TOLERANCE:.0%}), "
                          f"{'below' if r['heldout_loss'] < math.log(2) else 'NOT below'} log 2")
    summary = {
        "tokens_per_s": ours["median_step_tokens_per_s"] if ours else None,
        "trl_default_tokens_per_s": results.get("trl_default", {}).get("median_step_tokens_per_s"),
        "trl_best_tokens_per_s": results.get("trl_best", {}).get("median_step_tokens_per_s"),
        "peak_rss_bytes": ours["peak_rss_bytes"] if ours else None,
        "trl_default_peak_rss_bytes": results.get("trl_default", {}).get("peak_rss_bytes"),
        "trl_best_peak_rss_bytes": results.get("trl_best", {}).get("peak_rss_bytes"),
        "mfu": ours["mfu"] if ours else None,
        "matmul_peak_bf16_tflops": peak["bfloat16"],
        "loss_tolerance": LOSS_TOLERANCE,
        "losses_agree": all(c["agrees"] and c["below_log2"] for c in checks.values()) if checks else None,
        "quick": args.quick,
    }
    if ours:
        for kind in ("trl_default", "trl_best"):
            if kind in results:
                summary[f"speedup_vs_{kind}"] = ours["median_step_tokens_per_s"] / results[kind]["median_step_tokens_per_s"]
    out = ROOT / "bench" / "results" / ("dpo_throughput_quick.json" if args.quick else "dpo_throughput.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "summary": summary, "runs": results, "checks": checks}, indent=1))
    print("RESULT " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
