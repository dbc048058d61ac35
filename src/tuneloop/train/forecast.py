"""Recipe `regress` with a `forecast:` section: demand forecasting, a documented hybrid.

A pure LLM regressor reading the rendered row loses to seasonal naive on Chicago ridership (MAE 1,974 vs
1,358, README), so the tuned system is boosting plus the LLM: scikit-learn's HistGradientBoosting forecasts
from lags, the calendar, holidays and the known features, and the LLM learns, from the row rendered as text
(holiday names, weather, events, boosting's own forecast), what boosting misses.

Reads top to bottom: data (the time table, the backtest origins; only targets up to the first origin are
used here) → boosting fitted on them, and out-of-fold boosting forecasts of the latest `residual_rows`
targets (expanding folds: each fold forecast by boosting fitted on the targets before it) → the LLM fitted on
those residuals (the shared loop, train/loop.py) → the residual weight w (tuned = boosting + w x residual)
picked on the validation tail → save: the model, the boosting models (the backtest one, and one refitted on
all the data for `tuneloop forecast`) and the time table.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from ..config import Recipe
from ..data.records import Record, fingerprint
from ..data.timeseries import TimeTable, actual, default_lags, design, target_rows, usable_lags
from ..errors import ConfigError
from ..fileio import atomic_dir
from ..infer.batching import pad_batch
from ..infer.device import pick_dtype, set_threads
from ..infer.encode import load_tokenizer
from ..infer.forecast import DEFAULT_TEMPLATE, Forecaster, gbm_predict, read_recipe_table, render_texts, save_forecaster
from ..infer.predict import predict_z
from ..runs import LOSS_PLOT, MODEL, Fingerprints, TargetScale, finish_run, write_data_info, write_history, write_recipe
from ..zoo import resolve_model
from .common import plot_losses, recipe_for_run, seed_everything
from .loop import fit
from .regress import build_regressor

console = Console(stderr=True)
# boosting on more rows than this gains little and costs minutes on a 2-core CPU: a seeded sample
MAX_GBM_ROWS = 200_000


def backtest_origins(table: TimeTable, horizon: int, origins: int, step: int) -> list[int]:
    """Origins (steps) `step` apart, the last one `horizon` steps before the latest series ends."""
    last = max(table.end.values()) - horizon
    out = [last - step * (origins - 1 - i) for i in range(origins)]
    if out[0] - min(table.start.values()) < 2 * horizon:
        raise ConfigError(f"forecast.origins: {origins} origins {step} steps apart leave too little data "
                          f"before the first origin ({out[0] - min(table.start.values())} steps)")
    return out


def fit_gbm(X: np.ndarray, y: np.ndarray, fc, seed: int):
    from threadpoolctl import threadpool_limits

    # One OpenMP thread: on the shared 2-core machine boosting's spinning threads fight the other jobs
    # (measured: 2,000 rows x 200 iterations, 47 s with two threads under load, 3.9 s with one).
    # A column with no value at all in these rows (a long lag in an early fold: the year-ago value before a
    # year of history) makes scikit-learn's binning fail (1.9: "window shape cannot be larger than input
    # array shape"). As a constant it is never split on, so the forecast ignores it, as it should.
    X = np.where(np.isnan(X).all(axis=0)[None, :], 0.0, X) if len(X) else X
    with threadpool_limits(1):
        return _gbm(fc, seed).fit(X, y)


def _gbm(fc, seed: int):
    from sklearn.ensemble import HistGradientBoostingRegressor

    return HistGradientBoostingRegressor(loss=fc.gbm_loss, max_iter=fc.gbm_iterations,
                                          learning_rate=fc.gbm_learning_rate, categorical_features=[0],
                                          max_depth=fc.gbm_max_depth, min_samples_leaf=fc.gbm_min_leaf,
                                          early_stopping=False, random_state=seed)


def training_rows(table: TimeTable, last: int, horizon: int, min_history: int, seed: int) -> list[tuple]:
    rows = target_rows(table, -10**9, last, list(range(1, horizon + 1)), min_history)
    if len(rows) > MAX_GBM_ROWS:
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), MAX_GBM_ROWS, replace=False))
        rows = [rows[i] for i in keep]
    return rows


def targets(table: TimeTable, rows: list[tuple]) -> np.ndarray:
    return np.array([actual(table, s, k) for s, k, _ in rows])


def residual_rows(table: TimeTable, first: int, fc, min_history: int, seed: int) -> list[tuple]:
    """The latest `residual_rows` (series, step) targets up to `first`, each at one seeded horizon."""
    rng = np.random.default_rng(seed)
    cand = sorted(((k, s) for s in table.series for k in range(table.start[s] + min_history + fc.horizon,
                                                                   min(first, table.end[s]) + 1)))
    cand = cand[-fc.residual_rows:]
    return [(s, k, int(h)) for (k, s), h in zip(cand, rng.integers(1, fc.horizon + 1, len(cand)))]


def fit_gbm_before(table: TimeTable, pool: list[tuple], step, lags, scale, fc, seed: int):
    """Boosting fitted on the pool's targets before `step`, or None when fewer than 10 are."""
    before = [r for r in pool if r[1] < step]
    if len(before) < 10:
        return None
    d = design(table, before, lags, scale)
    return fit_gbm(d.X, targets(table, before) / d.scale, fc, seed)


def out_of_fold(table: TimeTable, pool: list[tuple], res: list[tuple], fc, lags, scale, min_history, seed):
    """Boosting's forecast of each residual row by a model fitted only on targets before its fold."""
    steps = np.array([k for _, k, _ in res])
    bounds = np.quantile(steps, np.linspace(0, 1, fc.residual_folds + 1))
    pred = np.full(len(res), np.nan)
    for j in range(fc.residual_folds):
        lo, hi = bounds[j], bounds[j + 1]
        idx = np.flatnonzero((steps >= lo) & ((steps <= hi) if j == fc.residual_folds - 1 else (steps < hi)))
        if not idx.size:
            continue
        model = fit_gbm_before(table, pool, lo, lags, scale, fc, seed)
        if model is None:
            raise ConfigError(f"forecast.residual_rows: {fc.residual_rows} leaves too few targets before the "
                              f"first fold to fit boosting on; lower it or forecast.residual_folds")
        d = design(table, [res[i] for i in idx], lags, scale)
        pred[idx] = gbm_predict(model, d)
    return pred


def train_forecaster(recipe: Recipe, run_dir: Path, show_progress: bool = True, resume: bool = False) -> dict:
    from accelerate import Accelerator

    t0 = time.time()
    tc, fc, mc = recipe.train, recipe.forecast, recipe.method
    acc = Accelerator(cpu=not torch.cuda.is_available())
    set_threads(tc.threads)
    seed_everything(tc.seed)
    dev = acc.device

    # ---- data: nothing after the first backtest origin is read below
    table = read_recipe_table(recipe)
    seasons = table.seasons()
    origins = backtest_origins(table, fc.horizon, fc.origins, fc.step or fc.horizon)
    first = origins[0]
    lags = usable_lags(table, fc.lags or default_lags(table.freq, fc.horizon), first)
    min_history = seasons[0] if seasons else 1
    scale = {}
    for s in table.series:
        seen = table.values[s][: max(1, first - table.start[s] + 1)]
        scale[s] = float(np.mean(np.abs(seen))) or 1.0
    pool = training_rows(table, first, fc.horizon, min_history, tc.seed)
    if len(pool) < 20:
        raise ConfigError(f"data.train: {len(pool)} training targets before the first backtest origin; need more "
                          f"data or fewer forecast.origins")

    # ---- boosting, and its out-of-fold forecasts of the residual rows
    tg = time.time()
    d_pool = design(table, pool, lags, scale)
    gbm = fit_gbm(d_pool.X, targets(table, pool) / d_pool.scale, fc, tc.seed)
    res = residual_rows(table, first, fc, min_history, tc.seed)
    oof = out_of_fold(table, pool, res, fc, lags, scale, min_history, tc.seed)
    keep = ~np.isnan(oof)
    res, oof = [r for r, k in zip(res, keep) if k], oof[keep]
    d_res = design(table, res, lags, scale)
    y_res = targets(table, res)
    gbm_seconds = time.time() - tg

    # ---- the LLM on the residual over the series' scale, the latest rows held out for validation
    template = recipe.data.template or DEFAULT_TEMPLATE
    texts = render_texts(template, d_res, oof)
    r = (y_res - oof) / d_res.scale
    n_val = max(1, int(round(len(res) * recipe.data.val_ratio))) if recipe.data.val_ratio else 0
    order = np.argsort([k for _, k, _ in res], kind="stable")
    tr_idx, va_idx = order[: len(order) - n_val], order[len(order) - n_val:]
    if len(tr_idx) < 2:
        raise ConfigError(f"forecast.residual_rows: {len(tr_idx)} rows left to tune on; need at least 2")
    mean, std = float(r[tr_idx].mean()), float(r[tr_idx].std()) or 1.0
    model_path = resolve_model(recipe.model)
    tok = load_tokenizer(model_path)
    enc_all = tok(texts, truncation=True, max_length=tc.max_length)["input_ids"]
    enc = [enc_all[i] for i in tr_idx]
    enc_val = [enc_all[i] for i in va_idx]
    z = [(r[i] - mean) / std for i in tr_idx]
    z_val = [(r[i] - mean) / std for i in va_idx]
    dtype = pick_dtype(tc.precision, dev)
    from .common import wrap_method  # noqa: F401  (build_regressor wraps the method)

    model = build_regressor(model_path, mc, dtype, tok.pad_token_id)
    use_autocast = dtype == torch.bfloat16 and mc.name != "full"
    heads = ("score", "classifier", "pre_classifier")
    head = [p for n, p in model.named_parameters() if p.requires_grad and any(h in n for h in heads)]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not any(h in n for h in heads)]
    groups = [{"params": body, "lr": tc.lr}] + ([{"params": head, "lr": tc.head_lr or tc.lr}] if head else [])
    if acc.is_main_process and not resume:
        write_recipe(run_dir, recipe_for_run(recipe))

    def loss_fn(model, mine: list[int], batch: list[int]) -> torch.Tensor:
        ids, mask = pad_batch([enc[i] for i in mine], tok.pad_token_id)
        y = torch.tensor([z[i] for i in mine], dtype=torch.float32)
        pred = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float().view(-1)
        return ((pred - y.to(dev)) ** 2).sum() / len(batch)

    def validate(model) -> tuple[float, str]:
        pz = predict_z(model, enc_val, tok.pad_token_id, recipe.eval.batch_size, dev, use_autocast)
        val = sum((a - b) ** 2 for a, b in zip(pz, z_val)) / len(z_val)
        return val, f"validation residual mse {val:.4f}"

    fitted = fit(acc, model, groups, tc, [len(e) for e in enc], loss_fn, validate if enc_val else None,
                 run_dir, resume, console, autocast=use_autocast, name="forecast", show_progress=show_progress,
                 loss_name="mse")
    inner = fitted.model

    # ---- the residual weight, on the validation tail (0 when the residual does not help boosting there)
    # The weight is judged against boosting as the forecast will use it: fitted on every target before the
    # validation rows. The folds' boosting, fitted on less, errs more, and a residual learned against it
    # looks better than it is (electricity, 365 days, judged on the fold forecasts: validation MAE 21.2 →
    # 15.8 with the residual, weight 1; backtest 7.8 for boosting → 15.2 with it).
    weight, by_weight = 1.0, {}
    if enc_val:
        val_rows = [res[i] for i in va_idx]
        gbm_val = fit_gbm_before(table, pool, min(k for _, k, _ in val_rows), lags, scale, fc, tc.seed)
        base_val, enc_judge = oof[va_idx], enc_val
        if gbm_val is not None:
            d_val = design(table, val_rows, lags, scale)
            base_val = gbm_predict(gbm_val, d_val)
            enc_judge = tok(render_texts(template, d_val, base_val), truncation=True,
                            max_length=tc.max_length)["input_ids"]
        pz = np.asarray(predict_z(inner, enc_judge, tok.pad_token_id, recipe.eval.batch_size, dev, use_autocast))
        corr = (pz * std + mean) * d_res.scale[va_idx]
        for w in fc.residual_weights:
            by_weight[w] = float(np.mean(np.abs(y_res[va_idx] - (base_val + w * corr))))
        weight = min(by_weight, key=lambda w: (by_weight[w], w))

    # ---- save: the LLM, boosting (backtest and refitted on everything), the time table
    ta = time.time()
    everything = training_rows(table, max(table.end.values()), fc.horizon, min_history, tc.seed)
    d_all = design(table, everything, lags, scale)
    gbm_full = fit_gbm(d_all.X, targets(table, everything) / d_all.scale, fc, tc.seed)
    gbm_seconds += time.time() - ta
    recs = [Record(text=t, value=float(v)) for t, v in zip(texts, r)]
    if acc.is_main_process:
        with atomic_dir(run_dir / MODEL) as tmp:
            inner.save_pretrained(tmp)
        save_forecaster(run_dir, Forecaster(horizon=fc.horizon, lags=lags, scale=scale, gbm_backtest=gbm,
                                            gbm_full=gbm_full, weight=weight, origins=origins,
                                            min_history=min_history, template=template,
                                            validation={str(w): m for w, m in by_weight.items()}), table)
        write_data_info(run_dir, {
            "train": recipe.data.train, "series": len(table.series), "frequency": table.freq,
            "steps": {s: len(table.values[s]) for s in table.series}, "first_origin": str(table.time_of(first)),
            "boosting_rows": len(pool), "residual_rows": len(res), "val_rows": len(va_idx),
            "fingerprint": fingerprint(recs), "time_ordered": True})
        write_history(run_dir, fitted.history, fitted.validations)
        plot_losses(fitted.history, fitted.validations, run_dir / LOSS_PLOT)
    metrics = {
        "task": "regress", "forecast": True, "method": mc.name, "base_model": recipe.model,
        "model_path": model_path, "dtype": str(dtype if mc.name != "full" else torch.float32).replace("torch.", ""),
        "examples": len(tr_idx), "series": len(table.series), "frequency": table.freq, "horizon": fc.horizon,
        "residual_weight": weight, "val_mae_boosting": by_weight.get(0.0), "val_mae_tuned": by_weight.get(weight),
        "boosting_seconds": round(gbm_seconds, 2), **fitted.metrics,
        "trainable_params": sum(p.numel() for p in inner.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in inner.parameters()),
        "wall_seconds": round(time.time() - t0, 2),
    }
    if acc.is_main_process:
        tr = [recs[i] for i in tr_idx]
        va = [recs[i] for i in va_idx]
        finish_run(run_dir, recipe_for_run(recipe), metrics, model_path=model_path,
                   target=TargetScale(field="residual", mean=mean, std=std),
                   fingerprints=Fingerprints(train=fingerprint(tr), validation=fingerprint(va), test=None))
    acc.wait_for_everyone()
    return metrics
