"""Regression metrics in real units, the tuned model next to a seasonal-naive baseline (the value on the
same weekday one week earlier; for daily demand it is the forecast to beat)."""

from __future__ import annotations

import json
import time
from datetime import date, timedelta
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..data.tabular import load_table
from ..errors import ConfigError, DataError
from ..infer.device import device, set_threads
from ..infer.predict import predict_z
from ..runs import TEST_RECORDS, Run, load_for_inference, open_run
from .cost import BatchTimer, system_cost
from .forgetting import forgetting_for_head, not_applicable
from .probes import load_lexicon, run_probes
from .report import print_tests, write_report
from .schema import Report, TestSet, headline, keyed, make_examples
from .slices import slice_report
from .stats import default_pairs, report_statistics

SYSTEMS = ("tuned", "seasonal_naive")


def regression_metrics(y_true: list[float], y_pred: list[float]) -> dict:
    from sklearn.metrics import mean_absolute_error, mean_absolute_percentage_error, mean_squared_error, r2_score

    return {"n": len(y_true), "mae": float(mean_absolute_error(y_true, y_pred)),
            "rmse": float(mean_squared_error(y_true, y_pred) ** 0.5),
            "mape": float(mean_absolute_percentage_error(y_true, y_pred)) if all(y_true) else None,
            "r2": float(r2_score(y_true, y_pred)) if len(y_true) > 1 else None}


def seasonal_naive(history: dict[str, float], days: list[str], season: int = 7) -> list[float | None]:
    """For each ISO date, the value `season` days earlier (None where that day is unknown)."""
    out = []
    for d in days:
        prev = (date.fromisoformat(d) - timedelta(days=season)).isoformat()
        out.append(history.get(prev))
    return out


def evaluate_regress(run_dir: "Path | Run", test_path: str | None = None, systems: list[str] | None = None,
                     out_dir: Path | None = None, show_progress: bool = True) -> dict:
    from ..data.records import fingerprint

    t0 = time.time()
    run = open_run(run_dir)
    recipe, run_dir = run.recipe, run.dir
    dc = recipe.data
    systems = systems or list(SYSTEMS)
    for name in systems:
        if name not in SYSTEMS:
            raise ConfigError(f"unknown system {name!r} for regress (known: {', '.join(SYSTEMS)})")
    set_threads(recipe.train.threads)
    dev = device()
    if test_path:
        source = test_path
        test = load_table(test_path, dc.value_field, dc.template, dc.text_field, dc.time_field, dc.lags,
                          keep=tuple(recipe.eval.slices))
    else:
        f = run_dir / TEST_RECORDS
        if not f.exists() or not f.read_text().strip():
            raise DataError(f"{run_dir}: no test records (set data.test or data.test_ratio, or pass --data)")
        source = str(f)
        test = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
        from ..data.records import Record

        test = [Record(text=t["text"], value=t["value"],
                       meta={"time": t.get("time"), **{f: t.get(f) for f in recipe.eval.slices}}) for t in test]
    y = [r.value for r in test]
    ec = recipe.eval
    meta = [{"time": r.meta.get("time"), **{f: r.meta.get(f) for f in ec.slices}} for r in test]
    examples = make_examples([r.text for r in test], y, meta)
    lexicon = load_lexicon(recipe.resolve_path(ec.probe_terms) if ec.probe_terms else None)
    probes: dict = {}
    forgetting: dict = {} if ec.forgetting else not_applicable("eval.forgetting is off")
    results: dict[str, dict] = {}
    per_example: dict[str, list[dict | None]] = {}
    cost: dict[str, dict] = {}
    pred: list[float] = []
    if "tuned" in systems:
        ts = time.time()
        tuned = load_for_inference(run, dev)
        enc = tuned.tokenizer([r.text for r in test], truncation=True, max_length=tuned.input.max_length)["input_ids"]
        timer = BatchTimer()
        z = predict_z(tuned.model, enc, tuned.tokenizer.pad_token_id, recipe.eval.batch_size, dev, tuned.autocast,
                      timer)
        cost["tuned"] = system_cost(timer, recipe.eval.price_per_hour, dev.type)
        pred = [v * tuned.target.std + tuned.target.mean for v in z]
        results["tuned"] = regression_metrics(y, pred)
        results["tuned"]["wall_seconds"] = round(time.time() - ts, 2)

        def values(xs: list[str]) -> list[float]:
            ids = tuned.tokenizer(xs, truncation=True, max_length=tuned.input.max_length)["input_ids"]
            zs = predict_z(tuned.model, ids, tuned.tokenizer.pad_token_id, ec.batch_size, dev, tuned.autocast)
            return [v * tuned.target.std + tuned.target.mean for v in zs]

        tp = time.time()
        probes = run_probes("regress", [r.text for r in test], values, ids=[e.id for e in examples], lexicon=lexicon,
                            sample=ec.probe_sample, threshold=ec.probe_threshold, tolerance=ec.probe_tolerance,
                            seed=recipe.train.seed)
        probes["seconds"] = round(time.time() - tp, 2)
        if ec.forgetting:
            tf = time.time()
            forgetting = forgetting_for_head(run, tuned, ec.forgetting_threshold, recipe.train.seed)
            forgetting["seconds"] = round(time.time() - tf, 2)
        per_example["tuned"] = [{"value": p, "abs_error": abs(p - t)} for p, t in zip(pred, y)]
    if "seasonal_naive" in systems and dc.time_field:
        # The whole series (train and test) is the history the baseline may look back into.
        # (a constant template: only the values and dates matter here)
        series = load_table(dc.train, dc.value_field, "-", dc.text_field, dc.time_field, [], dc.format) \
            if not test_path else test
        hist = {r.meta["time"]: r.value for r in series}
        days = [r.meta["time"] for r in test]
        naive = seasonal_naive(hist, days)
        keep = [i for i, v in enumerate(naive) if v is not None]
        if keep:
            results["seasonal_naive"] = regression_metrics([y[i] for i in keep], [naive[i] for i in keep])
            per_example["seasonal_naive"] = [None if v is None else {"value": v, "abs_error": abs(v - t)}
                                             for v, t in zip(naive, y)]
            if pred and len(keep) < len(y):  # the baseline skipped days without history: compare on the same days too
                results["tuned_same_days"] = regression_metrics([y[i] for i in keep], [pred[i] for i in keep])
                per_example["tuned_same_days"] = [per_example["tuned"][i] if naive[i] is not None else None
                                                  for i in range(len(y))]
    predictions = {n: keyed(examples, ps) for n, ps in per_example.items()}
    report = Report(
        task="regress", title=f"{recipe.name}: {dc.value_field}, tuned vs seasonal naive", run=str(run_dir),
        model=recipe.model, target=dc.value_field, systems=results, headline=headline(results, "mae", "lower"),
        test=TestSet(path=source, n=len(test), fingerprint=fingerprint(test)), examples=examples,
        predictions=predictions, train=run.train_metrics,
        slices=slice_report("regress", [e.model_dump() for e in examples], predictions, [r.text for r in test],
                            meta=meta, fields=ec.slices, buckets=ec.length_buckets, min_size=ec.slice_min_size,
                            seed=recipe.train.seed, lexicon=lexicon),
        probes=probes, forgetting=forgetting, cost=cost, wall_seconds=round(time.time() - t0, 2)).model_dump(mode="json")
    # tuned_same_days is tuned on the baseline's days: the paired test finds those days by itself
    report.update(report_statistics(report, default_pairs(list(results), skip=("tuned_same_days",)),
                                    seed=recipe.train.seed))
    write_report(report, Path(out_dir or run_dir))
    return report


def print_regress_table(report: dict, out: Console | None = None) -> None:
    t = Table(title=f"{report['target']}: held-out rows (n={report['test']['n']})")
    for c in ("system", "n", "MAE ↓ [95% CI]", "RMSE ↓", "MAPE ↓", "R²"):
        t.add_column(c, no_wrap=True)
    for name, m in report["systems"].items():
        iv = (report.get("intervals") or {}).get(name, {}).get("mae")
        t.add_row(name, str(m["n"]), f"{m['mae']:,.4g}" + (f" [{iv[0]:,.4g}, {iv[1]:,.4g}]" if iv else ""),
                  f"{m['rmse']:,.4g}", "-" if m["mape"] is None else f"{m['mape']:.2%}",
                  "-" if m["r2"] is None else f"{m['r2']:.3f}")
    out = out or Console()
    out.print(t)
    print_tests(report, out)
