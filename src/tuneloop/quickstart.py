"""The quickstart: real reviews, the bundled model, LoRA, and an honest three-way comparison."""

from __future__ import annotations

import time
from pathlib import Path

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


def estimate_eval_seconds(recipe) -> tuple[float, float]:
    """(seconds the evaluation will take here, forward tokens/s measured): the base model reads a few
    batches of test reviews now, the rest is EVAL_WORK x the test set's tokens at that speed."""
    import torch
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
    return EVAL_WORK * sum(len(e) for e in enc) / rate, rate


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
        eval_s, rate = estimate_eval_seconds(recipe)
        train_s = max(60.0, total - (time.time() - t0) - eval_s - SETUP_S)
        recipe.train.time_budget = f"{train_s:.0f}s"
        plan = {"total_s": total, "eval_estimate_s": round(eval_s, 1), "forward_tokens_per_s": round(rate, 1),
                "train_budget_s": round(train_s, 1)}
        console.print(f"budget {fmt_s(total)}: the evaluation will take about {fmt_s(eval_s)} here (the model reads "
                      f"{rate:,.0f} tokens/s), so training gets {fmt_s(train_s)}", highlight=False)
    run_dir, train_metrics = train_run(recipe, workspace, show_progress)
    # with a budget that left examples out, say how many were trained on, not how many there were
    kept = (train_metrics.get("budget") or {}).get("kept", train_metrics["examples"])
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

