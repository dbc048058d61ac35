"""The quickstart: real reviews, the bundled model, LoRA, and an honest three-way comparison."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console

from .config import load_recipe
from .errors import NotFoundError

console = Console()

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "quickstart-reviews.yaml"
BUDGET = "10m"  # the whole quickstart: training sized to what the evaluation leaves (`--budget`)
# The evaluation's work in units of "the tuned model reading the test set once": its wall seconds divided
# by (test tokens at eval.max_length x forward seconds per token, measured just before training). Its
# systems (base and base_fewshot on a 200-review sample, tuned and TF-IDF on all 1,000, the probes and the
# forgetting check) are fixed work, so the ratio holds from machine to machine. Measured on the quickstart
# recipe as shipped (2026-12-02, bf16 peak 1.50 TFLOP/s): the evaluation took 163 s where one read at the
# measured 1,549 forward tokens/s is 58.9 s, 2.77 reads. A recipe changed with --set may make the estimate
# wrong; the report then shows it (the wall time is printed beside the budget).
EVAL_WORK = 2.8
SETUP_S = 25  # reading the data, loading and wrapping the model, before the first training batch
# Training's least share of the budget (after setup). On a slow machine (a CPU without bf16 arithmetic computes in
# fp32, about 8x slower) the whole evaluation alone outlasts a 10-minute budget: training then got the 60 s floor,
# trained 13 reviews, and scored 0.342, below the untuned model. So the evaluation is cut to leave training this
# share, and the cut is stated.
TRAIN_SHARE = 0.5
# The evaluation's seconds by part, measured on the quickstart as shipped (2026-12-02, AMD EPYC with AVX2 only,
# fp32; 539 s of systems): base + base_fewshot on the prompted sample (200) 30%; the parts that read every test
# review (tuned, TF-IDF, the bias probes) 65%; the forgetting check, fixed work, 5%.
PROMPTED_PART, PER_TEST_PART, FIXED_PART = 0.30, 0.65, 0.05
# Below these a sample's intervals say too little to be worth its time: the evaluation is cut no further.
PROMPTED_FLOOR, TEST_FLOOR = 100, 200
# The prompted sample is cut in whole steps so that a rerun, whose measured speed differs a little, draws the
# same sample and reads base and few-shot back from the eval cache (eval/compare.py `_sample_indices`).
PROMPTED_STEP = 50
# The recipe compiles its blocks (train.compile), which pays back only over a long enough run: compiling into a
# cold Inductor cache costs the budget's probe about 57 s on a 2-core Xeon with AMX (for 46% more tokens/s, 120 s
# saved over 382) but 120-140 s on a 2-core AMD EPYC with AVX2 only (fp32, for 15-30% more tokens/s): there a
# 4.5-minute training budget trained on 290 reviews compiled and on 430 eager (2026-12-04). Under this much
# training time the quickstart trains eager; `--set train.compile=true` keeps it on.
COMPILE_MIN_TRAIN_S = 360.0


def compile_pays(train_s: float, overrides: list[str] | None) -> bool:
    """Whether the quickstart keeps the recipe's train.compile for `train_s` seconds of training: always when
    the user set train.compile themselves, else when training gets at least COMPILE_MIN_TRAIN_S."""
    if any(o.split("=", 1)[0].strip() == "train.compile" for o in overrides or []):
        return True
    return train_s >= COMPILE_MIN_TRAIN_S


def size_evaluation(eval_s: float, allowed_s: float, n_test: int, n_prompted: int,
                    cached: Callable[[int, int], bool] | None = None) -> tuple[int, int, float]:
    """(test records, prompted records, estimated seconds) for an evaluation that fits `allowed_s`, where all of
    it (`n_test` records, `n_prompted` of them for the prompted systems) takes `eval_s`. The prompted sample is
    cut first (down to PROMPTED_FLOOR, in steps of PROMPTED_STEP), then every system's test set (a stratified
    sample, down to TEST_FLOOR): the tuned model's accuracy on as many test records as possible is the figure
    the quickstart is for. `cached(test records, prompted records)`: whether the prompted systems' results for
    those samples are in the eval cache; they then cost nothing, and the test sample grows into their time."""
    def free(nt: int, npr: int) -> bool:
        return cached is not None and cached(nt, npr)

    def cost(nt: int, npr: int) -> float:
        prompted = 0.0 if free(nt, npr) else PROMPTED_PART * npr / n_prompted
        return eval_s * (FIXED_PART + prompted + PER_TEST_PART * nt / n_test)

    if cost(n_test, n_prompted) <= allowed_s:
        return n_test, n_prompted, cost(n_test, n_prompted)
    left = allowed_s / eval_s - FIXED_PART - PER_TEST_PART
    npr = int(n_prompted * left / PROMPTED_PART) // PROMPTED_STEP * PROMPTED_STEP
    npr = min(n_prompted, max(PROMPTED_FLOOR, npr))
    if cost(n_test, npr) <= allowed_s:
        return n_test, npr, cost(n_test, npr)
    prompted = 0.0 if free(n_test, npr) else PROMPTED_PART * npr / n_prompted
    nt = min(n_test, max(TEST_FLOOR, int(n_test * (allowed_s / eval_s - FIXED_PART - prompted) / PER_TEST_PART)))
    npr = min(npr, nt)
    if prompted == 0.0 and not free(nt, npr):
        # the cached prompted sample is drawn from a test sample of another size (a label's share rounds the
        # other way): priced as computed, the test sample as without the cache
        nt = min(n_test, max(TEST_FLOOR, int(n_test * (allowed_s / eval_s - FIXED_PART - PROMPTED_PART * npr
                                                       / n_prompted) / PER_TEST_PART)))
        npr = min(npr, nt)
    return nt, npr, cost(nt, npr)


def estimate_eval_seconds(recipe) -> tuple[float, float, int, torch.dtype]:
    """(seconds the evaluation will take here, forward tokens/s measured, test records, the dtype the model
    computes in): the base model reads a few batches of test reviews now, the rest is EVAL_WORK x the test
    set's tokens at that speed."""
    from transformers import AutoModelForCausalLM

    from .data.validate import load_classification
    from .infer.attention import attention_for
    from .infer.batching import pad_batch
    from .infer.device import device, pick_dtype, set_threads
    from .infer.encode import encode_texts, load_tokenizer
    from .zoo import resolve_model

    dc, ec, tc = recipe.data, recipe.eval, recipe.train
    set_threads(tc.threads)
    test = load_classification(recipe.resolve_path(dc.test), dc.text_field, dc.label_field, dc.labels, dc.format)
    model_path = resolve_model(recipe.model)
    tok = load_tokenizer(model_path)
    dev = device()
    dtype = pick_dtype(tc.precision, dev)
    enc = encode_texts(tok, [r.text for r in test.records], ec.max_length or tc.max_length, dc.input_template,
                       dc.as_chat, dc.system_prompt, dc.truncate)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype,
                                                 attn_implementation=attention_for(dev, dtype)).to(dev).eval()
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    bs = ec.batch_size
    # one warm-up batch, then three from the middle of the length distribution
    picks = [order[len(order) // 2 - bs // 2:][:bs]] + [order[q * len(order) // 4:][:bs] for q in (1, 2, 3)]
    spent, tokens = 0.0, 0
    with torch.inference_mode():
        for n, b in enumerate(picks):
            ids, mask = pad_batch([enc[i] for i in b], tok.pad_token_id)
            t = time.perf_counter()
            model.model(input_ids=ids.to(dev), attention_mask=mask.to(dev))
            if n:
                spent += time.perf_counter() - t
                tokens += ids.numel()
    del model
    rate = tokens / max(spent, 1e-9)
    return EVAL_WORK * sum(len(e) for e in enc) / rate, rate, len(enc), dtype


def run_quickstart(workspace: Path, overrides: list[str] | None = None, show_progress: bool = True,
                   budget: str | None = BUDGET) -> dict:
    from .eval.compare import evaluate_classify
    from .runs import REPORT_HTML, REPORT_JSON, open_run
    from .tracking import log_to_mlflow
    from .train import train_run

    t0 = time.time()
    if not RECIPE.exists():
        raise NotFoundError(f"{RECIPE}: quickstart recipe not found (run from a clone of the repository)")
    recipe = load_recipe(RECIPE, overrides)
    console.rule(f"[bold]tuneloop quickstart[/] · {recipe.name} · model {recipe.model}")
    console.print(f"workspace: {workspace}")
    plan = None
    if budget and recipe.train.time_budget is None:
        from .config import duration_seconds
        from .config import format_seconds as fmt_s

        total = duration_seconds(budget, "--budget")
        eval_s, rate, n_test, dtype = estimate_eval_seconds(recipe)
        if dtype == torch.float32 and recipe.train.precision == "auto" and not torch.cuda.is_available():
            console.print("this CPU has no bf16 arithmetic (oneDNN finds neither AVX512-BF16 nor AMX), so the model "
                          "computes in fp32: several times slower than on a CPU with it", highlight=False)
        avail = total - (time.time() - t0) - SETUP_S
        ec = recipe.eval
        n_prompted = min(ec.prompted_sample or n_test, n_test)
        whole_s = eval_s
        from .eval.compare import prompted_cache_check

        # base and few-shot from an earlier run on the same reviews cost nothing: their time goes to the rest
        cached = prompted_cache_check(recipe, workspace, str(dtype).removeprefix("torch."))
        nt, npr, eval_s = size_evaluation(whole_s, (1 - TRAIN_SHARE) * avail, n_test, n_prompted, cached)
        if nt < n_test:
            ec.test_sample = nt
        if npr < n_prompted:
            ec.prompted_sample = npr
        reused = cached(nt, npr)
        train_s = max(60.0, avail - eval_s)
        recipe.train.time_budget = f"{train_s:.0f}s"
        compiled = recipe.train.compile and compile_pays(train_s, overrides)
        plan = {"total_s": total, "eval_estimate_s": round(eval_s, 1), "forward_tokens_per_s": round(rate, 1),
                "train_budget_s": round(train_s, 1), "dtype": str(dtype).removeprefix("torch."),
                "test_total": n_test, "test_sample": ec.test_sample, "prompted_sample": ec.prompted_sample,
                "compile": compiled, "prompted_cached": reused}
        console.print(f"budget {fmt_s(total)}: the evaluation will take about {fmt_s(whole_s)} here (the model reads "
                      f"{rate:,.0f} tokens/s)", highlight=False, end="")
        cut = (nt, npr) != (n_test, n_prompted)
        if reused:
            console.print(f"; base and few-shot on {npr:,} reviews are read back from the eval cache (an earlier run)"
                          + ("" if cut else f", about {fmt_s(eval_s)} left to compute"), highlight=False, end="")
        if not cut:
            console.print(f", so training gets {fmt_s(train_s)}", highlight=False)
        else:
            # what a budget needs for nothing to be cut: the whole evaluation, and as much again for training
            enough = math.ceil(((time.time() - t0) + SETUP_S + whole_s / (1 - TRAIN_SHARE)) / 60)
            where = (f"every system on a stratified {ec.test_sample:,} of the {n_test:,} test reviews, "
                     if ec.test_sample else "")
            console.print(f", which would leave training less than half; cut to about {fmt_s(eval_s)} ({where}base "
                          f"and few-shot on {ec.prompted_sample:,}), so training gets {fmt_s(train_s)} "
                          f"(`--budget {enough}m` evaluates everything)", highlight=False)
        if recipe.train.compile and not compiled:
            recipe.train.compile = False
            console.print(f"training eager: compiling the blocks costs minutes into a cold cache here and pays back "
                          f"only over {fmt_s(COMPILE_MIN_TRAIN_S)} of training or more "
                          f"(`--set train.compile=true` compiles anyway)", highlight=False)
    run_dir, train_metrics = train_run(recipe, workspace, show_progress)
    # with a budget that left examples out or stopped the run early, say how many were trained on
    b = train_metrics.get("budget") or {}
    kept = b.get("trained_rows", b.get("kept", train_metrics["examples"]))
    console.print(
        f"trained {train_metrics['steps']} steps on {kept} of {train_metrics['examples']} reviews in "
        f"{train_metrics['train_seconds']:.0f} s ({train_metrics['tokens_per_second']:.0f} tokens/s, "
        f"{train_metrics['trainable_params']:,} trainable parameters, {train_metrics['dtype']})"
    )
    report = evaluate_classify(open_run(run_dir), show_progress=show_progress, print_results=False)
    report["wall_seconds"] = round(time.time() - t0, 2)
    if plan is not None:
        report["budget"] = {**plan, "train": train_metrics.get("budget"), "wall_s": report["wall_seconds"]}
    from .eval.report import print_table, write_report

    write_report(report, run_dir)
    print_table(report, console)
    metrics = {f"{name}.{k}": v[k] for name, v in report["systems"].items() for k in ("accuracy", "macro_f1")}
    metrics["wall_seconds"] = report["wall_seconds"]
    log_to_mlflow(workspace, recipe.name, f"{run_dir.name}-eval", {"run": str(run_dir)}, metrics,
                  artifacts=[run_dir / REPORT_JSON, run_dir / REPORT_HTML], tags={"stage": "eval"})
    if plan is not None:
        from .eval.report import budget_summary

        console.print(budget_summary(report), highlight=False)
    console.print(f"report: {run_dir / REPORT_HTML}  ·  total {report['wall_seconds']:.0f} s")
    return report

