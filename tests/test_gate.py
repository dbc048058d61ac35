"""The gate: paired non-inferiority on per-example predictions. Table-driven over the tasks on synthetic
reports (fast, no model): a worse candidate is a regression (1), an equal or better one passes (0), another
test set or leakage cannot be compared (2), a collapsing class fails while overall accuracy holds; the
intervals and McNemar's test agree with a hand computation. Then end to end on tiny trained runs."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
from sklearn.metrics import f1_score

from tuneloop.errors import ConfigError
from tuneloop.eval import schema
from tuneloop.eval.schema import Report, headline, keyed, make_examples
from tuneloop.gate import (CANNOT_COMPARE, METRICS, PASS, REGRESSION, compare_reports, mcnemar,
                           paired_interval)

N = 200


def report(task: str, inputs: list[str], refs: list, preds: list[dict], fingerprint: str = "fp-test",
           labels: list[str] | None = None, meta: list[dict] | None = None) -> dict:
    """A report.json dict of one `tuned` system, checked against the one schema."""
    metric, direction = {"classify": ("accuracy", "higher"), "regress": ("mae", "lower"),
                         "sft": ("rougeL", "higher")}[task]
    examples = make_examples(inputs, refs, meta)
    score = {"classify": lambda: float(np.mean([p["correct"] for p in preds])),
             "regress": lambda: float(np.mean([p["abs_error"] for p in preds])),
             "sft": lambda: float(np.mean([p["rougeL"] for p in preds]))}[task]()
    systems = {"tuned": {metric: score}}
    return Report(task=task, title="t", run="r", model="m", systems=systems,
                  headline=headline(systems, metric, direction),
                  test=schema.TestSet(path="test.jsonl", n=len(inputs), fingerprint=fingerprint), examples=examples,
                  predictions={"tuned": keyed(examples, preds)}, labels=labels).model_dump(mode="json")


# ---- one row per task: a production report, and candidates worse / better than it by construction


def _classify(quality: Callable[[int], bool]) -> dict:
    refs = ["good" if i % 2 else "bad" for i in range(N)]
    preds = []
    for i, ref in enumerate(refs):
        right = quality(i)
        label = ref if right else ("bad" if ref == "good" else "good")
        preds.append({"label": label, "probability": 0.9, "correct": right})
    return report("classify", [f"review {i}" for i in range(N)], refs, preds, labels=["bad", "good"])


def _regress(err: Callable[[int], float]) -> dict:
    refs = [100.0 + i for i in range(N)]
    preds = [{"value": r + err(i), "abs_error": abs(err(i))} for i, r in enumerate(refs)]
    return report("regress", [f"day {i}" for i in range(N)], refs, preds)


def _sft(rouge: Callable[[int], float]) -> dict:
    refs = [f"answer {i}" for i in range(N)]
    preds = [{"text": "x", "rougeL": min(1.0, max(0.0, rouge(i))), "loss": 1.0} for i in range(N)]
    return report("sft", [json.dumps([{"role": "user", "content": f"q {i}"}]) for i in range(N)], refs, preds)


BASE_ERR = [abs(random.Random(i).gauss(0, 10)) for i in range(N)]
BASE_ROUGE = [random.Random(i).uniform(0.2, 0.6) for i in range(N)]


@dataclass
class Row:
    task: str
    production: dict
    worse: dict
    better: dict


ROWS = [
    # production right on 85%; worse: right on 65%; better: right on 95% (and wherever production is)
    Row("classify", _classify(lambda i: i % 20 >= 3), _classify(lambda i: i % 20 >= 7),
        _classify(lambda i: i % 20 >= 1)),
    Row("regress", _regress(lambda i: BASE_ERR[i]), _regress(lambda i: BASE_ERR[i] * 1.6 + 2),
        _regress(lambda i: BASE_ERR[i] * 0.7)),
    Row("sft", _sft(lambda i: BASE_ROUGE[i]), _sft(lambda i: BASE_ROUGE[i] - 0.12),
        _sft(lambda i: BASE_ROUGE[i] + 0.1)),
]
ids = [r.task for r in ROWS]


@pytest.mark.parametrize("row", ROWS, ids=ids)
def test_a_worse_candidate_is_a_regression(row: Row):
    out = compare_reports(row.worse, row.production)
    assert out["code"] == REGRESSION and not out["passed"]
    o = out["overall"]
    assert o["delta"] < 0 and o["lower"] <= -o["margin"] and o["lower"] <= o["delta"] <= o["upper"]
    assert out["reasons"] and out["reasons"][0].startswith(f"{out['metric']}: candidate")


@pytest.mark.parametrize("row", ROWS, ids=ids)
def test_an_equal_candidate_passes(row: Row):
    out = compare_reports(row.production, row.production)
    assert out["code"] == PASS and out["passed"] and out["reasons"] == []
    assert out["overall"]["delta"] == out["overall"]["lower"] == out["overall"]["upper"] == 0
    assert out["n"] == N and all(g["passed"] for g in out["groups"])


@pytest.mark.parametrize("row", ROWS, ids=ids)
def test_a_better_candidate_passes(row: Row):
    out = compare_reports(row.better, row.production)
    o = out["overall"]
    assert out["code"] == PASS and o["delta"] > 0 and o["lower"] > 0
    # the direction is taken care of: a lower MAE is an improvement
    if row.task == "regress":
        assert o["candidate"] < o["production"]


@pytest.mark.parametrize("row", ROWS, ids=ids)
def test_another_test_set_cannot_be_compared(row: Row):
    other = json.loads(json.dumps(row.production))
    other["test"]["fingerprint"] = "fp-other"
    out = compare_reports(other, row.production)
    assert out["code"] == CANNOT_COMPARE and "different test sets" in out["reasons"][0]


@pytest.mark.parametrize("row", ROWS, ids=ids)
def test_leakage_cannot_be_compared(row: Row):
    keys = {row.production["examples"][7]["key"], "not-a-test-key"}
    out = compare_reports(row.better, row.production, training_keys=keys)
    assert out["code"] == CANNOT_COMPARE and out["leaked"] == [row.production["examples"][7]["id"]]
    assert out["reasons"][0].startswith(f"leakage: 1 of {N} test examples")
    assert compare_reports(row.better, row.production, training_keys={"not-a-test-key"})["code"] == PASS


@pytest.mark.parametrize("row", ROWS, ids=ids)
def test_other_reasons_it_cannot_compare(row: Row):
    other_task = json.loads(json.dumps(row.production))
    other_task["task"] = "classify" if row.task != "classify" else "sft"
    assert "different tasks" in compare_reports(other_task, row.production)["reasons"][0]
    untuned = json.loads(json.dumps(row.production))
    untuned["predictions"] = {"base": untuned["predictions"]["tuned"]}
    out = compare_reports(untuned, row.production)
    assert out["code"] == CANNOT_COMPARE and out["reasons"] == ["the candidate's report has no `tuned` predictions"]


def test_only_shared_examples_count():
    row = ROWS[0]
    fewer = json.loads(json.dumps(row.better))
    for e in fewer["examples"][:50]:
        fewer["predictions"]["tuned"].pop(e["id"])
    assert compare_reports(fewer, row.production)["n"] == N - 50


def test_a_collapsing_class_fails_while_overall_accuracy_holds():
    # production: 80% recall on each of three classes; the candidate trades half of class c's recall for
    # gains on a and b, so accuracy is unchanged
    sizes = {"a": 300, "b": 300, "c": 60}
    refs = [lab for lab, n in sizes.items() for _ in range(n)]
    pos = [i for lab, n in sizes.items() for i in range(n)]

    def build(recall_of: dict) -> dict:
        preds = []
        for ref, i in zip(refs, pos):
            right = i < recall_of[ref] * sizes[ref]
            preds.append({"label": ref if right else "a" if ref != "a" else "b", "probability": 0.8, "correct": right})
        return report("classify", [f"t {ref} {i}" for ref, i in zip(refs, pos)], refs, preds, labels=list(sizes))

    prod = build({"a": 0.8, "b": 0.8, "c": 0.8})
    cand = build({"a": 0.84, "b": 0.84, "c": 0.4})
    out = compare_reports(cand, prod, margin=0.03)
    assert out["overall"]["delta"] == 0 and out["overall"]["passed"]
    assert out["code"] == REGRESSION and len(out["reasons"]) == 1 and out["reasons"][0].startswith("class 'c': recall")
    by = {g["name"]: g for g in out["groups"]}
    assert by["c"]["candidate"] == pytest.approx(0.4) and by["c"]["production"] == pytest.approx(0.8)
    assert by["a"]["passed"] and by["b"]["passed"] and not by["c"]["passed"]
    # McNemar sees 24 + 24 = 48 discordant pairs, balanced: no evidence of a difference
    assert out["mcnemar"]["b"] == 24 and out["mcnemar"]["c"] == 24 and out["mcnemar"]["pvalue"] > 0.8


def test_a_declared_slice_is_checked_like_a_class():
    row = ROWS[1]  # regress: the candidate is worse on the weekend slice alone
    meta = [{"slice": "weekend" if i % 7 >= 5 else "weekday"} for i in range(N)]
    refs = [100.0 + i for i in range(N)]

    def build(err) -> dict:
        return report("regress", [f"day {i}" for i in range(N)], refs,
                      [{"value": r + err(i), "abs_error": abs(err(i))} for i, r in enumerate(refs)], meta=meta)

    prod = build(lambda i: BASE_ERR[i])
    cand = build(lambda i: BASE_ERR[i] * (3 if i % 7 >= 5 else 0.9))
    out = compare_reports(cand, prod, margin=10.0)
    assert out["overall"]["passed"] and out["code"] == REGRESSION
    assert [g["name"] for g in out["groups"] if not g["passed"]] == ["weekend"]
    assert row.task == "regress"


# ---- the numbers, by hand


def test_the_interval_matches_a_hand_computation():
    # improvements -1, 0, 0, +1: a resample's summed improvement is Binomial(8, 1/2) - 4 (each draw is
    # two fair coins minus one), so P(sum <= -3) = 9/256 < 5% <= P(sum <= -2) = 37/256: the one-sided 95%
    # lower bound of the mean is -2/4, and by symmetry the upper one +2/4
    m = METRICS["classify"]["accuracy"]
    cand = np.array([[0.0], [1.0], [0.0], [1.0]])
    prod = np.array([[1.0], [1.0], [0.0], [0.0]])
    r = paired_interval(m, cand, prod, confidence=0.95, samples=20000, rng=np.random.default_rng(0))
    assert r["delta"] == 0 and r["lower"] == -0.5 and r["upper"] == 0.5
    # lower is better: the sign flips, so the same errors read as the mirror image
    mae = METRICS["regress"]["mae"]
    r = paired_interval(mae, np.array([[3.0], [1.0], [1.0], [0.0]]), np.array([[2.0], [1.0], [1.0], [1.0]]),
                        confidence=0.95, samples=20000, rng=np.random.default_rng(0))
    assert r["delta"] == 0 and r["lower"] == -0.5 and r["upper"] == 0.5


def test_the_interval_of_a_mean_is_near_the_normal_one():
    rng = np.random.default_rng(1)
    d = rng.normal(0.03, 0.2, 400)
    base = rng.uniform(0.3, 0.7, 400)
    r = paired_interval(METRICS["sft"]["rougeL"], (base + d)[:, None], base[:, None], confidence=0.95,
                        samples=4000, rng=np.random.default_rng(0))
    normal = d.mean() - 1.6449 * d.std() / np.sqrt(len(d))
    assert r["lower"] == pytest.approx(normal, abs=0.004)


def test_mcnemar_exact_and_chi_square_by_hand():
    # b = 1, c = 5: two-sided exact p = 2 * P(X <= 1 | 6, 1/2) = 2 * 7/64
    cand = np.array([True] + [False] * 5 + [True] * 10)
    prod = np.array([False] + [True] * 5 + [True] * 10)
    out = mcnemar(cand, prod)
    assert (out["b"], out["c"], out["exact"]) == (1, 5, True) and out["pvalue"] == pytest.approx(14 / 64)
    # b = 10, c = 30 with exact_below 25: chi2 = (|10 - 30| - 1)^2 / 40 = 9.025
    cand = np.array([True] * 10 + [False] * 30)
    out = mcnemar(cand, ~cand, exact_below=25)
    assert not out["exact"] and out["statistic"] == pytest.approx(9.025)
    assert out["pvalue"] == pytest.approx(0.0026631, rel=1e-3)


def test_macro_f1_and_rmse_equal_their_definitions():
    row = ROWS[0]
    out = compare_reports(row.worse, row.production, metric="macro_f1")
    ex = row.production["examples"]
    for key, rep in (("candidate", row.worse), ("production", row.production)):
        pred = [rep["predictions"]["tuned"][e["id"]]["label"] for e in ex]
        want = f1_score([e["reference"] for e in ex], pred, labels=["bad", "good"], average="macro")
        assert out["overall"][key] == pytest.approx(want)
    # per class it falls back to recall (macro-F1 of one class's examples means nothing)
    assert {g["metric"] for g in out["groups"]} == {"recall"}
    reg = ROWS[1]
    out = compare_reports(reg.better, reg.production, metric="rmse")
    assert out["overall"]["production"] == pytest.approx(np.sqrt(np.mean(np.square(BASE_ERR))))


def test_margins_default_per_direction_and_an_unknown_metric_names_the_known():
    cls = compare_reports(ROWS[0].production, ROWS[0].production)
    assert cls["overall"]["margin"] == 0.02 and cls["groups"][0]["margin"] == 0.05
    reg = compare_reports(ROWS[1].production, ROWS[1].production)
    assert reg["overall"]["margin"] == pytest.approx(0.05 * np.mean(BASE_ERR))
    # a wide enough margin lets the worse candidate through: the margin is what decides
    assert compare_reports(ROWS[2].worse, ROWS[2].production, margin=0.3)["code"] == PASS
    with pytest.raises(ConfigError, match=r"gate.metric: 'bleu' is not a sft metric \(known: rougeL, loss\)"):
        compare_reports(ROWS[2].worse, ROWS[2].production, metric="bleu")


def test_the_same_seed_gives_the_same_bounds():
    a = compare_reports(ROWS[1].worse, ROWS[1].production, seed=3)
    b = compare_reports(ROWS[1].worse, ROWS[1].production, seed=3)
    assert a["overall"] == b["overall"]
