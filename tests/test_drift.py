"""Drift: same-distribution texts are not flagged and shifted ones are; PSI and label-mix invariants; the
rating trend; `tuneloop drift` end to end on a tiny run and a store of logged responses; /v1/classify logs
its inputs. The texts are generated from seeded templates (restaurant reviews vs gadget reviews), encoded
with the bundled MiniLM (a few hundred short texts: seconds)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tuneloop.drift import DEFAULT_THRESHOLDS, label_drift, psi, rating_drift, text_drift
from tuneloop.errors import DataError


def food(rng: random.Random) -> str:
    dish = rng.choice(["pasta", "pizza", "soup", "burger", "salad", "curry", "steak", "dessert", "noodles"])
    how = rng.choice(["great", "awful", "tasty", "bland", "lovely", "cold", "fresh", "greasy", "salty"])
    who = rng.choice(["waiter", "service", "staff", "chef", "host"])
    mood = rng.choice(["friendly", "slow", "rude", "quick", "attentive"])
    end = rng.choice(["Would eat here again.", "Never coming back.", "Nice dinner spot.", "Too pricey for lunch."])
    return f"The {dish} was {how} and the {who} was {mood}. {end}"


def gadget(rng: random.Random) -> str:
    thing = rng.choice(["laptop", "keyboard", "monitor", "router", "phone", "charger", "printer", "tablet"])
    how = rng.choice(["great", "awful", "fast", "buggy", "sleek", "heavy", "cheap", "noisy"])
    part = rng.choice(["battery", "screen", "firmware", "driver", "hinge"])
    does = rng.choice(["crashes often", "lasts all day", "updates slowly", "works fine", "overheats"])
    end = rng.choice(["Returned it.", "Worth the money.", "Support never answered.", "Setup took minutes."])
    return f"This {thing} is {how}; the {part} {does}. {end}"


def texts(make, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [make(rng) for _ in range(n)]


REFERENCE = texts(food, 150, 0)


def test_same_distribution_is_not_flagged():
    r = text_drift(REFERENCE, texts(food, 60, 1))
    assert r["drifted"] is False
    assert r["n_reference"] == 150 and r["n_live"] == 60
    for name in ("embedding", "length", "vocabulary"):
        c = r["checks"][name]
        assert c["drifted"] is False and c["p_value"] > 0.05, (name, c)
    assert abs(r["score"] - 0.5) < 0.15  # the domain classifier is near chance


def test_a_new_topic_is_flagged():
    r = text_drift(REFERENCE, texts(gadget, 60, 1))
    assert r["drifted"] is True
    emb = r["checks"]["embedding"]
    assert emb["drifted"] and emb["value"] > 0.95 and emb["p_value"] <= 0.01
    assert r["checks"]["vocabulary"]["drifted"]
    # the live words outside the reference's vocabulary land in its "other" bin
    assert r["checks"]["vocabulary"]["other_share_live"] > r["checks"]["vocabulary"]["other_share_reference"]


def test_a_partial_shift_scores_between_and_more_shift_scores_higher():
    scores = []
    for share in (0.0, 0.4, 1.0):
        k = int(60 * share)
        live = texts(food, 60 - k, 2) + texts(gadget, k, 3)
        scores.append(text_drift(REFERENCE, live)["score"])
    assert scores[0] < scores[1] < scores[2]
    assert text_drift(REFERENCE, texts(food, 36, 2) + texts(gadget, 24, 3))["drifted"]


def test_longer_texts_drift_in_length_only():
    rng = random.Random(5)
    longer = [f"{food(rng)} {food(rng)} {food(rng)}" for _ in range(60)]
    r = text_drift(REFERENCE, longer)
    assert r["checks"]["length"]["drifted"] and r["checks"]["length"]["mean_live"] > 2.5 * r["checks"]["length"]["mean_reference"]


def test_seeded_and_deterministic_and_capped():
    live = texts(food, 40, 7) + texts(gadget, 20, 8)
    a, b = text_drift(REFERENCE, live, seed=3), text_drift(REFERENCE, live, seed=3)
    assert a == b
    capped = text_drift(REFERENCE, live, max_texts=50)
    assert capped["n_reference"] == 50 and capped["n_reference_given"] == 150


def test_too_few_texts_is_a_clear_error():
    with pytest.raises(DataError, match="at least"):
        text_drift(REFERENCE, ["one", "two"])
    with pytest.raises(DataError, match="thresholds.nope"):
        text_drift(REFERENCE, REFERENCE[:10], thresholds={"nope": 1})


def test_psi_invariants():
    e = np.array([10, 20, 30, 40])
    assert psi(e, e) == pytest.approx(0.0, abs=1e-12)
    assert psi(e, e * 7) == pytest.approx(0.0, abs=1e-3)  # shares matter, not totals (up to smoothing)
    a = np.array([40, 30, 20, 10])
    assert psi(e, a) > 0 and psi(e, a) == pytest.approx(psi(a, e), rel=1e-9)  # symmetric
    assert np.isfinite(psi(np.array([10, 0]), np.array([0, 10])))  # an empty bin stays finite
    assert psi(e, np.array([10, 20, 30, 60])) < psi(e, np.array([10, 20, 30, 400]))


def test_label_mix_invariants():
    prior = {"neg": 500, "pos": 500}
    same = label_drift(prior, ["neg"] * 51 + ["pos"] * 49)
    assert same["drifted"] is False and same["checks"]["labels"]["p_value"] > 0.5
    skew = label_drift(prior, ["neg"] * 85 + ["pos"] * 15)
    assert skew["drifted"] is True and skew["score"] > same["score"]
    assert skew["checks"]["labels"]["live"] == {"neg": 0.85, "pos": 0.15}
    # the same shares under a different prior total: the same verdict
    assert label_drift({"neg": 5, "pos": 5}, ["neg"] * 51 + ["pos"] * 49)["drifted"] is False
    new = label_drift(prior, ["neg"] * 40 + ["pos"] * 40 + ["spam"] * 20)
    assert new["checks"]["labels"]["unknown_labels"] == ["spam"] and new["drifted"]
    # few predictions do not flag a moderate shift: the chi-square p-value is not small enough
    assert label_drift(prior, ["neg"] * 7 + ["pos"] * 3)["drifted"] is False
    with pytest.raises(DataError):
        label_drift({}, ["neg"] * 10)


def test_rating_trend():
    falling = [(t, 5 if t < 20 else (2 if t % 2 else 3)) for t in range(40)]
    r = rating_drift(falling)
    assert r["drifted"] and r["score"] < DEFAULT_THRESHOLDS["rating_tau"]
    steady = [(t, [3, 4, 5, 4][t % 4]) for t in range(40)]
    assert rating_drift(steady)["drifted"] is False
    rising = [(t, 5 - v) for t, v in falling]
    assert rating_drift(rising)["drifted"] is False  # getting better is not drift to act on
    few = rating_drift([(0, 5), (1, 1)])
    assert few["checks"]["rating"]["value"] is None and few["drifted"] is False
