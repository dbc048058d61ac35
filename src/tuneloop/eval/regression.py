"""Regression metrics in real units, the tuned model next to a seasonal-naive baseline (the value on the
same weekday one week earlier; for daily demand it is the forecast to beat)."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ..config import load_recipe
from ..data.tabular import load_table
from ..errors import DataError
from ..fileio import write_json_atomic
from ..train.common import device, set_threads


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


def evaluate_regress(run_dir: Path, test_path: str | None = None, out_dir: Path | None = None,
                     show_progress: bool = True) -> dict:
    from ..train.regress import load_trained, predict_z

    recipe = load_recipe(run_dir / "recipe.yaml")
    dc = recipe.data
    set_threads(recipe.train.threads)
    dev = device()
    if test_path:
        test = load_table(test_path, dc.value_field, dc.template, dc.text_field, dc.time_field, dc.lags)
    else:
        f = run_dir / "test.jsonl"
        if not f.exists() or not f.read_text().strip():
            raise DataError(f"{run_dir}: no test records (set data.test or data.test_ratio, or pass --data)")
        test = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
        from ..data.records import Record

        test = [Record(text=t["text"], value=t["value"], meta={"time": t.get("time")}) for t in test]
    model, tok, scale, dtype = load_trained(run_dir, dev)
    enc = tok([r.text for r in test], truncation=True, max_length=recipe.train.max_length)["input_ids"]
    z = predict_z(model, enc, tok.pad_token_id, recipe.eval.batch_size, dev, dtype == torch.bfloat16)
    pred = [v * scale["std"] + scale["mean"] for v in z]
    y = [r.value for r in test]
    systems = {"tuned": regression_metrics(y, pred)}
    if dc.time_field:
        # The whole series (train and test) is the history the baseline may look back into.
        # (a constant template: only the values and dates matter here)
        series = load_table(dc.train, dc.value_field, "-", dc.text_field, dc.time_field, [], dc.format) \
            if not test_path else test
        hist = {r.meta["time"]: r.value for r in series}
        days = [r.meta["time"] for r in test]
        naive = seasonal_naive(hist, days)
        keep = [i for i, v in enumerate(naive) if v is not None]
        if keep:
            systems["seasonal_naive"] = regression_metrics([y[i] for i in keep], [naive[i] for i in keep])
            if len(keep) < len(y):  # the baseline skipped days without history: compare on the same days too
                systems["tuned_same_days"] = regression_metrics([y[i] for i in keep], [pred[i] for i in keep])
    report = {"task": "regress", "run": str(run_dir), "target": dc.value_field, "n": len(test),
              "systems": systems,
              "predictions": [{"time": r.meta.get("time"), "y": a, "pred": b} for r, a, b in zip(test, y, pred)]}
    write_json_atomic(Path(out_dir or run_dir) / "report.json", report)
    return report


def print_regress_table(report: dict, out: Console | None = None) -> None:
    t = Table(title=f"{report['target']}: held-out rows (n={report['n']})")
    for c in ("system", "n", "MAE ↓", "RMSE ↓", "MAPE ↓", "R²"):
        t.add_column(c)
    for name, m in report["systems"].items():
        t.add_row(name, str(m["n"]), f"{m['mae']:,.4f}", f"{m['rmse']:,.4f}",
                  "-" if m["mape"] is None else f"{m['mape']:.2%}", "-" if m["r2"] is None else f"{m['r2']:.3f}")
    (out or Console()).print(t)
