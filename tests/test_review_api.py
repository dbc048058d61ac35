"""The review page's API (serve/routers/review.py) over a real feedback store in tmp_path.

FastAPI's TestClient talks to the standalone app (`create_review_app`); its default client address
("testclient") is not loopback, so every write there needs a reviewer key, while a client made with a
127.0.0.1 address may review without one as `local`. The slow test runs `tuneloop review` as a process
and SIGKILLs it right after acknowledged submissions.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tuneloop.feedback import FeedbackStore
from tuneloop.serve.app import create_review_app
from tuneloop.serve.routers.review import COOKIE, ReviewSettings, load_review_settings

SRC = Path(__file__).resolve().parents[1] / "src"
LOOPBACK = ("127.0.0.1", 40000)


def _answers(n: int, source: str = "runA/tuned") -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Question {i}?"}], "answer": f"Answer {i}.", "source": source,
             "response_id": None, "example_id": f"{i}-ex", "reference": f"Reference {i}."} for i in range(n)]


def _pairs(n: int) -> list[dict]:
    return [{"prompt": f"Pair prompt {i}", "answer_a": f"base says {i}", "source_a": "runA/base",
             "answer_b": f"tuned says {i}", "source_b": "runA/tuned", "example_id": f"{i}-ex"} for i in range(n)]


@pytest.fixture()
def store(tmp_path):
    s = FeedbackStore(tmp_path / "feedback.db")
    yield s
    s.close()


def _app(store, **settings):
    return create_review_app(store, ReviewSettings(**settings))


def _signed_in(store, name: str, **settings) -> TestClient:
    key = store.add_reviewer(name)
    c = TestClient(_app(store, **settings))
    r = c.post("/review/api/login", json={"key": key})
    assert r.status_code == 200, r.text
    return c


@pytest.mark.slow
def test_the_page_is_served_and_self_contained(store):
    c = TestClient(_app(store))
    r = c.get("/review/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    # no CDN, no inline script: only the page's own files, which are served
    assert "http://" not in html and "https://" not in html and "<script>" not in html
    for f in ("review.js", "review.css"):
        assert f"/review/static/{f}" in html
        assert c.get(f"/review/static/{f}").status_code == 200
    assert c.get("/review/static/../routers/review.py").status_code == 404
    assert c.get("/review/static/index.html").status_code == 404
    assert "default-src 'self'" in r.headers["content-security-policy"]
    # the keys are shown on the page
    for key in ("1 – 5", "A / B / E", "J / K", "Enter", "Ctrl+Enter"):
        assert key in html
    assert c.get("/", follow_redirects=False).headers["location"] == "/review/"


def test_off_loopback_nothing_without_a_key(store):
    store.enqueue_answers("q", _answers(2))
    c = TestClient(_app(store))
    for method, path, body in [("GET", "/review/api/me", None), ("POST", "/review/api/next", {}),
                               ("POST", "/review/api/items/1/review", {"rating": 4}),
                               ("GET", "/review/api/progress", None), ("GET", "/review/api/agreement", None),
                               ("GET", "/review/api/queues", None)]:
        r = c.request(method, path, json=body)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
    r = c.get("/review/api/me", headers={"Authorization": "Bearer tlr_not-a-key"})
    assert r.status_code == 401
    assert store.reviews() == []


def test_sign_in_gives_an_httponly_cookie_and_bearer_works_too(store):
    key = store.add_reviewer("alice")
    c = TestClient(_app(store))
    bad = c.post("/review/api/login", json={"key": "wrong"})
    assert bad.status_code == 401 and bad.json()["error"]["param"] == "key"
    r = c.post("/review/api/login", json={"key": key})
    assert r.status_code == 200 and r.json()["reviewer"] == "alice"
    cookie = r.headers["set-cookie"]
    assert f"{COOKIE}=" in cookie and "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    me = c.get("/review/api/me").json()
    assert me["reviewer"] == "alice" and me["local"] is False and me["rubric"] == ["accurate", "tone", "concise"]
    assert c.post("/review/api/logout").status_code == 200
    c.cookies.clear()
    assert c.get("/review/api/me").status_code == 401
    bearer = TestClient(_app(store)).get("/review/api/me", headers={"Authorization": f"Bearer {key}"})
    assert bearer.status_code == 200 and bearer.json()["reviewer"] == "alice"


def test_loopback_reviews_as_local_unless_turned_off(store):
    store.enqueue_answers("q", _answers(1))
    c = TestClient(_app(store), client=LOOPBACK)
    assert c.get("/review/api/me").json()["reviewer"] == "local"
    item = c.post("/review/api/next", json={}).json()["item"]
    assert c.post(f"/review/api/items/{item['id']}/review", json={"rating": 5}).status_code == 201
    # a second app on the same store finds the same `local` reviewer instead of making another
    again = TestClient(_app(store), client=LOOPBACK).get("/review/api/me").json()
    assert again["reviewer"] == "local" and [r["name"] for r in store.reviewers()] == ["local"]
    assert [r["reviewer"] for r in store.reviews()] == ["local"]
    # another site's page in this machine's browser may not review as `local`
    evil = c.post("/review/api/next", json={}, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403
    assert c.post("/review/api/next", json={}, headers={"Origin": "http://testserver"}).status_code == 200
    off = TestClient(_app(store, local_reviewer=False), client=LOOPBACK)
    assert off.get("/review/api/me").status_code == 401


def test_reservations_never_hand_one_item_to_two_reviewers(store):
    store.enqueue_answers("q", _answers(2))
    alice, bob, carol = (_signed_in(store, n) for n in ("alice", "bob", "carol"))
    a = alice.post("/review/api/next", json={}).json()["item"]
    b = bob.post("/review/api/next", json={}).json()["item"]
    assert a["id"] != b["id"] and a["reserved_until"] > time.time()
    assert carol.post("/review/api/next", json={}).json()["item"] is None
    # asking again returns what one holds, not a second item
    assert alice.post("/review/api/next", json={}).json()["item"]["id"] == a["id"]
    assert alice.post(f"/review/api/items/{a['id']}/release").status_code == 200
    assert carol.post("/review/api/next", json={}).json()["item"]["id"] == a["id"]
    prog = {p["reviewer"]: p for p in alice.get("/review/api/progress").json()["progress"]}
    assert prog["bob"]["reserved"] == 1 and prog["carol"]["reserved"] == 1 and prog["alice"]["reserved"] == 0
    assert alice.get("/review/api/queues").json()["queues"][0]["items"] == 2
    assert alice.post("/review/api/next", json={"queue": "no-such-queue"}).json()["item"] is None


@pytest.mark.parametrize("body,param", [
    ({"rating": 7}, "rating"),
    ({"rating": 0}, "rating"),
    ({"thumb": 0}, "thumb"),
    ({"rating": 3, "criteria": {"funny": True}}, "criteria.funny"),
    ({"criteria": {"accurate": "yes"}}, "criteria.accurate"),
    ({"choice": "A"}, "choice"),
    ({}, "rating"),
    ({"rating": 3, "mood": "ok"}, "mood"),
    ({"correction": 5}, "correction"),
])
def test_bad_submissions_name_the_field(store, body, param):
    store.enqueue_answers("q", _answers(1))
    c = _signed_in(store, "alice")
    item = c.post("/review/api/next", json={}).json()["item"]
    r = c.post(f"/review/api/items/{item['id']}/review", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert store.reviews() == []


def test_a_review_with_everything_is_stored_as_sent(store):
    store.enqueue_answers("q", _answers(1))
    c = _signed_in(store, "alice", rubric=["accurate", "polite"])
    item = c.post("/review/api/next", json={}).json()["item"]
    assert item["answer"] == "Answer 0." and item["reference"] == "Reference 0."
    body = {"rating": 2, "criteria": {"accurate": False, "polite": True}, "thumb": -1,
            "correction": "Answer zero, properly.", "reason": "wrong number"}
    r = c.post(f"/review/api/items/{item['id']}/review", json=body)
    assert r.status_code == 201, r.text
    [row] = store.reviews()
    assert {k: row[k] for k in body} == body and row["reviewer"] == "alice" and row["item_id"] == item["id"]
    assert c.post("/review/api/items/999/review", json={"rating": 3}).status_code == 404
    assert c.get("/review/api/items/999").status_code == 404
    # reviewed by all it wanted: nothing more to hand out
    assert c.post("/review/api/next", json={}).json()["item"] is None


def test_pairs_hide_their_sources_until_submitted(store):
    store.enqueue_pairs("p", _pairs(3), seed=1)
    c = _signed_in(store, "alice")
    for _ in range(3):
        r = c.post("/review/api/next", json={"queue": "p"})
        item = r.json()["item"]
        assert item["kind"] == "pair" and "runA" not in r.text and "source" not in r.text
        assert "runA" not in c.get(f"/review/api/items/{item['id']}").text
        missing = c.post(f"/review/api/items/{item['id']}/review", json={"reason": "hm"})
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "choice"
        done = c.post(f"/review/api/items/{item['id']}/review", json={"choice": "A", "reason": "clearer"})
        assert done.status_code == 201, done.text
        revealed = done.json()["revealed"]
        # A is whatever was shown as A: its source is the system that wrote the answer shown as A
        shown_a = "runA/base" if item["answer_a"].startswith("base") else "runA/tuned"
        assert revealed["A"] == shown_a and {revealed["A"], revealed["B"]} == {"runA/base", "runA/tuned"}
    rows = store.reviews(queue="p")
    assert [r["choice"] for r in rows] == ["A"] * 3
    # seeded randomisation: over a few pairs, not always the same side first (seed 1 mixes these three)
    assert len({r["source_a"] for r in rows}) == 2


def test_progress_and_agreement_on_items_reviewed_twice(store):
    store.enqueue_answers("q", _answers(4), reviews_wanted=2)
    alice, bob = _signed_in(store, "alice"), _signed_in(store, "bob")
    for who, ratings in ((alice, [5, 4, 2, 1]), (bob, [5, 4, 1, 1])):
        for rating in ratings:
            item = who.post("/review/api/next", json={}).json()["item"]
            assert who.post(f"/review/api/items/{item['id']}/review", json={"rating": rating}).status_code == 201
    prog = {p["reviewer"]: p["reviewed"] for p in alice.get("/review/api/progress").json()["progress"]}
    assert prog == {"alice": 4, "bob": 4}
    agree = alice.get("/review/api/agreement").json()
    assert agree["items"] == 4
    kappa = agree["rating"]["cohen_kappa"]
    assert kappa is not None and 0.5 < kappa < 1.0  # close, not identical


def test_review_settings_from_the_workspace_and_flags(tmp_path):
    assert load_review_settings(tmp_path).rubric == ["accurate", "tone", "concise"]
    (tmp_path / "review.yaml").write_text("rubric: [correct, kind]\nreviews_per_item: 2\n")
    s = load_review_settings(tmp_path, reviews_per_item=3)
    assert s.rubric == ["correct", "kind"] and s.reviews_per_item == 3
    (tmp_path / "review.yaml").write_text("rubrik: [x]\n")
    from tuneloop.errors import ConfigError

    with pytest.raises(ConfigError, match=r"review.yaml: rubrik"):
        load_review_settings(tmp_path)
    with pytest.raises(ConfigError, match="rubric"):
        load_review_settings(None, rubric=["ok", "no spaces allowed"])


# ------------------------------------------------------------------------------ queue commands
def test_queue_commands_from_reports(tmp_path):
    """`tuneloop review queue run|pairs` read the prompts back from the test set the report names."""
    from tuneloop.eval.schema import Report, TestSet, headline, keyed, make_examples, write_report_json
    from tuneloop.serve.review_queues import answer_items, pair_items

    test = tmp_path / "test.jsonl"
    convs = [[{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}] for i in range(3)]
    test.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs))
    examples = make_examples([json.dumps(m[:-1], ensure_ascii=False) for m in convs], [m[-1]["content"] for m in convs])

    def report(folder: Path, tuned: str) -> Path:
        systems = {"base": {"rougeL": 0.1}, "tuned": {"rougeL": 0.2}}
        preds = {"base": keyed(examples, [{"text": f"base {i}", "rougeL": 0.1} for i in range(3)]),
                 "tuned": keyed(examples, [{"text": f"{tuned} {i}", "rougeL": 0.2} for i in range(3)])}
        r = Report(task="sft", title="t", run=str(folder), model="m", systems=systems,
                   headline=headline(systems, "rougeL", "higher"), test=TestSet(path=str(test), n=3, fingerprint="fp"),
                   examples=examples, predictions=preds)
        folder.mkdir()
        return write_report_json(r, folder)

    one, two = report(tmp_path / "r1", "one"), report(tmp_path / "r2", "two")
    items = answer_items(str(one), None)
    assert [i["answer"] for i in items] == ["one 0", "one 1", "one 2"]
    assert items[1]["prompt"] == convs[1][:-1] and items[1]["reference"] == "A1." and items[1]["source"] == "r1/tuned"
    pairs = pair_items(str(one.parent), None, "base", "tuned")
    assert [(p["answer_a"], p["answer_b"]) for p in pairs][0] == ("base 0", "one 0")
    across = pair_items(str(one), None, "tuned", "tuned", other=str(two))
    assert [(p["source_a"], p["source_b"]) for p in across][0] == ("r1/tuned", "r2/tuned")
    # through the CLI into the workspace's store, idempotently
    from data_helpers import run_cli

    ws = tmp_path / "ws"
    code, out = run_cli("review", "queue", "run", one, "-w", ws)
    assert code == 0 and "queue r1: 3 new item(s) queued" in out, out
    code, out = run_cli("review", "queue", "run", one, "-w", ws)
    assert code == 0 and "0 new item(s) queued, 3 already there" in out, out
    code, out = run_cli("review", "queue", "pairs", one, two, "-w", ws, "--reviews-per-item", "2")
    assert code == 0 and "queue pairs-r1-vs-r2: 3 new" in out, out
    store = FeedbackStore.for_workspace(ws)
    store.log_response("resp-1", "m", "chat", [{"role": "user", "content": "hi"}], "hello", "stop", "m:1")
    code, out = run_cli("review", "queue", "served", "-w", ws, "--since", "1h")
    assert code == 0 and "queue served: 1 new" in out, out
    assert {(q["queue"], q["kind"], q["items"], q["reviews_wanted"]) for q in store.queues()} == {
        ("r1", "answer", 3, 1), ("pairs-r1-vs-r2", "pair", 3, 2), ("served", "answer", 1, 1)}
    store.close()
    code, out = run_cli("review", "queue", "run", tmp_path / "nope", "-w", ws)
    assert code == 3 and "nope: neither a report.json" in out and "Traceback" not in out
    code, out = run_cli("review", "queue", "pairs", one, "-w", ws, "--a", "base", "--b", "judge")
    assert code == 2 and "no system 'judge'" in out
    # an edited test set no longer matches the report's keys: refused, not mis-paired
    test.write_text(test.read_text().replace("Q1?", "Q1 changed?"))
    from tuneloop.errors import DataError

    with pytest.raises(DataError, match="not the one the report evaluated"):
        answer_items(str(one), None)


# ------------------------------------------------------------------------------ durability
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_every_acknowledged_review_survives_sigkill(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    k = 12
    store = FeedbackStore.for_workspace(ws)
    key = store.add_reviewer("alice")
    store.enqueue_answers("q", _answers(k))
    store.close()
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "tuneloop.cli", "review", "-w", str(ws), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    acked = []
    try:
        url = f"http://127.0.0.1:{port}/review/api"
        headers = {"Authorization": f"Bearer {key}"}
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(url + "/me", headers=headers, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "tuneloop review did not start"
            time.sleep(0.2)
        with httpx.Client(base_url=url, headers=headers, timeout=10) as c:
            for i in range(k):
                item = c.post("/next", json={}).json()["item"]
                r = c.post(f"/items/{item['id']}/review", json={"rating": 1 + i % 5, "correction": f"fixed {i}"})
                assert r.status_code == 201, r.text
                acked.append((r.json()["id"], item["id"], 1 + i % 5, f"fixed {i}"))
        # right after the last 2xx: no clean shutdown, no chance to flush anything
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    again = FeedbackStore.for_workspace(ws)
    try:
        found = {(r["id"], r["item_id"], r["rating"], r["correction"]) for r in again.reviews()}
    finally:
        again.close()
    assert len(acked) == k and set(acked) <= found
