"""Forecasts from a forecast run: gradient boosting on the lags, calendar, holidays and known features, plus
the tuned model's correction (the residual boosting leaves, learned from the rendered row) times the weight
validation chose. One path for the backtest (eval/forecast.py) and for the future (`tuneloop forecast`).

    read_recipe_table(recipe)                  the recipe's time table (data/timeseries.py)
    load_forecaster(run)                       Forecaster + the time table it was trained on
    gbm_predict(model, design)                 boosting's forecasts in real units
    residual_predict(loaded, texts, design)    the tuned model's corrections in real units
    future_forecast(run, horizon, features)    the next H steps of every series
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.render import compile_template
from ..data.timeseries import Design, TimeTable, design, read_time_table
from ..errors import ConfigError, DataError, NotFoundError
from ..runs import FORECASTER, SERIES, Run, open_run

# What the tuned model reads when the recipe gives no data.template: the row's calendar, holiday, known
# features, recent values and boosting's own forecast, whose miss it learns.
DEFAULT_TEMPLATE = (
    "{{ series }}: {{ weekday }} {{ date }}{% if hour %} {{ hour }}h{% endif %}{% if holiday %}, "
    "{{ holiday }}{% endif %}. {{ horizon }} ahead. Last {{ '%.1f' | format(last) }}. Boosting says "
    "{{ '%.1f' | format(gbm) }}.")


@dataclass
class Forecaster:
    """Everything but the tuned weights (which are the run's model/): pickled into the run folder."""

    horizon: int
    lags: list[int]
    scale: dict[str, float]
    gbm_backtest: object  # fitted on targets up to the first backtest origin
    gbm_full: object  # the same, fitted on all the data: what `tuneloop forecast` uses
    weight: float  # tuned = boosting + weight x residual
    origins: list[int]
    min_history: int
    template: str
    validation: dict = field(default_factory=dict)


def read_recipe_table(recipe, spec: str | None = None) -> TimeTable:
    dc, fc = recipe.data, recipe.forecast
    return read_time_table(spec or dc.train, dc.value_field, time_field=dc.time_field, time_parts=fc.time_parts,
                           series_field=fc.series_field, features=fc.features, frequency=fc.frequency,
                           aggregate=fc.aggregate, holidays=fc.holidays, start=fc.start, fmt=dc.format)


def save_forecaster(run_dir: Path, fc: Forecaster, table: TimeTable) -> None:
    from ..fileio import write_bytes_atomic

    write_bytes_atomic(run_dir / FORECASTER, pickle.dumps(fc))
    write_bytes_atomic(run_dir / SERIES, pickle.dumps(table))


def load_forecaster(run: "Run | str | Path") -> tuple[Forecaster, TimeTable]:
    run = open_run(run)
    f = run.dir / FORECASTER
    if run.recipe.forecast is None or not f.exists():
        raise NotFoundError(f"{run.dir}: not a forecast run (no {FORECASTER}; its recipe needs a `forecast:` section)")
    return pickle.loads(f.read_bytes()), pickle.loads((run.dir / SERIES).read_bytes())


def gbm_predict(model, d: Design) -> np.ndarray:
    from threadpoolctl import threadpool_limits

    if not len(d.X):
        return np.zeros(0)
    with threadpool_limits(1):  # as in fitting (train/forecast.py: OpenMP threads spin on a shared CPU)
        return model.predict(d.X) * d.scale


def render_texts(template: str, d: Design, gbm: np.ndarray) -> list[str]:
    render = compile_template(template)
    return [render({**c, "gbm": float(g)}) for c, g in zip(d.context, gbm)]


def residual_predict(loaded, texts: list[str], d: Design, batch_size: int, timer=None) -> np.ndarray:
    """The tuned model's residual forecast in real units (it learns the residual over the series' scale)."""
    from .predict import predict_z

    if not texts:
        return np.zeros(0)
    enc = loaded.tokenizer(texts, truncation=True, max_length=loaded.input.max_length)["input_ids"]
    z = predict_z(loaded.model, enc, loaded.tokenizer.pad_token_id, batch_size, loaded.device, loaded.autocast, timer)
    return (np.asarray(z) * loaded.target.std + loaded.target.mean) * d.scale


def future_forecast(run: "Run | str | Path", horizon: int, features: str | None = None,
                    show_progress: bool = False) -> list[dict]:
    """The next `horizon` steps after each series' last value: boosting fitted on all the data plus the
    tuned correction. The known features of those steps come from `features` (a table with the recipe's
    time and series columns); a step without them is an error naming the series, the time and the column."""
    from ..runs import load_for_inference
    from .device import device, set_threads

    run = open_run(run)
    fc, table = load_forecaster(run)
    if horizon > fc.horizon:
        raise ConfigError(f"--horizon {horizon}: this run was trained for horizons up to {fc.horizon} "
                          f"(forecast.horizon); retrain with a longer one")
    recipe = run.recipe
    rows = [(s, table.end[s] + h, h) for s in table.series for h in range(1, horizon + 1)]
    future: dict = {}
    if table.feature_names:
        if features is None:
            raise DataError(f"--features: this run reads known features ({', '.join(table.feature_names)}); "
                            f"give a table of them for the {horizon} step(s) after the data ends "
                            f"(first: {table.time_of(min(table.end.values()) + 1)})")
        dc, rfc = recipe.data, recipe.forecast
        future = read_time_table(features, dc.value_field, time_field=dc.time_field, time_parts=rfc.time_parts,
                                 series_field=rfc.series_field, features=table.feature_names,
                                 frequency=table.freq, holidays=rfc.holidays, fmt="auto", require_target=False,
                                 # no time column: the file's rows are the steps right after the data ends
                                 start=str(table.time_of(min(table.end.values()) + 1)) if rfc.start else None,
                                 like=table)
        missing = [f"{features}: series {s!r}: no row for {table.time_of(k)} (step {h} of the forecast)"
                   for s, k, h in rows if (s, k) not in future]
        nan = [f"{features}: series {s!r}: {table.time_of(k)}: {f}: unknown value (a category never seen in "
               f"training?)" for s, k, _ in rows if (s, k) in future for f, v in future[(s, k)].items()
               if np.isnan(v)]
        if missing or nan:
            from ..data.timeseries import _problems

            raise _problems(missing + nan)
    d = design(table, rows, fc.lags, fc.scale, future=future)
    gbm = gbm_predict(fc.gbm_full, d)
    value = gbm.copy()
    if fc.weight:
        set_threads(recipe.train.threads)
        loaded = load_for_inference(run, device())
        value = gbm + fc.weight * residual_predict(loaded, render_texts(fc.template, d, gbm), d,
                                                   recipe.eval.batch_size)
    return [{"series": s, "time": table.time_of(k).isoformat(), "horizon": h, "forecast": float(v),
             "gbm": float(g)} for (s, k, h), v, g in zip(rows, value, gbm)]
