"""Calibration (contextual calibration, ECE, abstaining), cost and KPIs, and the few-shot example pick, on
constructed cases whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from tuneloop.errors import ConfigError
from tuneloop.eval.calibration import (calibration_summary, contextual_calibration, coverage_curve,
                                       expected_calibration_error)
from tuneloop.eval.cost import (BatchTimer, business_cost, cost_per_1000, error_cost_matrix, latency_summary,
                                price_per_hour)


def test_contextual_calibration_removes_a_forced_label_prior():
    # the text carries the signal (70/30 towards the right label), the prompt pushes 95% towards label 0
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, 400)
    signal = np.where(gold[:, None] == np.arange(2), 0.7, 0.3)
    prior = np.array([0.95, 0.05])
    biased = signal * prior
    biased /= biased.sum(-1, keepdims=True)
    assert (biased.argmax(-1) == 0).all()  # the model says label 0 whatever the text: accuracy = share of 0
    # content-free inputs carry no signal: what the model says on them is the prior alone
    content_free = np.tile(prior, (3, 1))
    fixed = contextual_calibration(biased, content_free.mean(0))
    assert np.allclose(fixed, signal) and (fixed.argmax(-1) == gold).all()
    # a flat prior changes nothing
    assert np.allclose(contextual_calibration(biased, [0.5, 0.5]), biased)


def test_ece_of_perfectly_calibrated_probabilities_is_near_zero_and_of_overconfident_ones_is_not():
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.5, 1.0, 20000)
    correct = rng.random(20000) < conf  # right exactly as often as it says
    ece, bins = expected_calibration_error(conf, correct)
    assert ece < 0.015
    assert sum(b["n"] for b in bins) == 20000 and all(abs(b["accuracy"] - b["confidence"]) < 0.03 for b in bins)
    # says 0.95, right 70% of the time: ECE 0.25
    over, _ = expected_calibration_error(np.full(1000, 0.95), np.arange(1000) % 10 < 7)
    assert over == pytest.approx(0.25)
    # a confidence of exactly 1.0 lands in the top bin, 0.1 in the first
    _, edge = expected_calibration_error([1.0, 0.1], [True, False])
    assert [(b["low"], b["n"]) for b in edge] == [(0.0, 1), (pytest.approx(0.9), 1)]


def test_abstaining_trades_coverage_for_accuracy():
    conf = np.array([0.95, 0.9, 0.85, 0.6, 0.55, 0.52])
    correct = np.array([True, True, True, False, True, False])
    curve = coverage_curve(conf, correct)
    cov = [p["coverage"] for p in curve]
    assert cov[0] == 1.0 and cov == sorted(cov, reverse=True) and curve[-1]["accuracy"] is None
    s = calibration_summary(conf, correct, abstain_below=0.8)
    assert s["abstain"] == {"below": 0.8, "coverage": 0.5, "abstained": 3, "accuracy": 1.0}
    assert "abstain" not in calibration_summary(conf, correct)


def test_error_costs_by_kind_and_by_label():
    labels = ["complaint", "praise", "question"]
    m = error_cost_matrix({"complaint->praise": 50, "praise->complaint": 2, "question": 5}, labels)
    assert m[0, 1] == 50 and m[1, 0] == 2 and m[2, 0] == m[2, 1] == 5 and m[0, 2] == 0
    assert np.trace(m) == 0
    # rows true, columns predicted: 3 complaints called praise, 1 praise called a complaint
    confusion = [[7, 3, 0], [1, 9, 0], [0, 0, 10]]
    assert business_cost(confusion, m) == {"total": 152.0, "per_1000": pytest.approx(152 / 30 * 1000)}
    with pytest.raises(ConfigError, match=r"'complaint->spam': 'spam' is not a label \(labels: complaint, "):
        error_cost_matrix({"complaint->spam": 1}, labels)
    with pytest.raises(ConfigError, match="a correct answer costs nothing"):
        error_cost_matrix({"praise->praise": 1}, labels)


def test_latency_percentiles_and_cost_by_hand():
    # 3 batches of 4 records: each record waits for its batch
    out = latency_summary([(4, 0.1), (4, 0.2), (4, 1.0)])
    assert out["records"] == 12 and out["records_per_second"] == pytest.approx(12 / 1.3, rel=1e-3)
    assert out["p50_ms"] == pytest.approx(200.0) and out["p95_ms"] == pytest.approx(1000.0)
    # 10 records/s: 1,000 take 100 s, at 3.60 an hour that is 0.10
    assert cost_per_1000(10.0, 3.6) == pytest.approx(0.1)
    assert price_per_hour(None, "cpu") == (0.10, "default for one CPU hour")
    assert price_per_hour(None, "cuda")[0] == 1.00 and price_per_hour(2.5, "cpu") == (2.5, "eval.price_per_hour")
    t = BatchTimer()
    with t.batch(3):
        sum(range(1000))
    assert t.batches[0][0] == 3 and t.batches[0][1] >= 0


@pytest.mark.slow
def test_few_shot_examples_are_balanced_seeded_and_fit_the_budget(smol_dir):
    from transformers import AutoTokenizer

    from tuneloop.eval.predict import fewshot_examples

    tok = AutoTokenizer.from_pretrained(smol_dir)
    texts = [f"the {'good' if i % 3 else 'bad'} item number {i} " * (1 + i % 4) for i in range(60)]
    labels_of = ["good" if i % 3 else "bad" for i in range(60)]
    shots = fewshot_examples(tok, texts, labels_of, ["bad", "good"], budget=120, max_length=64, seed=0)
    got = [l for _, l in shots]
    assert got.count("bad") == got.count("good") >= 1
    used = sum(min(64, len(tok(t, add_special_tokens=False)["input_ids"])) for t, _ in shots)
    assert used <= 120
    assert shots == fewshot_examples(tok, texts, labels_of, ["bad", "good"], 120, 64, seed=0)
    assert shots != fewshot_examples(tok, texts, labels_of, ["bad", "good"], 120, 64, seed=1)
    # a given k is kept exactly, still in label turns; the automatic one stops at 4 rounds
    k5 = [l for _, l in fewshot_examples(tok, texts, labels_of, ["bad", "good"], 10, 64, seed=0, k=5)]
    assert len(k5) == 5 and sorted(k5) == ["bad", "bad", "bad", "good", "good"]  # labels in order: bad first
    assert len(fewshot_examples(tok, texts, labels_of, ["bad", "good"], 10**6, 64, seed=0)) == 8
