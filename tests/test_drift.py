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


@pytest.mark.slow
def test_same_distribution_is_not_flagged():
    r = text_drift(REFERENCE, texts(food, 60, 1))
    assert r["drifted"] is False
    assert r["n_reference"] == 150 and r["n_live"] == 60
    for name in ("embedding", "length", "vocabulary"):
        c = r["checks"][name]
        assert c["drifted"] is False and c["p_value"] > 0.05, (name, c)
    assert abs(r["score"] - 0.5) < 0.15  # the domain classifier is near chance


@pytest.mark.slow
def test_a_new_topic_is_flagged():
    r = text_drift(REFERENCE, texts(gadget, 60, 1))
    assert r["drifted"] is True
    emb = r["checks"]["embedding"]
    assert emb["drifted"] and emb["value"] > 0.95 and emb["p_value"] <= 0.01
    assert r["checks"]["vocabulary"]["drifted"]
    # the live words outside the reference's vocabulary land in its "other" bin
    assert r["checks"]["vocabulary"]["other_share_live"] > r["checks"]["vocabulary"]["other_share_reference"]


@pytest.mark.slow
def test_a_partial_shift_scores_between_and_more_shift_scores_higher():
    scores = []
    for share in (0.0, 0.4, 1.0):
        k = int(60 * share)
        live = texts(food, 60 - k, 2) + texts(gadget, k, 3)
        scores.append(text_drift(REFERENCE, live)["score"])
    assert scores[0] < scores[1] < scores[2]
    assert text_drift(REFERENCE, texts(food, 36, 2) + texts(gadget, 24, 3))["drifted"]


@pytest.mark.slow
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
    with pytest.raises(DataError, match="permutations"):
        text_drift(REFERENCE, REFERENCE[:10], permutations=50)  # the smallest p-value would be 1/51 > alpha


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


# ------------------------------------------------------------------------------ a served version end to end
from data_helpers import run_cli_split as run_cli  # noqa: E402  (one way to call the real CLI)


def _label(text: str) -> str:
    return "neg" if any(w in text for w in ("awful", "bland", "cold", "greasy", "salty", "buggy", "noisy")) else "pos"


def _classify_run(ws, train: list[str], name: str = "reviews"):
    """A finished classify run folder whose recipe trains on `train` (no weights: drift never loads them)."""
    import json

    from tuneloop.config import recipe_from_dict
    from tuneloop.runs import ADAPTER_CONFIG, MODEL, Fingerprints, finish_run, new_run_dir, start_run, write_recipe

    data = ws.parent / f"{name}-train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": _label(t)}) + "\n" for t in train))
    recipe = recipe_from_dict({"name": name, "task": "classify", "model": str(ws.parent / "base"),
                               "data": {"train": str(data)}})
    run_dir = new_run_dir(ws, name)
    write_recipe(run_dir, recipe)
    start_run(run_dir, recipe)
    (run_dir / MODEL).mkdir()
    (run_dir / MODEL / ADAPTER_CONFIG).write_text("{}")
    finish_run(run_dir, recipe, {"steps": 1}, model_path=str(ws.parent / "base"), fingerprints=Fingerprints(),
               labels=["neg", "pos"])
    return run_dir


def _log(store, texts: list[str], version: str, start: float, labels=None, ratings=None) -> None:
    rows = [{"id": f"clf-{version}-{start}-{i}", "created": start + i, "model": "reviews", "endpoint": "classify",
             "prompt": t, "output": labels[i] if labels else _label(t), "finish_reason": "label",
             "model_version": version} for i, t in enumerate(texts)]
    store.log_responses(rows)
    for i, r in enumerate(ratings or []):
        store.add_feedback(rows[i]["id"], rating=r)


@pytest.mark.slow
def test_drift_cli_end_to_end(tmp_path, monkeypatch, capsys):
    import json
    import time

    from tuneloop import registry
    from tuneloop.feedback import FeedbackStore

    ws = tmp_path / "ws"
    ws.mkdir()
    (tmp_path / "base").mkdir()
    run_dir = _classify_run(ws, REFERENCE)
    v = registry.register(ws, run_dir, name="reviews")
    registry.promote(ws, v.ref)
    w = ("-w", str(ws))

    # nothing served yet: a clear error, no traceback
    code, out, err = run_cli(monkeypatch, capsys, "drift", "reviews@production", *w)
    assert code == 1 and "no feedback store" in err and "Traceback" not in err
    store = FeedbackStore.for_workspace(ws)
    now = time.time()
    # last week: traffic like the training data; another version's traffic and old traffic must not count
    _log(store, texts(food, 60, 11), "reviews:1", now - 3 * 86400, ratings=[5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4])
    _log(store, texts(gadget, 40, 12), "reviews:2", now - 86400)
    _log(store, texts(gadget, 40, 13), "reviews:1", now - 30 * 86400)

    code, out, err = run_cli(monkeypatch, capsys, "drift", "reviews@production", "--since", "7d", *w)
    assert code == 0, err
    report = json.loads((ws / "drift" / "reviews-production" / "drift.json").read_text())
    assert report["drifted"] is False and report["n_live"] == 60 and report["version"] == "reviews:1"
    assert set(report["checks"]) == {"embedding", "length", "vocabulary", "labels", "rating"}
    assert report["checks"]["rating"]["n"] == 12 and report["checks"]["labels"]["drifted"] is False
    assert "no drift" in out and "embedding" in out

    # then the world moves: gadgets, mostly called neg, rated ever worse
    shifted = texts(gadget, 60, 14)
    _log(store, shifted, "reviews:1", now - 3600, labels=["neg"] * 50 + ["pos"] * 10,
         ratings=[2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 1, 1])
    store.close()
    out_dir = tmp_path / "report"
    code, out, err = run_cli(monkeypatch, capsys, "drift", "reviews:1", "--since", "2h", "-o", str(out_dir), *w)
    assert code == 4, err
    report = json.loads((out_dir / "drift.json").read_text())
    assert report["drifted"] and report["n_live"] == 60 and report["score"] > 0.95
    assert {"embedding", "vocabulary", "labels"} <= set(report["drifted_checks"])
    assert report["checks"]["rating"]["drifted"] is False  # low within the last 2 h, but not falling there
    html = (out_dir / "drift.html").read_text()
    assert html.count("data:image/png;base64,") == 4  # embeddings, lengths, label mix, ratings
    # over the week (the default --since) the ratings fall
    code, out, err = run_cli(monkeypatch, capsys, "drift", "reviews:1", "-o", str(out_dir), *w)
    report = json.loads((out_dir / "drift.json").read_text())
    assert code == 4 and report["checks"]["rating"]["drifted"] and report["checks"]["rating"]["value"] < 0
    assert report["n_live"] == 120 and report["checks"]["rating"]["n"] == 26
    code, out, err = run_cli(monkeypatch, capsys, "drift", "reviews:1", "--since", "all", "-o", str(out_dir), *w)
    assert code == 4 and json.loads((out_dir / "drift.json").read_text())["n_live"] == 160  # the month-old 40 too
    # the run folder itself is a ref too (the server logs a plain run folder by its name: none here)
    code, out, err = run_cli(monkeypatch, capsys, "drift", str(run_dir), *w)
    assert code == 1 and "0 live inputs" in err and run_dir.name in err

    code, out, err = run_cli(monkeypatch, capsys, "drift", "reviews@staging", *w)
    assert code == 3 and "staging" in err
    code, out, err = run_cli(monkeypatch, capsys, "drift", "nope:1", *w)
    assert code == 3


@pytest.mark.slow
def test_classify_requests_are_logged_for_drift(tmp_path, tiny_llama_dir):
    from fastapi.testclient import TestClient

    from test_serve import _classify_run as serve_classify_run
    from tuneloop.feedback import FeedbackStore
    from tuneloop.feedback.export import export_feedback
    from tuneloop.serve.app import ServeSettings, create_app
    from tuneloop.serve.engine import Engine

    run = serve_classify_run(tiny_llama_dir, tmp_path / "runs" / "clf")
    engine = Engine(str(tiny_llama_dir), base_name="tiny", max_batch=8, max_queue=16, max_new_tokens=8)
    try:
        engine.load_adapter("clf", run).result()
        store = FeedbackStore.for_workspace(tmp_path)
        tc = TestClient(create_app(engine, ServeSettings(workspace=tmp_path), store), client=("127.0.0.1", 5000))
        r = tc.post("/v1/classify", json={"model": "clf", "input": ["good food", "bad service", "ok"]})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        one = tc.post("/v1/classify", json={"model": "clf", "input": "fine"}).json()["data"][0]
        chat = tc.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 2}).json()

        logged = store.responses(endpoint="classify")
        assert [x["prompt"] for x in logged] == ["good food", "bad service", "ok", "fine"]
        assert [x["output"] for x in logged] == [d["label"] for d in data] + [one["label"]]
        assert {x["model_version"] for x in logged} == {"clf"} and [x["id"] for x in logged[:3]] == [d["id"] for d in data]
        assert [x["id"] for x in store.responses(endpoint="chat")] == [chat["id"]]
        assert len(store.responses(model_version="clf")) == 4 and store.responses(model_version="other") == []
        assert store.responses(since=logged[-1]["created"], endpoint="classify")[0]["prompt"] == "fine"
        # a classified text takes feedback like any answer; it is no chat data for the export, nor a review item
        assert tc.post("/v1/feedback", json={"response_id": data[0]["id"], "rating": 1}).status_code == 201
        records, notes = export_feedback(store, "kto")
        assert records == []
        assert store.enqueue_served() == 1  # the chat answer alone
        # with logging off, nothing is written and no ids are handed out
        tc2 = TestClient(create_app(engine, ServeSettings(workspace=tmp_path, log_responses=False), store),
                         client=("127.0.0.1", 5000))
        r = tc2.post("/v1/classify", json={"model": "clf", "input": "quiet"})
        assert r.status_code == 200 and "id" not in r.json()["data"][0]
        assert len(store.responses(endpoint="classify")) == 4
        store.close()
    finally:
        engine.close()


@pytest.mark.slow
def test_embeddings_are_unit_length_cached_and_independent_of_their_batch(monkeypatch):
    from tuneloop import drift

    a, b = REFERENCE[:20], texts(gadget, 30, 21)
    drift._EMBEDDINGS.clear()
    alone = drift.embed(a)
    assert alone.shape == (20, 384) and np.allclose(np.linalg.norm(alone, axis=1), 1, atol=1e-5)
    drift._EMBEDDINGS.clear()
    mixed = drift.embed(b + a, batch_size=7)  # other batches, other padding: the same vectors
    assert np.allclose(mixed[30:], alone, atol=1e-5)
    # a cache over its bound starts over without losing what this call needs
    monkeypatch.setattr(drift, "_EMBEDDINGS_MAX", 40)
    again = drift.embed(a + b)
    assert np.allclose(again[:20], alone, atol=1e-5) and len(drift._EMBEDDINGS) == len(set(a + b))


def test_a_logged_prompt_reads_as_its_training_record_does():
    from tuneloop.data.records import Record
    from tuneloop.drift import _prompt_text

    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Opening hours?"}]
    trained = Record(messages=turns + [{"role": "assistant", "content": "9 to 5."}])
    assert _prompt_text(turns) == trained.input_text()  # the answer is the output, never the input
    assert _prompt_text("plain completion prompt") == "plain completion prompt"
