"""Intervals and paired tests (eval/stats.py), the numbers checked by hand or against invariants."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from tuneloop.eval import schema
from tuneloop.eval.schema import Report, headline, keyed, make_examples
from tuneloop.eval.stats import METRICS, REPORT_METRICS, metric_interval, paired_test, report_statistics

ACC = METRICS["classify"]["accuracy"]
F1 = METRICS["classify"]["macro_f1"]
MAE = METRICS["regress"]["mae"]


def test_an_interval_covers_its_point_and_narrows_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 400, 3200):
        correct = (rng.random(n) < 0.8).astype(float)
        lo, hi = metric_interval(correct, ACC, samples=1000)
        assert lo <= correct.mean() <= hi and lo < hi
        widths.append(hi - lo)
    # the width of a proportion's interval falls as 1/sqrt(n): 8x the examples, about 1/2.8 the width
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(8.0, rel=0.25)
    # and it is about the normal one: 2 * 1.96 * sqrt(p (1 - p) / n)
    assert widths[2] == pytest.approx(2 * 1.96 * np.sqrt(0.8 * 0.2 / 3200), rel=0.15)


def test_an_interval_of_identical_examples_is_the_point():
    assert metric_interval(np.ones(30), ACC) == (1.0, 1.0)
    assert metric_interval([0.3], MAE) == (0.3, 0.3)


def test_macro_f1_interval_from_its_columns():
    labels = ["a", "b"]
    refs = ["a"] * 60 + ["b"] * 40
    preds = [{"label": "a" if i % 5 else "b"} for i in range(100)]
    cols = np.array([F1.columns(p, r, labels) for p, r in zip(preds, refs)])
    from sklearn.metrics import f1_score

    want = f1_score(refs, [p["label"] for p in preds], labels=labels, average="macro")
    assert float(F1.combine(cols.mean(0))) == pytest.approx(want)
    lo, hi = metric_interval(cols, F1, samples=800)
    assert lo <= want <= hi and hi - lo < 0.3


def test_mcnemar_p_value_is_the_hand_computed_binomial():
    # 3 examples only a gets right, 9 only b: two-sided exact p = 2 * P(X <= 3), X ~ Binomial(12, 1/2)
    a = np.array([1] * 3 + [0] * 9 + [1] * 20 + [0] * 8, dtype=float)
    b = np.array([0] * 3 + [1] * 9 + [1] * 20 + [0] * 8, dtype=float)
    t = paired_test(ACC, a, b, samples=500)
    assert t["test"] == "mcnemar_exact" and t["discordant"] == [3, 9]
    assert t["p_value"] == pytest.approx(2 * binom.cdf(3, 12, 0.5))
    assert t["delta"] == pytest.approx((23 - 29) / 40)
    assert t["interval"][0] <= t["delta"] <= t["interval"][1]


def test_paired_bootstrap_finds_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(2)
    err = np.abs(rng.normal(0, 10, 300))
    better = paired_test(MAE, err * 0.8, err, samples=2000)
    assert better["test"] == "paired_bootstrap" and better["p_value"] < 0.01
    assert better["delta"] < 0 and better["interval"][1] < 0
    # the same errors shuffled between the two systems: no difference to find
    noise = np.abs(rng.normal(0, 10, 300))
    null = paired_test(MAE, err, np.where(rng.random(300) < 0.5, err, noise), samples=2000)
    assert null["p_value"] > 0.05
    same = paired_test(MAE, err, err)
    assert same["p_value"] == 1.0 and same["delta"] == 0 and same["interval"] == [0.0, 0.0]


def test_pairing_matters_the_paired_interval_is_narrower_than_the_unpaired_one():
    # b = a + a small constant: paired, the difference is known almost exactly; each alone is wide
    rng = np.random.default_rng(3)
    a = rng.uniform(0, 1, 200)
    t = paired_test(METRICS["sft"]["rougeL"], a + 0.01 + rng.normal(0, 0.001, 200), a, samples=1000)
    lo_a, hi_a = metric_interval(a, METRICS["sft"]["rougeL"], samples=1000)
    assert t["interval"][1] - t["interval"][0] < (hi_a - lo_a) / 10
    assert t["p_value"] < 0.01


def _classify_report(n: int) -> dict:
    refs = ["good" if i % 2 else "bad" for i in range(n)]
    examples = make_examples([f"r{i}" for i in range(n)], refs)
    tuned = [{"label": r, "probability": 0.9, "correct": True} if i % 10 else
             {"label": "bad" if r == "good" else "good", "probability": 0.6, "correct": False}
             for i, r in enumerate(refs)]
    # base saw only every other example (a sample), right on 60% of them
    base = [None if i % 2 else ({"label": r, "probability": 0.5, "correct": True} if i % 5 < 3 else
                                {"label": "bad" if r == "good" else "good", "probability": 0.5, "correct": False})
            for i, r in enumerate(refs)]
    systems = {"tuned": {"accuracy": 0.9}, "base": {"accuracy": 0.6}}
    return Report(task="classify", title="t", run="r", model="m", systems=systems, labels=["bad", "good"],
                  headline=headline(systems, "accuracy", "higher"), test=schema.TestSet(path=None, n=n, fingerprint=None),
                  examples=examples,
                  predictions={"tuned": keyed(examples, tuned), "base": keyed(examples, base)}).model_dump(mode="json")


def test_report_statistics_per_system_and_per_pair_on_shared_examples():
    rep = _classify_report(200)
    out = report_statistics(rep, samples=500)
    iv = out["intervals"]
    assert set(iv) == {"tuned", "base"} and set(iv["tuned"]) == {"accuracy", "macro_f1"}
    assert iv["tuned"]["accuracy"][0] <= 0.9 <= iv["tuned"]["accuracy"][1]
    # base's interval is on its 100 sampled examples: wider than tuned's on 200
    assert np.diff(iv["base"]["accuracy"])[0] > np.diff(iv["tuned"]["accuracy"])[0]
    acc = next(t for t in out["tests"] if t["metric"] == "accuracy")
    assert (acc["a"], acc["b"], acc["n"], acc["better"]) == ("tuned", "base", 100, "tuned")
    # on the 100 shared: tuned wrong on i % 10 == 0 (20, base right on them), base wrong on i % 10 in (4, 8)
    assert acc["discordant"] == [40, 20] and acc["p_value"] == pytest.approx(2 * binom.cdf(20, 60, 0.5))
    # the schema takes them, and a report without them still loads
    Report.model_validate({**rep, **out})
    assert Report.model_validate(rep).intervals == {}


def test_old_predictions_without_a_field_get_no_interval_not_an_error():
    sft = REPORT_METRICS["sft"]
    examples = make_examples(["q1", "q2", "q3"], ["a", "b", "c"])
    preds = [{"text": "x", "rougeL": v, "loss": 1.0} for v in (0.1, 0.5, 0.3)]  # no "tokens": no perplexity
    rep = {"task": "sft", "examples": [e.model_dump() for e in examples], "labels": None,
           "predictions": {"tuned": keyed(examples, preds)}}
    iv = report_statistics(rep, samples=200)["intervals"]["tuned"]
    assert "perplexity" in sft and "perplexity" not in iv and set(iv) == {"rougeL", "loss"}
