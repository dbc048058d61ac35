"""SFT LoRA training throughput: tuneloop against TRL's SFTTrainer, in one sitting, on the same work.

    python bench/train_throughput.py [--steps 10] [--warmup 2] [--batch 4] [--max-length 512]

Model: the bundled SmolLM2-135M-Instruct. Data: the construction FAQ (503 Q&A pairs), 50 held out.
LoRA r16 / alpha 32 / dropout 0 on all linear layers of all 30 blocks, AdamW lr 5e-4 with linear
decay, gradient clipping at 1.0, loss on the answers only, every run the same number of optimizer steps.
Three runs, each in its own process (so peak RSS is its own):

- `trl_default`: SFTTrainer the way its docs write it: prompt/completion conversations, the model by
  path (TRL then loads fp32 weights), SFTConfig defaults (bf16 autocast, gradient checkpointing on, no
  packing: padding to the longest in each batch). A batch is `batch x 512 / mean length` examples, so
  every run takes about the same tokens per step.
- `trl_best`: the same plus what TRL offers for this machine: bf16 weights, BFD packing (padding-free)
  into `batch` rows of `max_length`, gradient checkpointing off.
- `tuneloop_eager`: `train_sft` with a recipe of the same settings (packing into `batch` rows of
  `max_length`): bf16 weights, GEMM attention, loss on answer tokens only, no fp32 adapter-input copies.
- `tuneloop`: the same with `train.compile: true` (each decoder block compiled once, reused). Its
  tokens/s leave the compile time out, like every run leaves its warm-up out; the compile time is the
  difference in `train_wall_s` and is printed.

Measured: non-padding tokens per second over the steps after `warmup` (time between step ends), the
process's peak RSS, and MFU = tokens/s x 4 x parameters / (the best matmul peak measured here, first: bf16, or fp32 on a
CPU without bf16 arithmetic).
Loss check: every trained adapter is scored on the same 50 held-out answers by one function; the
held-out losses must agree with tuneloop's within LOSS_TOLERANCE (relative) and be below the untuned
model's, so speed never comes from doing less work.

Allocator (`--malloc`): by default each run gets the malloc its own tool starts with: the tuneloop runs
jemalloc where the machine has it, as `tuneloop train` restarts itself on it (src/tuneloop/allocator.py), TRL
and the base run the system's. `--malloc system` or `--malloc jemalloc` puts every run on the same one, so
what the allocator gives and what the code gives can be told apart. Each run records which it had.

The last line is `RESULT {json}`; results also go to bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

FAQ = "package:zaragoza_construction_faq/data/faq-en-alpaca.jsonl"
HELD_OUT = 50
SEED = 0
LR = 5e-4
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
LOSS_TOLERANCE = 0.03  # relative difference of held-out losses allowed between runs
RUNS = ("trl_default", "trl_best", "tuneloop_eager", "tuneloop")


# ----------------------------------------------------------------------------------------------------
# shared pieces


def split_faq():
    from tuneloop.data.chat import holdout, load_chat
    from tuneloop.data.formats import resolve_data_path

    records = load_chat(resolve_data_path(FAQ), "auto")
    return holdout(records, HELD_OUT / len(records), SEED)  # (train, held_out)


def matmul_peak(seconds: float = 3.0) -> dict:
    """Best bf16 (and fp32) matmul rate on this machine, TFLOP/s: the denominator of MFU."""
    import torch

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        best = 0.0
        for n in (1024, 2048, 3072):
            if dtype == torch.bfloat16 and best and best < out["float32"] / 4:
                break  # no bf16 arithmetic (AVX2 only: 0.0008 TFLOP/s seen): a 3072 square would take minutes
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            a @ b
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / 3:
                a @ b
                reps += 1
            best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12)
        out[str(dtype).replace("torch.", "")] = best
    return out


def compute_dtype():
    """The dtype tuneloop's `precision: auto` computes in on this CPU."""
    from tuneloop.infer.device import device, pick_dtype

    return pick_dtype("auto", device())


def heldout_loss(model, tok, records) -> float:
    """Mean NLL per answer token over the held-out records (bf16 autocast where the CPU has bf16 arithmetic,
    else fp32: on an AVX2-only CPU bf16 runs at 1-14 GFLOP/s; the model's own loss)."""
    import torch

    from tuneloop.infer.encode import collate
    from tuneloop.train.sft import encode_all, n_targets

    enc, _ = encode_all(tok, records, 512)
    rows = [(ids, labels, list(range(len(ids)))) for ids, labels in enc]
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute_dtype() == torch.bfloat16):
        for i in range(0, len(rows), 8):
            batch = collate(rows[i:i + 8], tok.pad_token_id, packed=False)
            out = model(**batch, num_items_in_batch=1, use_cache=False)
            total += float(out.loss)
            count += n_targets(batch)
    return total / count


def throughput(step_ends: list[float], step_tokens: list[int], warmup: int) -> dict:
    """Tokens/s over the steps after `warmup`, from the times at which steps ended."""
    t = step_ends[warmup:]
    tokens = sum(step_tokens[warmup + 1:])
    per_step = [n / (b - a) for a, b, n in zip(t, t[1:], step_tokens[warmup + 1:])]
    return {"tokens_per_s": tokens / (t[-1] - t[0]), "median_step_tokens_per_s": statistics.median(per_step),
            "measured_steps": len(t) - 1, "measured_tokens": tokens}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------
# one run (a child process)


def run_trl(kind: str, args, workdir: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tuneloop.infer.encode import load_tokenizer
    from tuneloop.zoo import resolve_model

    model_path = resolve_model("smollm2-135m-instruct")
    train, held = split_faq()
    ds = Dataset.from_list([{"prompt": [m for m in r.messages if m["role"] != "assistant"],
                             "completion": [m for m in r.messages if m["role"] == "assistant"]} for r in train])
    best = kind == "trl_best"
    # Same tokens per step: unpacked batches hold as many examples as `batch` packed rows do on average.
    tok = load_tokenizer(model_path)
    mean_len = statistics.mean(len(tok.apply_chat_template(r.messages, tokenize=True, return_dict=True)["input_ids"])
                               for r in train)
    per_device = args.batch if best else max(1, round(args.batch * args.max_length / mean_len))
    cfg = SFTConfig(
        output_dir=str(workdir / kind), max_steps=args.steps, per_device_train_batch_size=per_device,
        learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to="none", seed=SEED, max_length=args.max_length,
        dataloader_num_workers=0, disable_tqdm=True,
        use_cpu=True,  # required on a CPU machine: SFTConfig defaults to bf16, which refuses to start without it
        **({"packing": True, "gradient_checkpointing": False, "model_init_kwargs": {"dtype": "bfloat16"}}
           if best else {}),
    )
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model_path, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora)

    tokens: list[int] = []
    inner = trainer.data_collator

    def counting(features):
        batch = inner(features)
        mask = batch.get("attention_mask")
        tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
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
    rss = peak_rss_bytes()  # before the held-out scoring, which is not part of training
    # one collated batch per step (no gradient accumulation)
    result = throughput(ends, tokens[:len(ends)], args.warmup)
    result.update(kind=kind, examples_per_step=per_device, train_wall_s=wall, train_losses=losses,
                  heldout_loss=heldout_loss(trainer.model, tok, held), peak_rss_bytes=rss,
                  gradient_checkpointing=cfg.gradient_checkpointing, packing=cfg.packing,
                  model_dtype=str(next(trainer.model.parameters()).dtype))
    return result


def run_tuneloop(args, workdir: Path, compile_blocks: bool) -> dict:
    from tuneloop.config import Recipe
    from tuneloop.data.records import write_jsonl as write_records_jsonl
    from tuneloop.train.classify import load_tokenizer
    from tuneloop.train.sft import train_sft

    train, held = split_faq()
    data = workdir / "faq-train.jsonl"
    write_records_jsonl(data, train)
    recipe = Recipe.model_validate({
        "name": "bench-sft", "task": "sft", "model": "smollm2-135m-instruct",
        "data": {"train": str(data), "val_ratio": 0.0},
        "method": {"name": "lora", "r": LORA["r"], "alpha": LORA["alpha"], "dropout": LORA["dropout"],
                   "target_modules": "all-linear"},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "grad_accum": 1, "lr": LR,
                  "warmup_ratio": 0.0, "scheduler": "linear", "weight_decay": 0.0, "max_length": args.max_length,
                  "packing": True, "seed": SEED, "compile": compile_blocks},
    })
    run_dir = workdir / "tuneloop-run"
    run_dir.mkdir()
    t0 = time.perf_counter()
    metrics = train_sft(recipe, run_dir, show_progress=False)
    wall = time.perf_counter() - t0
    rss = peak_rss_bytes()  # before the held-out scoring, which is not part of training
    hist = json.loads((run_dir / "history.json").read_text())["train"]
    result = throughput([h["seconds"] for h in hist], [h["tokens"] for h in hist], args.warmup)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(metrics["model_path"])
    base = AutoModelForCausalLM.from_pretrained(metrics["model_path"], dtype=getattr(torch, metrics["dtype"]))
    model = PeftModel.from_pretrained(base, str(run_dir / "model"))
    result.update(kind="tuneloop" if compile_blocks else "tuneloop_eager", examples_per_step=None, train_wall_s=wall,
                  train_losses=[h["loss"] for h in hist], heldout_loss=heldout_loss(model, tok, held),
                  peak_rss_bytes=rss, gradient_checkpointing=False, packing=True,
                  model_dtype=metrics["dtype"])
    return result


def run_base(args, workdir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from tuneloop.train.classify import load_tokenizer
    from tuneloop.zoo import resolve_model

    path = resolve_model("smollm2-135m-instruct")
    _, held = split_faq()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=compute_dtype())
    return {"kind": "base", "heldout_loss": heldout_loss(model, load_tokenizer(path), held),
            "params": sum(p.numel() for p in model.parameters())}


def child_env(env: dict, kind: str, malloc: str) -> dict:
    """The environment a run starts with: jemalloc where `malloc` asks for it for this run, else the system's."""
    from tuneloop import allocator

    try:
        return allocator.child_env(env, malloc == "jemalloc" or (malloc == "tuneloop" and kind.startswith("tuneloop")))
    except FileNotFoundError as e:
        raise SystemExit(f"--malloc: {e}")


def child(kind: str, args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as d:
        workdir = Path(d)
        if kind == "base":
            result = run_base(args, workdir)
        elif kind.startswith("tuneloop"):
            result = run_tuneloop(args, workdir, compile_blocks=kind == "tuneloop")
        else:
            result = run_trl(kind, args, workdir)
    from tuneloop.allocator import in_use

    result["malloc"] = in_use()
    print("CHILD " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------
# the sitting


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    ap.add_argument("--batch", type=int, default=4, help="packed rows of --max-length per step")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--runs", default=",".join(RUNS), help="which runs, comma-separated")
    ap.add_argument("--malloc", choices=("tuneloop", "system", "jemalloc"), default="tuneloop",
                    help="tuneloop: each run on its own tool's malloc (the default); system / jemalloc: all on one")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args)
    if args.steps <= args.warmup + 1:
        ap.error("--steps must exceed --warmup by at least 2")

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    import torch

    console = Console()
    torch.set_num_threads(args.threads)
    console.print(f"threads {args.threads} · steps {args.steps} (first {args.warmup} not timed) · "
                  f"batch {args.batch} x {args.max_length} tokens")
    peak = matmul_peak()
    console.print(f"matmul peak here: bf16 {peak['bfloat16']:.3f} TFLOP/s, fp32 {peak['float32']:.3f} TFLOP/s")

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    results: dict[str, dict] = {}
    kinds = ["base"] + [k.strip() for k in args.runs.split(",") if k.strip()]
    for k in kinds:
        if k not in RUNS + ("base",):
            ap.error(f"--runs: unknown run {k!r} (known: {', '.join(RUNS)})")
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("runs", total=len(kinds))
        for kind in kinds:
            progress.update(task, description=f"run {kind}")
            cmd = [sys.executable, __file__, "--child", kind, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--batch", str(args.batch), "--max-length", str(args.max_length),
                   "--threads", str(args.threads)]
            proc = subprocess.run(cmd, env=child_env(env, kind, args.malloc), capture_output=True, text=True, cwd=ROOT)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("CHILD ")), None)
            if proc.returncode or line is None:
                console.print(proc.stdout[-3000:], proc.stderr[-6000:], markup=False)
                raise SystemExit(f"run {kind} failed (exit {proc.returncode})")
            results[kind] = json.loads(line[len("CHILD "):])
            r = results[kind]
            progress.console.print(f"{kind}: " + (f"{r['median_step_tokens_per_s']:,.0f} tok/s, peak RSS "
                                                  f"{r['peak_rss_bytes'] / 2**30:.2f} GiB, " if kind != "base" else "")
                                   + f"held-out loss {r['heldout_loss']:.4f}")
            progress.advance(task)

    params = results["base"]["params"]
    flops_per_token = 4 * params
    table = Table(title="SFT LoRA training, SmolLM2-135M-Instruct, construction FAQ")
    for col in ("run", "tokens/s", "median step tok/s", "MFU", "peak RSS", "malloc", "held-out loss", "vs tuneloop"):
        table.add_column(col, justify="right" if col != "run" else "left")
    ours = results.get("tuneloop")
    for kind in kinds[1:]:
        r = results[kind]
        # against the machine's best matmul rate: the bf16 peak where the CPU has bf16 arithmetic, the fp32
        # one where it has not (there tuneloop computes in fp32, and bf16 is the slower of the two)
        r["mfu"] = r["median_step_tokens_per_s"] * flops_per_token / (max(peak.values()) * 1e12)
        ratio = ours["median_step_tokens_per_s"] / r["median_step_tokens_per_s"] if ours else float("nan")
        table.add_row(kind, f"{r['tokens_per_s']:,.0f}", f"{r['median_step_tokens_per_s']:,.0f}", f"{r['mfu']:.1%}",
                      f"{r['peak_rss_bytes'] / 2**30:.2f} GiB", r["malloc"], f"{r['heldout_loss']:.4f}",
                      f"{ratio:.2f}x" if kind != "tuneloop" else "")
    console.print(table)
    base_loss = results["base"]["heldout_loss"]
    console.print(f"untuned model held-out loss: {base_loss:.4f} · FLOPs/token 4 x {params / 1e6:.1f}M = "
                  f"{flops_per_token / 1e9:.3f} GFLOP")
    for kind in kinds[1:]:
        r = results[kind]
        console.print(f"{kind}: whole training call {r['train_wall_s']:.1f} s for {args.steps} steps "
                      f"(includes loading{', compiling' if kind == 'tuneloop' else ''} and warm-up)")

    checks = {}
    if ours:
        for kind in kinds[1:]:
            r = results[kind]
            rel = abs(r["heldout_loss"] - ours["heldout_loss"]) / ours["heldout_loss"]
            checks[kind] = {"relative_difference": rel, "agrees": rel <= LOSS_TOLERANCE,
                            "below_untuned": r["heldout_loss"] < base_loss}
            if kind != "tuneloop":
                console.print(f"loss check {kind}: held-out loss differs from tuneloop's by {rel:.2%} "
                              f"(tolerance {LOSS_TOLERANCE:.0%}): {'ok' if rel <= LOSS_TOLERANCE else 'FAILED'}")
    summary = {
        "tokens_per_s": ours["median_step_tokens_per_s"] if ours else None,
        "trl_default_tokens_per_s": results.get("trl_default", {}).get("median_step_tokens_per_s"),
        "trl_best_tokens_per_s": results.get("trl_best", {}).get("median_step_tokens_per_s"),
        "mfu": ours["mfu"] if ours else None,
        "peak_rss_bytes": ours["peak_rss_bytes"] if ours else None,
        "trl_default_peak_rss_bytes": results.get("trl_default", {}).get("peak_rss_bytes"),
        "trl_best_peak_rss_bytes": results.get("trl_best", {}).get("peak_rss_bytes"),
        "matmul_peak_bf16_tflops": peak["bfloat16"],
        "matmul_peak_fp32_tflops": peak["float32"],
        "malloc": {k: results[k]["malloc"] for k in kinds[1:]},
        "loss_tolerance": LOSS_TOLERANCE,
        "losses_agree": all(c["agrees"] and c["below_untuned"] for c in checks.values()) if checks else None,
    }
    if ours:
        for kind in ("trl_default", "trl_best"):
            if kind in results:
                summary[f"speedup_vs_{kind}"] = ours["median_step_tokens_per_s"] / results[kind]["median_step_tokens_per_s"]
        if "trl_default" in results:
            summary["rss_vs_trl_default"] = ours["peak_rss_bytes"] / results["trl_default"]["peak_rss_bytes"]
    out = ROOT / "bench" / "results" / "train_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "summary": summary, "runs": results, "checks": checks}, indent=1))
    print("RESULT " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
