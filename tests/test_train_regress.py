"""Regression recipe: standardised target, MAE in real units, seasonal-naive baseline, time-ordered hold-out."""

from __future__ import annotations

import csv
import json
import math
import random
from datetime import date, timedelta

import pytest

from tuneloop.config import recipe_from_dict
from tuneloop.data.tabular import load_table
from tuneloop.errors import DataError
from tuneloop.eval.regression import evaluate_regress, regression_metrics, seasonal_naive


def write_daily(path, days: int = 84):
    rng = random.Random(0)
    start = date(2020, 1, 6)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["date", "temp", "game", "riders"])
        for i in range(days):
            d = start + timedelta(days=i)
            weekday = d.weekday() < 5
            game = int(rng.random() < 0.2)
            riders = 1000 + 800 * weekday + 150 * game + rng.gauss(0, 30)
            w.writerow([d.isoformat(), round(rng.uniform(20, 80)), game, round(riders, 1)])
    return path


def test_table_reader_lags_and_template(tmp_path):
    path = write_daily(tmp_path / "d.csv", 20)
    recs = load_table(str(path), "riders", "{{ weekday }}: game {{ game }}, last week {{ riders_lag7 }}", "text", "date", [7])
    assert len(recs) == 13  # the first 7 days have no lag
    rows = list(csv.DictReader(path.open()))
    assert recs[0].meta["lag7"] == float(rows[0]["riders"]) and recs[0].value == float(rows[7]["riders"])
    assert recs[0].text.startswith("Monday: game")
    with pytest.raises(DataError, match=r"d\.csv:2: template: no column 'nope'"):
        load_table(str(path), "riders", "{{ nope }}", "text", "date")
    with pytest.raises(DataError, match="lags needs data.time_field"):
        load_table(str(path), "riders", "{{ temp }}", "text", None, [7])


def test_seasonal_naive_and_metrics():
    hist = {"2020-01-01": 10.0, "2020-01-02": 20.0}
    assert seasonal_naive(hist, ["2020-01-08", "2020-01-09", "2020-01-10"]) == [10.0, 20.0, None]
    m = regression_metrics([10, 20], [12, 17])
    assert m["mae"] == 2.5 and m["rmse"] == pytest.approx(math.sqrt((4 + 9) / 2))


@pytest.mark.slow
def test_regress_trains_and_reports_real_units(tmp_path, tiny_llama_dir):
    from tuneloop.train.regress import train_regressor

    data = write_daily(tmp_path / "d.csv")
    recipe = recipe_from_dict({
        "name": "tiny-regress", "task": "regress", "model": str(tiny_llama_dir),
        "data": {"train": str(data), "value_field": "riders", "time_field": "date", "lags": [7],
                 "test_ratio": 0.2, "val_ratio": 0.15, "template": "{{ weekday }}, game {{ game }}, temp {{ temp }}"},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 20, "batch_size": 8, "lr": 1e-2, "head_lr": 1e-2, "precision": "fp32",
                  "threads": 1, "max_length": 32, "eval_every": 10, "checkpoint_every": 10},
    })
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    m = train_regressor(recipe, run_dir, show_progress=False)
    scale = json.loads((run_dir / "target.json").read_text())
    assert 1000 < scale["mean"] < 2000 and scale["std"] > 100
    assert m["task"] == "regress" and m["val_mae"] is not None
    assert not (run_dir / "checkpoints").exists()
    test = [json.loads(l) for l in (run_dir / "test.jsonl").read_text().splitlines()]
    # time-ordered hold-out: the test days are the latest ones
    assert len(test) == 15  # 84 days, 7 without a lag, 20% of the rest
    assert min(t["time"] for t in test) == (date(2020, 1, 6) + timedelta(days=84 - 15)).isoformat()
    report = evaluate_regress(run_dir, show_progress=False)
    assert set(report["systems"]) >= {"tuned", "seasonal_naive"}
    assert report["systems"]["seasonal_naive"]["n"] == len(test)
    preds = [p["value"] for p in report["predictions"]["tuned"].values()]  # the one report schema
    assert all(500 < p < 2500 for p in preds), "predictions come back in real units"


@pytest.mark.parametrize("method", ["dora", "prompt_tuning", "full"])
def test_classify_takes_the_new_methods(tmp_path, tiny_llama_dir, method):
    """classify routes non-LoRA methods through the shared builder instead of silently using LoRA."""
    from tuneloop.config import MethodConfig
    from tuneloop.train.classify import build_classifier

    import torch

    m = build_classifier(str(tiny_llama_dir), ["a", "b"], MethodConfig(name=method, num_virtual_tokens=4),
                         torch.float32, 0)
    kind = type(m).__name__
    assert (kind.startswith("Peft")) == (method != "full")
    if method == "dora":
        assert m.peft_config["default"].use_dora


def test_classify_top_layers_with_all_linear(tiny_llama_dir):
    import torch

    from tuneloop.config import MethodConfig
    from tuneloop.train.classify import build_classifier

    m = build_classifier(str(tiny_llama_dir), ["a", "b"], MethodConfig(top_layers=1), torch.float32, 0)
    lora = [n for n, p in m.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora and all(".layers.1." in n for n in lora)
