"""Demand forecasting: time tables as planners keep them, the rolling-origin backtest, the systems beside each
other, and `tuneloop forecast`. Tiny synthetic series and tiny models built from a config (seconds)."""

from __future__ import annotations

import csv
import json
from datetime import date, datetime, timedelta

import numpy as np
import pytest

from tuneloop.config import recipe_from_dict
from tuneloop.data.timeseries import default_lags, design, read_time_table, target_rows, usable_lags
from tuneloop.errors import ConfigError, DataError

from data_helpers import run_cli


def write_csv(path, header, rows):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def daily_rows(days: int = 140, stores=("a", "b"), seed: int = 0, start=date(2021, 1, 4)):
    """Two stores: weekly pattern, a promotion that lifts demand by 40 (known in advance), noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for s_i, s in enumerate(stores):
        for i in range(days):
            d = start + timedelta(days=i)
            promo = int(rng.random() < 0.25)
            y = 100 + 20 * s_i + 30 * (d.weekday() >= 5) + 40 * promo + rng.normal(0, 3)
            rows.append([d.isoformat(), s, promo, round(float(y), 2)])
    return rows


# ---- reading time tables


def test_reads_dates_and_infers_daily_seasons(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["date", "store", "promo", "sales"], daily_rows(30))
    t = read_time_table(str(p), "sales", time_field="date", series_field="store", features=["promo"])
    assert t.freq == "D" and t.series == ["a", "b"] and t.seasons() == [7, 364]
    assert len(t.values["a"]) == 30 and t.time_of(t.end["a"]) == datetime(2021, 2, 2)
    assert default_lags("D", 7) == [1, 2, 3, 4, 5, 6, 7, 14, 364, 728] or 364 in default_lags("D", 7)


def test_reads_time_parts_hourly(tmp_path):
    rows = []
    t0 = datetime(2022, 3, 1)
    for i in range(72):
        t = t0 + timedelta(hours=i)
        rows.append([t.year, t.month, t.day, t.hour, 10 + t.hour])
    p = write_csv(tmp_path / "h.csv", ["yr", "mo", "dy", "hr", "load"], rows)
    t = read_time_table(str(p), "load", time_parts={"year": "yr", "month": "mo", "day": "dy", "hour": "hr"})
    assert t.freq == "h" and t.seasons() == [24, 168]
    assert t.time_of(25) == datetime(2022, 3, 2, 1)
    assert t.values["load"][25] == 11


def test_reads_monthly_calendar_steps(tmp_path):
    rows = [[f"{2019 + i // 12}-{i % 12 + 1:02d}-01", 5 + i] for i in range(30)]
    t = read_time_table(str(write_csv(tmp_path / "m.csv", ["month", "v"], rows)), "v", time_field="month")
    assert t.freq == "MS" and t.seasons() == [12] and len(t.values["v"]) == 30
    assert t.time_of(13) == datetime(2020, 2, 1)


def test_gap_names_file_line(tmp_path):
    rows = daily_rows(20, stores=("a",))
    del rows[9]  # a day missing: line 11 of the file follows the gap
    p = write_csv(tmp_path / "g.csv", ["date", "store", "promo", "sales"], rows)
    with pytest.raises(DataError, match=r"g\.csv:11: date: gap in series 'a': 1 missing step"):
        read_time_table(str(p), "sales", time_field="date", series_field="store")


def test_duplicate_time_per_series_names_both_lines(tmp_path):
    rows = daily_rows(10, stores=("a", "b"))
    rows.insert(3, list(rows[2]))  # the same store and day twice (lines 4 and 5)
    p = write_csv(tmp_path / "dup.csv", ["date", "store", "promo", "sales"], rows)
    with pytest.raises(DataError, match=r"dup\.csv:5: date: duplicate time .* series 'a' \(first at line 4\)"):
        read_time_table(str(p), "sales", time_field="date", series_field="store")
    # the same day in two different series is fine
    read_time_table(str(write_csv(tmp_path / "ok.csv", ["date", "store", "promo", "sales"], daily_rows(10))),
                    "sales", time_field="date", series_field="store")


def test_non_numeric_target_and_bad_time_name_file_line(tmp_path):
    rows = daily_rows(10, stores=("a",))
    rows[4][3] = "lots"
    rows[6][0] = "not-a-day"
    p = write_csv(tmp_path / "bad.csv", ["date", "store", "promo", "sales"], rows)
    with pytest.raises(DataError) as e:
        read_time_table(str(p), "sales", time_field="date")
    assert "bad.csv:6: sales: not a number: 'lots'" in str(e.value)
    assert "bad.csv:8: date: not a date or time: 'not-a-day'" in str(e.value)


def test_aggregates_an_order_log_with_empty_buckets_as_zero(tmp_path):
    rows = [["2021-01-01 10:00", "x"], ["2021-01-01 12:00", "x"], ["2021-01-03 09:00", "x"], ["2021-01-03 09:30", "y"]]
    p = write_csv(tmp_path / "orders.csv", ["when", "item"], rows)
    t = read_time_table(str(p), "qty", time_field="when", series_field="item", aggregate="count", frequency="D")
    assert t.values["x"].tolist() == [2.0, 0.0, 1.0] and t.values["y"].tolist() == [1.0]


def test_config_errors():
    with pytest.raises(ConfigError, match="exactly one"):
        read_time_table("x.csv", "v")
    with pytest.raises(ConfigError, match="needs forecast.frequency"):
        read_time_table("x.csv", "v", time_field="t", aggregate="sum")


# ---- features and baselines


def test_design_never_reads_past_the_origin(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["date", "store", "promo", "sales"], daily_rows(60, stores=("a",)))
    t = read_time_table(str(p), "sales", time_field="date", features=["promo"])
    lags = default_lags(t.freq, 7)
    rows = target_rows(t, 40, 50, list(range(1, 8)), 7)
    d = design(t, rows, lags, {"sales": 1.0})
    # poison everything after each origin: a feature row must not change
    for r, (s, k, h) in enumerate(rows):
        o = k - h
        poisoned = read_time_table(str(p), "sales", time_field="date", features=["promo"])
        poisoned.values["sales"][o + 1:] = 1e9
        d2 = design(poisoned, [(s, k, h)], lags, {"sales": 1.0})
        assert np.array_equal(np.nan_to_num(d.X[r], nan=-1), np.nan_to_num(d2.X[0], nan=-1)), (k, h)
        if r > 12:
            break
    j = d.names.index("lag1")
    assert np.isnan(d.X[[i for i, (_, _, h) in enumerate(rows) if h > 1], j]).all()


def test_seasonal_naive_exact_on_a_periodic_series(tmp_path):
    from tuneloop.eval.forecast import seasonal_naive

    rows = [[(date(2021, 1, 4) + timedelta(days=i)).isoformat(), (i % 7) * 10 + 5] for i in range(70)]
    t = read_time_table(str(write_csv(tmp_path / "p.csv", ["date", "v"], rows)), "v", time_field="date")
    for k in range(20, 70):
        for h in range(1, 15):
            assert seasonal_naive(t, "v", k, h, 7) == t.values["v"][k]
    assert seasonal_naive(t, "v", 3, 1, 7) is None


@pytest.mark.slow
def test_backtest_origins_and_gbm_beats_naive_with_a_feature_effect(tmp_path):
    from tuneloop.train.forecast import backtest_origins, fit_gbm, training_rows

    p = write_csv(tmp_path / "d.csv", ["date", "store", "promo", "sales"], daily_rows(200))
    t = read_time_table(str(p), "sales", time_field="date", series_field="store", features=["promo"])
    origins = backtest_origins(t, 7, 6, 7)
    assert origins[-1] + 7 == max(t.end.values()) and np.all(np.diff(origins) == 7)
    fc = recipe_from_dict(_recipe(p, "unused")).forecast
    rows = training_rows(t, origins[0], 7, 7, 0)
    assert max(k for _, k, _ in rows) <= origins[0]  # nothing after the first origin is trained on
    scale = {s: float(np.mean(t.values[s][:origins[0]])) for s in t.series}
    lags = usable_lags(t, default_lags("D", 7), origins[0])
    assert 364 not in lags and 14 in lags
    d = design(t, rows, lags, scale)
    gbm = fit_gbm(d.X, np.array([t.values[s][k] for s, k, _ in rows]) / d.scale, fc, 0)
    test = [(s, o + h, h) for o in origins for s in t.series for h in range(1, 8)]
    dt = design(t, test, lags, scale)
    y = np.array([t.values[s][k] for s, k, _ in test])
    g = np.abs(gbm.predict(dt.X) * dt.scale - y).mean()
    naive = np.abs(np.array([t.values[s][k - 7] for s, k, _ in test]) - y).mean()
    assert g < 0.5 * naive, (g, naive)


def test_boosting_fits_when_a_lag_has_no_value_yet(tmp_path):
    # An early fold of a short table: the year-ago lag is empty in every row (scikit-learn 1.9 fails on an
    # all-NaN column); the column is then ignored, and the forecast still follows the feature that varies.
    from tuneloop.train.forecast import fit_gbm

    p = write_csv(tmp_path / "d.csv", ["date", "store", "promo", "sales"], daily_rows(60))
    fc = recipe_from_dict(_recipe(p, "unused")).forecast
    rng = np.random.default_rng(0)
    x = rng.normal(size=80)
    X = np.c_[np.zeros(80), np.full(80, np.nan), x]
    model = fit_gbm(X, 3 * x, fc, 0)
    filled = np.c_[np.zeros(80), rng.normal(size=80), x]  # the lag has values by forecast time
    assert np.abs(model.predict(filled) - 3 * x).mean() < 0.3 * np.abs(3 * x).mean()
    assert np.allclose(model.predict(filled), model.predict(X))


# ---- the whole loop on a tiny model


def _recipe(path, model, **forecast):
    return {
        "name": "tiny-forecast", "task": "regress", "model": str(model),
        "data": {"train": str(path), "value_field": "sales", "time_field": "date", "val_ratio": 0.2},
        "method": {"name": "lora", "r": 4},
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "max_length": 48, "seed": 0, "threads": 1},
        "eval": {"batch_size": 16},
        "forecast": {"horizon": 7, "origins": 3, "series_field": "store", "features": ["promo"],
                     "holidays": "US", "residual_rows": 60, "residual_folds": 2, "gbm_iterations": 50, **forecast},
    }


@pytest.mark.slow
def test_train_backtest_and_forecast_cli(tmp_path, tiny_llama_dir):
    from tuneloop.eval.tasks import evaluate_run
    from tuneloop.runs import start_run
    from tuneloop.train.forecast import train_forecaster

    p = write_csv(tmp_path / "d.csv", ["date", "store", "promo", "sales"], daily_rows(120))
    recipe = recipe_from_dict(_recipe(p, tiny_llama_dir))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    start_run(run_dir, recipe)  # what `tuneloop train` does around it, without the MLflow logging
    metrics = train_forecaster(recipe, run_dir, show_progress=False)
    assert metrics["forecast"] and metrics["residual_weight"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    report = evaluate_run(run_dir)
    assert report["kind"] == "backtest" and len(report["origins"]) == 3
    assert {"seasonal_naive_7", "gbm", "tuned"} <= set(report["systems"])
    assert "seasonal_naive_364" in report["skipped"]
    for m in report["systems"].values():
        assert m["mae_ci"][0] <= m["mae"] <= m["mae_ci"][1]
        assert m["accuracy"] == pytest.approx(1 - m["wape"])
    assert report["systems"]["gbm"]["mae"] < report["systems"]["seasonal_naive_7"]["mae"]
    assert set(report["tests"]) >= {"tuned_vs_gbm", "tuned_vs_seasonal_naive_7"}
    assert (run_dir / "backtest.html").read_text().count("<img") >= 3  # error by horizon + one per series

    code, out = run_cli("forecast", run_dir, "--horizon", "3")
    assert code == 1 and "--features" in out and "promo" in out
    future = [[(date(2021, 5, 4) + timedelta(days=i)).isoformat(), s, i % 2] for s in ("a", "b") for i in range(2)]
    f = write_csv(tmp_path / "future.csv", ["date", "store", "promo"], future)
    code, out = run_cli("forecast", run_dir, "--horizon", "3", "--features", f)
    assert code == 1 and "future.csv: series 'a': no row for 2021-05-06" in out  # the third day is missing
    future += [["2021-05-06", s, 1] for s in ("a", "b")]
    f = write_csv(tmp_path / "future.csv", ["date", "store", "promo"], future)
    dest = tmp_path / "fc.jsonl"
    code, out = run_cli("forecast", run_dir, "--horizon", "3", "--features", f, "--out", dest)
    assert code == 0, out
    got = [json.loads(l) for l in dest.read_text().splitlines()]
    assert [(g["series"], g["time"][:10], g["horizon"]) for g in got] == [
        (s, (date(2021, 5, 4) + timedelta(days=i)).isoformat(), i + 1) for s in ("a", "b") for i in range(3)]
    # promotions were worth +40: the forecast with one must be well above the one without
    by = {(g["series"], g["horizon"]): g["forecast"] for g in got}
    assert by[("a", 2)] - by[("a", 1)] > 15, by
    code, out = run_cli("forecast", run_dir, "--horizon", "9", "--features", f)
    assert code == 2 and "up to 7" in out


def test_forecast_section_is_regress_only_and_recipes_validate(tmp_path):
    doc = _recipe(tmp_path / "x.csv", "m")
    with pytest.raises(ConfigError, match="forecast.horizon: not used by task classify"):
        recipe_from_dict({**doc, "task": "classify", "data": {"train": "x.csv"}})
    with pytest.raises(ConfigError, match="forecast.horizon"):
        recipe_from_dict({**doc, "forecast": {"horizon": 0}})


def test_a_table_without_a_time_column_is_dated_by_start(tmp_path):
    p = write_csv(tmp_path / "n.csv", ["demand", "temp"], [[100 + i, 20] for i in range(10)])
    t = read_time_table(str(p), "demand", start="2014-01-01", frequency="D", features=["temp"])
    assert t.freq == "D" and t.time_of(9) == datetime(2014, 1, 10) and t.values["demand"][9] == 109
    with pytest.raises(ConfigError, match="needs forecast.frequency"):
        read_time_table(str(p), "demand", start="2014-01-01")
