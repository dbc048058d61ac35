"""Classification LoRA training throughput: the quickstart's recipe against a plain PEFT loop and HF `Trainer`.

    python bench/classify_throughput.py [--steps 14] [--warmup 2] [--held-out 200] [--runs ...] [--quick]

The work: recipes/quickstart-reviews.yaml as it stands (SmolLM2-135M-Instruct with a 2-way head that
starts as the answer words' output rows, LoRA r16 / alpha 32 / dropout 0 on every Linear of the top 20
of 30 blocks, batches of 16 reviews of at most 128 tokens, AdamW lr 1e-3 with 5% warm-up and linear
decay, clipping at 1.0), cut to `--steps` optimizer steps. Every run trains the same token rows (the
recipe's template around each review, encoded by tuneloop, so truncation keeps the question), the same
head start and the same LoRA, for the same steps and batch size. Each run in its own process (so peak
RSS is its own):

- `tuneloop`: `train_classifier` on the recipe (bf16 weights, GEMM attention, no fp32 adapter-input
  copies, length-bucketed batches).
- `plain`: a plain loop over PEFT + transformers as a careful user writes it: bf16 weights, SDPA
  attention, bf16 autocast, the model's own loss, AdamW + linear schedule, and tuneloop's batches in
  tuneloop's order (so its per-step losses can be laid beside tuneloop's).
- `hf_trainer`: `Trainer` + `AutoModelForSequenceClassification` the way its docs write it: the model by
  path (fp32, as stored), TrainingArguments defaults (fp32, shuffled batches padded by
  `DataCollatorWithPadding`).
- `hf_trainer_bf16`: the same with what Trainer offers for this machine: bf16 weights, `bf16=True`
  (autocast), `train_sampling_strategy="group_by_length"` (less padding).

Measured: non-padding tokens per second over the steps after `warmup` (median of per-step rates and
the overall rate), the process's peak RSS, and MFU = tokens/s x FLOPs per token / (bf16 matmul peak
measured here, first). FLOPs per token count the work the recipe needs and no more: the forward of all
30 blocks (2 x block weights), the backward of the 20 adapted ones (activation gradients only, 2 x their
weights; the frozen bottom 10 have nothing to learn), and the adapters (6 x their weights); the T x T
attention products and the embedding lookup are not counted, so MFU is a floor.

Loss check: every trained model is scored by one function (tuneloop's validation: mean cross-entropy,
bf16 autocast) on the same `--held-out` test reviews (stratified). Each held-out loss must be within
LOSS_TOLERANCE (relative) of tuneloop's and below the untrained model's, so speed never comes from less
work; the plain loop's per-step training losses (same batches) are compared with tuneloop's as well.

Allocator (`--malloc`, as in bench/train_throughput.py): by default tuneloop runs on jemalloc where the machine
has it (as `tuneloop train` and `quickstart` restart themselves on it) and the others on the system's malloc;
`--malloc system` / `--malloc jemalloc` puts every run on one. Each run records which it had.

`--quick` (3 steps, 1 warm-up, batches of 2 reviews cut at 48 tokens, 8 held out) only proves the script
runs. The last line is `RESULT {json}`; results also go to bench/results/classify_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from train_throughput import child_env, matmul_peak, peak_rss_bytes, throughput  # noqa: E402

RECIPE = ROOT / "recipes" / "quickstart-reviews.yaml"
LOSS_TOLERANCE = 0.05  # relative difference of held-out losses allowed between runs
RUNS = ("tuneloop", "plain", "hf_trainer", "hf_trainer_bf16")


# ----------------------------------------------------------------------------------------------------
# shared pieces


QUICK = ["train.batch_size=2", "train.max_length=48"]


def recipe(steps: int, quick: bool):
    from tuneloop.config import load_recipe

    return load_recipe(RECIPE, [f"train.max_steps={steps}"] + (QUICK if quick else []))


def work(args):
    """(recipe, tokenizer, model path, label words, train rows, train label ids, held-out rows, held-out ids):
    the recipe's data encoded the way `train_classifier` encodes it."""
    from tuneloop.data.validate import load_classification, stratified_sample
    from tuneloop.infer.encode import encode_texts, load_tokenizer
    from tuneloop.zoo import resolve_model

    r = recipe(args.steps, args.quick)
    dc, tc = r.data, r.train
    path = resolve_model(r.model)
    tok = load_tokenizer(path)
    train = load_classification(dc.train, dc.text_field, dc.label_field, dc.labels, dc.format)
    test = load_classification(dc.test, dc.text_field, dc.label_field, dc.labels, dc.format)
    held = stratified_sample(test.records, args.held_out, 0)
    labels = train.labels
    ids = {l: i for i, l in enumerate(labels)}

    def enc(recs):
        return encode_texts(tok, [x.text for x in recs], tc.max_length, dc.input_template, dc.as_chat,
                            dc.system_prompt, dc.truncate)

    words = [(r.eval.verbalizer or {}).get(l, l) for l in labels]
    return (r, tok, path, labels, words, enc(train.records), [ids[x.label] for x in train.records],
            enc(held), [ids[x.label] for x in held])


def lora_model(r, tok, path: str, labels: list[str], words: list[str], dtype, attn: str | None):
    """The recipe's classifier (head from the answer words, LoRA on the top blocks) built by hand with PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from tuneloop.train.classify import init_head_from_words
    from tuneloop.train.common import linear_module_names

    m = r.method
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if attn:
        kwargs["attn_implementation"] = attn
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels), **kwargs)
    model.config.pad_token_id = tok.pad_token_id
    init_head_from_words(model, path, words, r.data.input_template)
    n = model.config.num_hidden_layers
    cfg = LoraConfig(task_type="SEQ_CLS", r=m.r, lora_alpha=m.alpha, lora_dropout=m.dropout,
                     target_modules=linear_module_names(model), layers_to_transform=list(range(n - m.top_layers, n)))
    model = get_peft_model(model, cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 master copies of what is trained, as tuneloop keeps
    return model


def heldout(model, tok, enc, ys) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on the held-out rows: tuneloop's validation function, for every run."""
    import torch

    from tuneloop.train.classify import validation_scores

    return validation_scores(model, enc, ys, tok.pad_token_id, 32, torch.device("cpu"), True)


# ----------------------------------------------------------------------------------------------------
# one run (a child process)


def run_tuneloop(args, workdir: Path) -> dict:
    import torch

    from tuneloop.infer.loaders import load_classifier
    from tuneloop.train.classify import train_classifier

    r, tok, path, labels, _, _, _, enc_h, ys_h = work(args)
    run_dir = workdir / "run"
    run_dir.mkdir()
    t0 = time.perf_counter()
    train_classifier(r, run_dir, show_progress=False)
    wall = time.perf_counter() - t0
    rss = peak_rss_bytes()  # before the held-out scoring, which is not part of training
    hist = json.loads((run_dir / "history.json").read_text())["train"]
    result = throughput([h["seconds"] for h in hist], [h["tokens"] for h in hist], args.warmup)
    model, _ = load_classifier(run_dir / "model", True, path, path, torch.bfloat16, torch.device("cpu"), labels)
    loss, accuracy = heldout(model, tok, enc_h, ys_h)
    result.update(kind="tuneloop", train_wall_s=wall, train_losses=[h["loss"] for h in hist],
                  heldout_loss=loss, heldout_accuracy=accuracy, peak_rss_bytes=rss, model_dtype="bfloat16",
                  padding_fraction=None)
    return result


def run_plain(args, workdir: Path) -> dict:
    import torch
    from transformers import get_scheduler

    from tuneloop.infer.batching import pad_batch
    from tuneloop.train.common import length_bucketed_batches, seed_everything

    r, tok, path, labels, words, enc, ys, enc_h, ys_h = work(args)
    tc = r.train
    seed_everything(tc.seed)
    t0 = time.perf_counter()
    model = lora_model(r, tok, path, labels, words, torch.bfloat16, "sdpa")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = get_scheduler("linear", opt, num_warmup_steps=int(tc.warmup_ratio * args.steps),
                          num_training_steps=args.steps)
    batches = length_bucketed_batches([len(e) for e in enc], tc.batch_size, tc.seed)[:args.steps]
    ends, tokens, losses = [], [], []
    for b in batches:
        ids, mask = pad_batch([enc[i] for i in b], tok.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([ys[i] for i in b])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        tokens.append(int(mask.sum()))
        ends.append(time.perf_counter())
    wall = time.perf_counter() - t0
    rss = peak_rss_bytes()
    result = throughput(ends, tokens, args.warmup)
    loss, accuracy = heldout(model, tok, enc_h, ys_h)
    result.update(kind="plain", train_wall_s=wall, train_losses=losses, heldout_loss=loss, heldout_accuracy=accuracy,
                  peak_rss_bytes=rss, model_dtype="bfloat16", padding_fraction=None)
    return result


def run_hf_trainer(kind: str, args, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    r, tok, path, labels, words, enc, ys, enc_h, ys_h = work(args)
    tc = r.train
    best = kind == "hf_trainer_bf16"
    t0 = time.perf_counter()
    model = lora_model(r, tok, path, labels, words, torch.bfloat16 if best else None, None)
    ds = Dataset.from_dict({"input_ids": enc, "labels": ys})
    cfg = TrainingArguments(
        output_dir=str(workdir / kind), max_steps=args.steps, per_device_train_batch_size=tc.batch_size,
        learning_rate=tc.lr, lr_scheduler_type="linear", warmup_steps=int(tc.warmup_ratio * args.steps),
        weight_decay=tc.weight_decay, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none",
        seed=tc.seed, dataloader_num_workers=0, disable_tqdm=True, use_cpu=True,
        **({"bf16": True, "train_sampling_strategy": "group_by_length"} if best else {}),
    )
    pad_counts: list[tuple[int, int]] = []
    inner = DataCollatorWithPadding(tok)

    def counting(features):
        batch = inner(features)
        pad_counts.append((int(batch["attention_mask"].sum()), int(batch["attention_mask"].numel())))
        return batch

    ends: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            ends.append(time.perf_counter())

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer = Trainer(model=model, args=cfg, train_dataset=ds, data_collator=counting, processing_class=tok,
                      callbacks=[Clock()])
    trainer.train()
    wall = time.perf_counter() - t0
    rss = peak_rss_bytes()
    steps = pad_counts[:len(ends)]
    result = throughput(ends, [n for n, _ in steps], args.warmup)
    loss, accuracy = heldout(trainer.model, tok, enc_h, ys_h)
    result.update(kind=kind, train_wall_s=wall, train_losses=losses, heldout_loss=loss, heldout_accuracy=accuracy,
                  peak_rss_bytes=rss, model_dtype=str(next(model.get_base_model().parameters()).dtype),
                  padding_fraction=1 - sum(n for n, _ in steps) / sum(t for _, t in steps))
    return result


def run_base(args, workdir: Path) -> dict:
    """The untrained classifier's held-out loss and the FLOPs per token of the recipe's training step."""
    import torch

    r, tok, path, labels, words, enc, _, enc_h, ys_h = work(args)
    model = lora_model(r, tok, path, labels, words, torch.bfloat16, "sdpa")
    loss, accuracy = heldout(model, tok, enc_h, ys_h)
    from tuneloop.train.fastpath import find_blocks

    blocks = find_blocks(model)[2]
    block_weights = [sum(p.numel() for n, p in b.named_parameters() if "lora_" not in n) for b in blocks]
    adapted = [i for i, b in enumerate(blocks) if any(p.requires_grad for p in b.parameters())]
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    flops = 2 * sum(block_weights) + 2 * sum(block_weights[i] for i in adapted) + 6 * adapter
    return {"kind": "base", "heldout_loss": loss, "heldout_accuracy": accuracy, "flops_per_token": flops,
            "block_weights": sum(block_weights), "adapted_blocks": len(adapted), "blocks": len(blocks),
            "adapter_weights": adapter, "train_rows": len(enc),
            "mean_train_tokens": statistics.mean(len(e) for e in enc)}


def child(kind: str, args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as d:
        workdir = Path(d)
        if kind == "base":
            result = run_base(args, workdir)
        elif kind == "tuneloop":
            result = run_tuneloop(args, workdir)
        elif kind == "plain":
            result = run_plain(args, workdir)
        else:
            result = run_hf_trainer(kind, args, workdir)
    from tuneloop.allocator import in_use

    result["malloc"] = in_use()
    print("CHILD " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------
# the sitting


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=14, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    ap.add_argument("--held-out", type=int, default=200, help="test reviews every trained model is scored on")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--runs", default=",".join(RUNS), help="which runs, comma-separated")
    ap.add_argument("--quick", action="store_true", help="3 tiny steps: proves the script runs, measures nothing")
    ap.add_argument("--malloc", choices=("tuneloop", "system", "jemalloc"), default="tuneloop",
                    help="tuneloop: tuneloop on jemalloc, the others on the system's (the default); system / jemalloc: all on one")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup, args.held_out = 3, 1, 8
    if args.child:
        return child(args.child, args)
    if args.steps <= args.warmup + 1:
        ap.error("--steps must exceed --warmup by at least 2")
    kinds = ["base"] + [k.strip() for k in args.runs.split(",") if k.strip()]
    for k in kinds[1:]:
        if k not in RUNS:
            ap.error(f"--runs: unknown run {k!r} (known: {', '.join(RUNS)})")

    from rich.console import Console
    from rich.table import Table

    import torch

    console = Console()
    torch.set_num_threads(args.threads)
    console.print(f"threads {args.threads} · {args.steps} steps (first {args.warmup} not timed) · "
                  f"{RECIPE.relative_to(ROOT)} · {args.held_out} held-out test reviews")
    peak = matmul_peak()
    console.print(f"matmul peak here: bf16 {peak['bfloat16']:.3f} TFLOP/s, fp32 {peak['float32']:.3f} TFLOP/s")

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    results: dict[str, dict] = {}
    for kind in kinds:
        cmd = [sys.executable, __file__, "--child", kind, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--held-out", str(args.held_out), "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=child_env(env, kind, args.malloc), capture_output=True, text=True, cwd=ROOT)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("CHILD ")), None)
        if proc.returncode or line is None:
            console.print(proc.stdout[-3000:], proc.stderr[-6000:], markup=False)
            raise SystemExit(f"run {kind} failed (exit {proc.returncode})")
        r = results[kind] = json.loads(line[len("CHILD "):])
        console.print(f"{kind} ({time.perf_counter() - t0:.0f} s): "
                      + (f"{r['median_step_tokens_per_s']:,.0f} tok/s, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB, "
                         if kind != "base" else "")
                      + f"held-out loss {r['heldout_loss']:.4f}, accuracy {r['heldout_accuracy']:.3f}", highlight=False)

    base = results["base"]
    flops = base["flops_per_token"]
    ours = results.get("tuneloop")
    table = Table(title=f"Classify LoRA training (quickstart recipe), bf16 peak {peak['bfloat16']:.3f} TFLOP/s")
    for col in ("run", "tokens/s", "median step tok/s", "MFU", "peak RSS", "malloc", "padding", "held-out loss",
                "tuneloop is"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for kind in kinds[1:]:
        r = results[kind]
        r["mfu"] = r["median_step_tokens_per_s"] * flops / (peak["bfloat16"] * 1e12)
        ratio = ours["median_step_tokens_per_s"] / r["median_step_tokens_per_s"] if ours else float("nan")
        pad = r.get("padding_fraction")
        table.add_row(kind, f"{r['tokens_per_s']:,.0f}", f"{r['median_step_tokens_per_s']:,.0f}", f"{r['mfu']:.1%}",
                      f"{r['peak_rss_bytes'] / 2**30:.2f} GiB", r["malloc"], "bucketed" if pad is None else f"{pad:.0%}",
                      f"{r['heldout_loss']:.4f}", f"{ratio:.2f}x" if kind != "tuneloop" else "")
    console.print(table)
    console.print(f"FLOPs/token {flops / 1e6:.0f}M: forward of {base['blocks']} blocks + backward of "
                  f"{base['adapted_blocks']} (2 x {base['block_weights'] / 1e6:.1f}M block weights + 2 x the adapted "
                  f"ones) + 6 x {base['adapter_weights'] / 1e6:.2f}M adapter weights · untrained held-out loss "
                  f"{base['heldout_loss']:.4f} · {base['train_rows']} training reviews, "
                  f"{base['mean_train_tokens']:.0f} tokens on average", highlight=False)

    checks = {}
    if ours:
        for kind in kinds[1:]:
            r = results[kind]
            rel = abs(r["heldout_loss"] - ours["heldout_loss"]) / ours["heldout_loss"]
            checks[kind] = {"relative_difference": rel, "agrees": rel <= LOSS_TOLERANCE,
                            "below_untrained": r["heldout_loss"] < base["heldout_loss"]}
            if kind != "tuneloop":
                ok = checks[kind]["agrees"] and checks[kind]["below_untrained"]
                console.print(f"loss check {kind}: held-out loss differs from tuneloop's by {rel:.2%} "
                              f"(tolerance {LOSS_TOLERANCE:.0%}), below the untrained model's: "
                              f"{checks[kind]['below_untrained']}: {'ok' if ok else 'FAILED'}", highlight=False)
        if "plain" in results:
            pairs = list(zip(ours["train_losses"], results["plain"]["train_losses"]))
            gap = max(abs(a - b) / a for a, b in pairs)
            checks["plain"]["train_loss_max_relative_difference"] = gap
            console.print(f"plain loop vs tuneloop, same batches: per-step training losses differ by at most "
                          f"{gap:.2%}", highlight=False)

    def fig(kind: str, key: str):
        return results.get(kind, {}).get(key)

    summary = {
        "tokens_per_s": fig("tuneloop", "median_step_tokens_per_s"),
        "hf_trainer_tokens_per_s": fig("hf_trainer", "median_step_tokens_per_s"),
        "hf_trainer_bf16_tokens_per_s": fig("hf_trainer_bf16", "median_step_tokens_per_s"),
        "plain_tokens_per_s": fig("plain", "median_step_tokens_per_s"),
        "mfu": fig("tuneloop", "mfu"),
        "plain_mfu": fig("plain", "mfu"),
        "hf_trainer_mfu": fig("hf_trainer", "mfu"),
        "peak_rss_bytes": fig("tuneloop", "peak_rss_bytes"),
        "hf_trainer_peak_rss_bytes": fig("hf_trainer", "peak_rss_bytes"),
        "hf_trainer_bf16_peak_rss_bytes": fig("hf_trainer_bf16", "peak_rss_bytes"),
        "plain_peak_rss_bytes": fig("plain", "peak_rss_bytes"),
        "matmul_peak_bf16_tflops": peak["bfloat16"],
        "matmul_peak_fp32_tflops": peak["float32"],
        "flops_per_token": flops,
        "malloc": {k: results[k]["malloc"] for k in kinds[1:]},
        "loss_tolerance": LOSS_TOLERANCE,
        "losses_agree": all(c["agrees"] and c["below_untrained"] for c in checks.values()) if checks else None,
    }
    if ours:
        for kind in RUNS[1:]:
            if kind in results:
                summary[f"speedup_vs_{kind}"] = ours["median_step_tokens_per_s"] / results[kind]["median_step_tokens_per_s"]
    out = ROOT / "bench" / "results" / "classify_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "summary": summary, "runs": results, "checks": checks}, indent=1))
    print("RESULT " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
