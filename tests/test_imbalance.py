"""Imbalanced labels: the class-weighted loss, the balanced sampler, the decision rule fitted on validation
(decision.json) and its use by eval and serve alike, and the config's checks. Tiny models from a config."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch

from tuneloop.config import recipe_from_dict
from tuneloop.errors import ConfigError
from tuneloop.train.balance import (balanced_rows, class_weight_values, fit_offsets, metric_of, plan_balance,
                                    weighted_share)

# ---------------------------------------------------------------------------------------------- the loss


def test_weighted_loss_is_the_hand_computed_weighted_sum():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0]])
    y = torch.tensor([0, 2, 1])
    w = torch.tensor([0.5, 2.0, 4.0])
    by_hand = 0.0
    for row, t in zip(logits.tolist(), y.tolist()):
        log_z = np.log(sum(np.exp(v) for v in row))
        by_hand += w[t].item() * (log_z - row[t])
    # my 3 rows of a global batch of 8
    assert weighted_share(logits, y, w, 8).item() == pytest.approx(by_hand / 8, rel=1e-6)
    # weights of 1 give exactly the unweighted share (mean cross-entropy x my rows / batch rows)
    plain = torch.nn.functional.cross_entropy(logits, y) * 3 / 8
    assert weighted_share(logits, y, torch.ones(3), 8).item() == pytest.approx(plain.item(), rel=1e-6)
    # and the weights really change it
    assert abs(weighted_share(logits, y, w, 8).item() - plain.item()) > 0.1


def test_balanced_weights_average_one_and_equalise_the_classes():
    counts = {"a": 90, "b": 9, "c": 1}
    w = class_weight_values("balanced", counts)
    assert sum(w[l] * n for l, n in counts.items()) / 100 == pytest.approx(1.0, rel=1e-5)
    # every class carries the same total weight
    totals = [w[l] * n for l, n in counts.items()]
    assert max(totals) == pytest.approx(min(totals), rel=1e-4)
    assert class_weight_values({"c": 5.0}, counts) == {"a": 1.0, "b": 1.0, "c": 5.0}
    assert class_weight_values("none", counts) is None


# ---------------------------------------------------------------------------------------------- the plan


def test_auto_turns_one_correction_on_under_strong_imbalance_and_nothing_otherwise():
    strong = {"a": 300, "b": 100, "c": 20}
    p = plan_balance(strong, "auto", "auto", "auto", None, has_validation=True)
    assert p["strong"] and p["class_weights_mode"] == "balanced" and p["sampler"] == "shuffle"
    assert p["decision_rule"] == "macro_f1"
    # weights turned off: the sampler balances instead (one correction, not two, and not none)
    p = plan_balance(strong, "none", "auto", "auto", None, has_validation=True)
    assert p["class_weights"] is None and p["sampler"] == "balanced"
    p = plan_balance(strong, "auto", "balanced", "auto", None, has_validation=True)
    assert p["class_weights"] is None and p["sampler"] == "balanced"
    # the data report's rule: largest < 3 x smallest is not strong
    mild = {"a": 59, "b": 20}
    p = plan_balance(mild, "auto", "auto", "auto", None, has_validation=True)
    assert not p["strong"] and p["class_weights"] is None and p["sampler"] == "shuffle" and p["decision_rule"] == "none"
    # the recipe's gate metric is the decision rule's metric
    assert plan_balance(mild, "auto", "auto", "auto", "accuracy", True)["decision_rule"] == "accuracy"
    # no validation: said, and nothing fitted
    p = plan_balance(strong, "auto", "auto", "auto", None, has_validation=False)
    assert p["decision_rule"] == "none" and "no validation split" in p["decision_note"]


def test_the_data_report_and_training_use_the_same_rule():
    from tuneloop.data.report import strongly_imbalanced

    for counts in ({"a": 30, "b": 10}, {"a": 29, "b": 10}, {"a": 5, "b": 5, "c": 1}):
        assert plan_balance(counts, "auto", "auto", "auto", None, True)["strong"] == strongly_imbalanced(counts)
    assert strongly_imbalanced({"a": 30, "b": 10}) and not strongly_imbalanced({"a": 29, "b": 10})


# ---------------------------------------------------------------------------------------------- the sampler


def test_balanced_sampler_draws_the_classes_evenly_and_is_seeded():
    ys = [0] * 900 + [1] * 90 + [2] * 10
    rows = balanced_rows(ys, seed=3)
    assert len(rows) == len(ys)
    mix = Counter(ys[i] for i in rows)
    for c in (0, 1, 2):
        assert abs(mix[c] / len(rows) - 1 / 3) < 0.05, mix
    assert rows == balanced_rows(ys, seed=3) and rows != balanced_rows(ys, seed=4)
    # the small class's rows all come up (drawn with replacement, each about 33 times)
    assert set(i for i in rows if ys[i] == 2) == set(range(990, 1000))


# ---------------------------------------------------------------------------------------------- the decision rule


def _skewed_validation(seed: int, n: int = 400):
    """Scores from a model that leans towards class 0: the small classes' evidence is there, but weaker
    than the prior's pull, so argmax rarely says them."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.8, 0.15, 0.05])
    s = rng.normal(0, 1, (n, 3))
    s[np.arange(n), y] += 1.5
    s[:, 0] += 1.8
    return s, y


def test_offset_search_raises_macro_f1_on_a_skewed_validation_set():
    s, y = _skewed_validation(0)
    off, before, after = fit_offsets(s, y, "macro_f1")
    assert after > before + 0.1, (before, after)
    assert metric_of((s + off).argmax(1), y, 3, "macro_f1") == pytest.approx(after)
    from sklearn.metrics import f1_score

    assert after == pytest.approx(f1_score(y, (s + off).argmax(1), labels=[0, 1, 2], average="macro", zero_division=0))
    # it learnt the lean: class 0 is pushed down relative to the others
    assert off[0] < off[1] and off[0] < off[2]
    # and it carries over to fresh data from the same model
    s2, y2 = _skewed_validation(1)
    assert metric_of((s2 + off).argmax(1), y2, 3, "macro_f1") > metric_of(s2.argmax(1), y2, 3, "macro_f1")


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("metric", ["macro_f1", "accuracy"])
def test_offset_search_never_lowers_the_validation_metric(seed, metric):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 6))
    n = int(rng.integers(5, 80))
    s, y = rng.normal(0, 2, (n, k)), rng.integers(0, k, n)
    off, before, after = fit_offsets(s, y, metric)
    assert before == pytest.approx(metric_of(s.argmax(1), y, k, metric))
    assert after >= before
    assert metric_of((s + off).argmax(1), y, k, metric) == pytest.approx(after)


def test_a_rule_resting_on_one_validation_record_is_not_kept():
    """60 validation e-mails, 15 ham: argmax is right on all but one spam that reads like ham; a large ham
    offset fixes it on validation, and the cross-check (fit on one half, score on the other) refuses it."""
    from tuneloop.train.balance import cross_checked_gain

    rng = np.random.default_rng(0)
    y = np.array([0] * 15 + [1] * 45)
    # how sure the model is of the true class: hams very, spams less
    margin = np.concatenate([rng.uniform(5.0, 8.0, 15), rng.uniform(2.0, 6.0, 45)])
    margin[20] = -3.4  # one spam the model reads as ham
    s = np.zeros((len(y), 2))
    s[np.arange(len(y)), y] = margin
    off, before, after = fit_offsets(s, y, "macro_f1")
    assert after > before  # the search alone would keep it
    assert cross_checked_gain(s, y, "macro_f1") <= 0


def test_a_real_lean_survives_the_cross_check():
    from tuneloop.train.balance import cross_checked_gain

    s, y = _skewed_validation(0)
    assert cross_checked_gain(s, y, "macro_f1") > 0.05
    # and the folds are seeded: the same answer twice
    assert cross_checked_gain(s, y, "macro_f1") == cross_checked_gain(s, y, "macro_f1")


# ---------------------------------------------------------------------------------------------- config


def _doc(**train):
    return {"name": "x", "task": "classify", "data": {"train": "a.jsonl", "labels": ["bad", "good"]},
            "train": train}


def test_class_weights_config_names_the_unknown_label():
    with pytest.raises(ConfigError, match=r"train\.class_weights: unknown label 'gret'.*bad, good"):
        recipe_from_dict(_doc(class_weights={"gret": 2.0}))
    with pytest.raises(ConfigError, match=r"train\.class_weights: weights must be > 0"):
        recipe_from_dict(_doc(class_weights={"good": 0}))
    with pytest.raises(ConfigError, match=r"train\.class_weights"):
        recipe_from_dict(_doc(class_weights="balancd"))
    with pytest.raises(ConfigError, match=r"train\.sampler"):
        recipe_from_dict(_doc(sampler="oversample"))
    assert recipe_from_dict(_doc(class_weights={"good": 3.0})).train.class_weights == {"good": 3.0}
    # a key the task does not read is an error too
    with pytest.raises(ConfigError, match=r"train\.class_weights: not used by task sft"):
        recipe_from_dict({"name": "x", "task": "sft", "data": {"train": "a.jsonl"},
                          "train": {"class_weights": "balanced"}})


def test_unknown_label_without_declared_labels_fails_when_training_sees_them():
    with pytest.raises(ConfigError, match=r"train\.class_weights: unknown label 'gret' \(labels: bad, good\)"):
        plan_balance({"bad": 10, "good": 40}, {"gret": 2.0}, "auto", "auto", None, True)


# ---------------------------------------------------------------------------------------------- end to end

WORDS = {"plain": ["fine", "okay", "normal", "usual"], "late": ["late", "delayed", "slow"],
         "broken": ["broken", "smashed", "cracked"]}


def _write(path, n, seed, shares=(0.8, 0.12, 0.08)):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choices(list(WORDS), weights=shares)[0]
        rows.append({"text": f"the {rng.choice(['box', 'parcel', 'crate'])} was {rng.choice(WORDS[label])}",
                     "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def imbalanced_run(tmp_path_factory, tiny_llama_dir):
    from tuneloop.train import train_run

    tmp = tmp_path_factory.mktemp("imb")
    recipe = recipe_from_dict({
        "name": "tiny-imbalanced", "model": str(tiny_llama_dir),
        "data": {"train": _write(tmp / "train.jsonl", 160, 0), "test": _write(tmp / "test.jsonl", 40, 1),
                 "val_ratio": 0.25},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 1, "batch_size": 16, "lr": 3e-3, "max_length": 16, "precision": "fp32", "threads": 1},
        "eval": {"batch_size": 16, "systems": ["tuned"], "probe_sample": 0, "forgetting": False},
    })
    run_dir, metrics = train_run(recipe, tmp / "ws", show_progress=False)
    return run_dir, metrics


@pytest.mark.slow
def test_training_resolves_and_records_the_imbalance_handling(imbalanced_run):
    run_dir, m = imbalanced_run
    plan = m["imbalance"]
    assert plan["strong"] and plan["class_weights_mode"] == "balanced" and plan["sampler"] == "shuffle"
    assert plan["decision_rule"] == "macro_f1"
    stored = json.loads((run_dir / "train_metrics.json").read_text())
    assert stored["imbalance"] == plan
    # a decision.json exactly when the search raised validation macro-F1
    d = run_dir / "decision.json"
    assert d.exists() == (m["decision"] is not None)
    if d.exists():
        rec = json.loads(d.read_text())
        assert rec["validation"]["after"] > rec["validation"]["before"] and set(rec["offsets"]) == set(WORDS)


@pytest.mark.slow
def test_eval_and_serve_apply_decision_json_identically(imbalanced_run, tiny_llama_dir):
    from tuneloop.eval.compare import evaluate_classify
    from tuneloop.runs import DECISION, write_decision
    from tuneloop.serve.engine import Engine

    run_dir, _ = imbalanced_run
    # a decision that surely changes labels: a strong push towards the smallest class
    write_decision(run_dir, {"rule": "logit_offsets", "metric": "macro_f1", "labels": ["broken", "late", "plain"],
                             "offsets": {"broken": 3.0, "late": 0.0, "plain": -1.0},
                             "validation": {"n": 1, "before": 0.0, "after": 0.1}, "search": "test"})
    texts = [json.loads(l)["text"] for l in (run_dir.parent.parent.parent / "test.jsonl").read_text().splitlines()]
    rep = evaluate_classify(run_dir, systems=["tuned"], show_progress=False, print_results=False)
    eval_labels = [p["label"] for p in rep["predictions"]["tuned"].values()]
    assert any("decision rule" in n for n in rep["notes"])
    # per-class recall beside its support, in the HTML a person opens
    html = (run_dir / "report.html").read_text()
    assert html.count("<th>R</th><th>F1</th><th>n</th>") == 3
    gold = Counter(json.loads(l)["label"] for l in (run_dir.parent.parent.parent / "test.jsonl").read_text().splitlines())
    assert {l: c["support"] for l, c in rep["systems"]["tuned"]["per_class"].items()} == {l: gold[l] for l in WORDS}
    engine = Engine(str(tiny_llama_dir), base_name="tiny", max_batch=8, max_queue=16, max_new_tokens=8)
    try:
        engine.load_adapter("clf", run_dir).result()
        labels, probs, _ = engine.classify("clf", texts).result()
    finally:
        engine.close()
    served = [labels[j] for j in probs.argmax(-1).tolist()]
    assert served == eval_labels
    # the decision really acts: without it, eval says something else on some inputs
    (run_dir / DECISION).unlink()
    plain = evaluate_classify(run_dir, systems=["tuned"], show_progress=False, print_results=False)
    plain_labels = [p["label"] for p in plain["predictions"]["tuned"].values()]
    assert plain_labels != eval_labels
    assert Counter(eval_labels)["broken"] > Counter(plain_labels)["broken"]
