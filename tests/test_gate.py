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
def test_leakage_both_versions_share_is_left_out_not_blocking(row: Row):
    """A duplicate between the training and test data that production trained on too favours neither
    version: those examples leave the comparison (counted), and the gate still decides on the rest. A leak
    only the candidate has still cannot be compared."""
    ex = row.production["examples"]
    both = {ex[7]["key"], ex[8]["key"]}
    out = compare_reports(row.better, row.production, training_keys=both, production_training_keys=both)
    assert out["code"] == PASS and sorted(out["shared_leak"]) == sorted([ex[7]["id"], ex[8]["id"]])
    assert out["n"] == N - 2
    new = compare_reports(row.better, row.production, training_keys=both | {ex[9]["key"]},
                          production_training_keys=both)
    assert new["code"] == CANNOT_COMPARE and new["leaked"] == [ex[9]["id"]]
    assert "not in production's" in new["reasons"][0]


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
    # a zero margin still lets an identical candidate through (not worse at all)
    assert compare_reports(ROWS[1].production, ROWS[1].production, margin=0, class_margin=0)["code"] == PASS
    # a wide enough margin lets the worse candidate through: the margin is what decides
    assert compare_reports(ROWS[2].worse, ROWS[2].production, margin=0.3)["code"] == PASS
    with pytest.raises(ConfigError, match=r"gate.metric: 'bleu' is not a sft metric \(known: rougeL, loss\)"):
        compare_reports(ROWS[2].worse, ROWS[2].production, metric="bleu")


def test_the_same_seed_gives_the_same_bounds():
    a = compare_reports(ROWS[1].worse, ROWS[1].production, seed=3)
    b = compare_reports(ROWS[1].worse, ROWS[1].production, seed=3)
    assert a["overall"] == b["overall"]


# ---- end to end: tiny trained runs through the registry and the CLI


def _soup(path, n: int, start: int, rng: random.Random) -> str:
    rows = []
    for i in range(start, start + n):
        good = i % 2
        word = rng.choice(["great", "tasty", "lovely"] if good else ["awful", "stale", "bland"])
        # the word last: the tiny model classifies from the last token
        rows.append({"text": f"soup {i} was {word}", "label": "good" if good else "bad"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _gate_cli(monkeypatch, capsys, *args):
    import sys

    from tuneloop import cli

    monkeypatch.setattr(sys, "argv", ["tuneloop", "gate", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.slow  # trains four tiny runs and evaluates them: the `make test` tier, not the inner loop
def test_gate_end_to_end_through_the_registry_and_the_cli(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    from tuneloop import registry
    from tuneloop.config import recipe_from_dict
    from tuneloop.eval.tasks import evaluate_run
    from tuneloop.gate import GATE_HTML, GATE_JSON, gate
    from tuneloop.train import train_run

    rng = random.Random(0)
    train, test = _soup(tmp_path / "train.jsonl", 64, 0, rng), _soup(tmp_path / "test.jsonl", 60, 1000, rng)
    other_test = _soup(tmp_path / "other.jsonl", 40, 5000, rng)
    ws = tmp_path / "ws"
    good = {"max_steps": 40, "lr": 3e-2}  # 100% on this test set
    broken = {"max_steps": 1, "lr": 1e-6}  # the untrained head: far below

    def trained(name: str, train_keys: dict, data: dict | None = None) -> str:
        recipe = recipe_from_dict({
            "name": name, "task": "classify", "model": str(tiny_llama_dir),
            "data": data or {"train": train, "test": test},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "eval": {"batch_size": 16, "systems": ["tuned"], "probe_sample": 0, "forgetting": False},
            "train": {"batch_size": 8, "precision": "fp32", "threads": 1, "max_length": 48, **train_keys}})
        run_dir, _ = train_run(recipe, ws, show_progress=False)
        return registry.register(ws, run_dir, name="soup").ref

    v1 = trained("prod", good)
    evaluate_run(registry.resolve(ws, v1).run_dir, show_progress=False)  # production has its report
    registry.promote(ws, v1)  # the first holder needs no gate
    v2 = trained("same", good)  # no report: the gate evaluates it
    v3 = trained("broken", broken)
    # the broken one was evaluated on another test set: the gate re-runs it on production's
    evaluate_run(registry.resolve(ws, v3).run_dir, test_path=other_test, show_progress=False)

    # ---- equal: passes, and --promote moves production
    code, out = _gate_cli(monkeypatch, capsys, v2, "--against", "soup@production", "--promote", "-w", str(ws))
    assert code == 0, out
    assert "passes" in out and "promoted: production → soup:2" in out and "accuracy" in out
    assert registry.resolve(ws, "soup@production").ref == v2

    # ---- worse: exit 1, the report says where, nothing moves
    code, out = _gate_cli(monkeypatch, capsys, v3, "--against", "soup@production", "--promote", "-w", str(ws))
    assert code == 1, out
    assert "regression" in out and "accuracy: candidate" in out and "Traceback" not in out
    assert registry.resolve(ws, "soup@production").ref == v2
    with pytest.raises(ConfigError, match="failed the gate"):
        registry.promote(ws, v3)
    r3 = registry.resolve(ws, v3)
    assert json.loads((r3.run_dir / "report.json").read_text())["test"]["path"] == other_test  # left as it was
    folder = sorted((ws / "gates").glob("soup-3-vs-soup-2-*"))[-1]
    result = json.loads((folder / GATE_JSON).read_text())
    assert result["code"] == 1 and result["test"]["path"] == test and result["overall"]["delta"] < -0.3
    assert (folder / "candidate" / "report.json").exists()  # the re-run on production's test set
    page = (folder / GATE_HTML).read_text()
    assert "data:image/png;base64," in page and "class bad" in page and "class good" in page

    # ---- leakage: a candidate trained on the test records cannot be compared
    leaky = tmp_path / "leaky.jsonl"
    leaky.write_text((tmp_path / "train.jsonl").read_text() + (tmp_path / "test.jsonl").read_text())
    v4 = trained("leaky", good, {"train": str(leaky), "test": test})
    res = gate(ws, v4, "soup@production")
    assert res.code == 2 and res.reasons[0].startswith("leakage: 60 of 60 test examples")

    # ---- the frozen test set changed since production was evaluated: cannot compare
    (tmp_path / "test.jsonl").write_text("".join((tmp_path / "test.jsonl").read_text().splitlines(True)[:-1]))
    code, out = _gate_cli(monkeypatch, capsys, v2, "--against", v1, "-w", str(ws))
    assert code == 2 and "different test sets" in out, out

    # ---- the registry remembers: history, and a rollback to the version before
    assert [(h["how"], h["to"]) for h in registry.history(ws, "soup")] == [("first", v1), ("gate", v2)]
    assert registry.history(ws, "soup")[1]["gate_report"].endswith(GATE_JSON)
    assert registry.rollback(ws, "soup").ref == v1


@pytest.mark.slow
@pytest.mark.parametrize("task", ["regress", "sft"])
def test_gate_end_to_end_on_held_out_test_sets(task, tmp_path, tiny_llama_dir):
    """regress and sft hold their test set out of the training file: two runs of one recipe and seed hold out
    the same records, so a version without a report is evaluated on its own held-out set, which is
    production's. An equal retrain passes and is promoted; a broken one is a regression."""
    from test_run_contract import TINY_METHOD, regress_data, sft_data

    from tuneloop import registry
    from tuneloop.config import recipe_from_dict
    from tuneloop.eval.tasks import evaluate_run
    from tuneloop.gate import gate
    from tuneloop.train import train_run

    ws = tmp_path / "ws"
    data = (regress_data if task == "regress" else sft_data)(tmp_path)
    # the gate compares predictions: the report's probes and forgetting check only cost time here
    quick = {"probe_sample": 0, "forgetting": False}
    ev = {"batch_size": 8, **quick} if task == "regress" else {"batch_size": 4, "max_new_tokens": 6,
                                                               "systems": ["tuned"], **quick}

    def trained(train_keys: dict, gate_keys: dict | None = None) -> str:
        recipe = recipe_from_dict({"name": f"g-{task}", "task": task, "model": str(tiny_llama_dir), "data": data,
                                   "method": TINY_METHOD, "eval": ev, "gate": gate_keys or {}, "train": {
                                       "batch_size": 8, "precision": "fp32", "threads": 1, "max_length": 48,
                                       **train_keys}})
        return registry.register(ws, train_run(recipe, ws, show_progress=False)[0], name="m").ref

    v1 = trained({"max_steps": 30, "lr": 3e-2}, {"confidence": 0.9, "bootstrap_samples": 500})
    evaluate_run(registry.resolve(ws, v1).run_dir, show_progress=False)
    registry.promote(ws, v1)
    v2 = trained({"max_steps": 30, "lr": 3e-2}, {"confidence": 0.99, "bootstrap_samples": 100})
    v3 = trained({"max_steps": 1, "lr": 1e-6})
    res = gate(ws, v2, "m@production", promote=True)
    assert res.code == 0, res.reasons
    # production's recipe says how it is gated, never the candidate's
    assert res.details["confidence"] == 0.9 and res.details["bootstrap_samples"] == 500
    folder = res.report_json.parent
    assert res.details["notes"] == [f"candidate: evaluated tuned on its own test set into {folder}/candidate"]
    assert registry.resolve(ws, "m@production").ref == v2
    res = gate(ws, v3, "m@production", promote=True)
    assert res.code == 1 and res.reasons, res.details
    assert registry.resolve(ws, "m@production").ref == v2
