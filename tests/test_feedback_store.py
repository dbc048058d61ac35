"""The feedback store: versioned schema and migrations, reviewers, queues, atomic reservations, reviews,
progress and agreement. Every store test runs on SQLite and, marked `postgres`, on a real PostgreSQL server
that the fixture starts itself (skipped with the reason where it cannot)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sqlite3
import threading
import time
import uuid

import pytest
import sqlalchemy as sa
from sklearn.metrics import cohen_kappa_score

from pg_helpers import PostgresServer
from tuneloop.errors import DataError, NotFoundError
from tuneloop.feedback import FeedbackStore
from tuneloop.feedback.agreement import krippendorff_alpha
from tuneloop.feedback.schema import Base, ReviewItem

HEAD = "0002"


@pytest.fixture(scope="session")
def pg_server():
    server = PostgresServer()
    try:
        server.start()
    except RuntimeError as e:
        server.stop()
        pytest.skip(f"PostgreSQL cannot start here: {e}")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request, tmp_path) -> str:
    """A fresh, empty store: a SQLite file, or a new database on the throwaway PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "feedback.db")
    return request.getfixturevalue("pg_server").create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def store(store_url):
    s = FeedbackStore(store_url)
    yield s
    s.close()


def _engine(store_url: str) -> sa.Engine:
    return sa.create_engine(store_url if "://" in store_url else f"sqlite:///{store_url}")


def _answers(n: int, source: str = "v1", prefix: str = "q") -> list[dict]:
    return [{"prompt": f"{prefix} {i}?", "answer": f"answer {i}", "source": source, "example_id": f"e{i}"}
            for i in range(n)]


# ------------------------------------------------------------------------------------------ schema


def test_a_new_store_is_at_the_newest_revision_and_matches_the_models(store_url):
    FeedbackStore(store_url).close()
    eng = _engine(store_url)
    with eng.connect() as c:
        assert c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == HEAD
    insp = sa.inspect(eng)
    for table in Base.metadata.sorted_tables:  # the migrations made every table and column the models use
        have = {c["name"]: c for c in insp.get_columns(table.name)}
        assert set(have) == {c.name for c in table.columns}, table.name
        assert all(have[c.name]["nullable"] == c.nullable for c in table.columns if not c.primary_key), table.name
    eng.dispose()


def test_a_store_from_an_older_tuneloop_is_brought_up_and_stamped(store_url):
    eng = _engine(store_url)
    old = sa.MetaData()  # feedback.py's tables before model_version and before the schema had versions
    sa.Table("responses", old, sa.Column("id", sa.String(64), primary_key=True),
             sa.Column("created", sa.Float, nullable=False), sa.Column("model", sa.String(128), nullable=False),
             sa.Column("endpoint", sa.String(32), nullable=False), sa.Column("prompt", sa.JSON, nullable=False),
             sa.Column("output", sa.Text, nullable=False), sa.Column("finish_reason", sa.String(32), nullable=False))
    sa.Table("feedback", old, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("response_id", sa.ForeignKey("responses.id"), nullable=False),
             sa.Column("created", sa.Float, nullable=False), sa.Column("rating", sa.Integer),
             sa.Column("correction", sa.Text), sa.Column("comment", sa.Text), sa.Column("user", sa.String(128)))
    old.create_all(eng)
    with eng.begin() as c:
        c.execute(old.tables["responses"].insert().values(id="old-1", created=1.0, model="m", endpoint="chat",
                                                          prompt="hi", output="hello", finish_reason="stop"))
        c.execute(old.tables["feedback"].insert().values(response_id="old-1", created=2.0, rating=5))
    store = FeedbackStore(store_url)
    assert store.get_response("old-1")["model_version"] is None
    assert [f["rating"] for f in store.feedback("old-1")] == [5]
    store.log_response("new-1", "m", "chat", "hey", "yo", "stop", "m:2")
    store.enqueue_served()  # the review tables exist too
    assert store.queues()[0]["items"] == 2
    store.close()
    with eng.connect() as c:
        assert c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == HEAD
    assert [c["name"] for c in sa.inspect(eng).get_columns("responses")].count("model_version") == 1
    eng.dispose()


def _open_at_once(url: str, barrier, errors) -> None:
    try:
        barrier.wait(30)
        s = FeedbackStore(url)
        s.log_response(f"r-{os.getpid()}", "m", "chat", "hi", "hello", "stop")
        s.close()
    except Exception as e:  # reported to the parent, which fails the test with it
        errors.put(f"{type(e).__name__}: {e}")


def test_processes_opening_one_new_store_at_once_migrate_it_once(store_url):
    ctx = mp.get_context("fork")
    barrier, errors = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_open_at_once, args=(store_url, barrier, errors)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    problems = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert problems == [] and all(p.exitcode == 0 for p in procs)
    eng = _engine(store_url)
    with eng.connect() as c:
        assert c.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD]
        assert c.execute(sa.text("SELECT count(*) FROM responses")).scalar() == 4
    eng.dispose()


# ------------------------------------------------------------------------------------------ reviewers


def test_reviewers_have_secret_keys_kept_only_as_hashes(store, store_url):
    key = store.add_reviewer("ann")
    other = store.add_reviewer("bob")
    assert key != other and len(key) > 30
    assert store.reviewer_for_key(key)["name"] == "ann"
    assert store.reviewer_for_key(key + "x") is None and store.reviewer_for_key("") is None
    with pytest.raises(DataError, match="name: .*'ann' already exists"):
        store.add_reviewer("ann")
    with pytest.raises(DataError, match="name"):
        store.add_reviewer("  ")
    eng = _engine(store_url)
    with eng.connect() as c:
        stored = [tuple(r) for r in c.execute(sa.text("SELECT name, key_hash FROM reviewers"))]
    eng.dispose()
    assert len(stored) == 2 and all(key not in h and other not in h for _, h in stored)


# ------------------------------------------------------------------------------------------ queues


def test_enqueueing_is_idempotent_and_validated(store):
    assert store.enqueue_answers("test", _answers(3)) == 3
    assert store.enqueue_answers("test", _answers(4)) == 1  # e0..e2 are there already
    assert store.enqueue_answers("test", _answers(2, source="v2")) == 2  # another version's answers are new
    assert store.queues() == [{"queue": "test", "kind": "answer", "items": 6, "done": 0, "reviews": 0,
                               "reviews_wanted": 1}]
    with pytest.raises(DataError, match=r"items\[1\]\.answer"):
        store.enqueue_answers("test", [_answers(1)[0], {"prompt": "p", "answer": None, "source": "v"}])
    with pytest.raises(DataError, match=r"items\[0\]\.prompt"):
        store.enqueue_answers("test", [{"prompt": [{"role": "user"}], "answer": "a", "source": "v"}])
    with pytest.raises(DataError, match="reviews_wanted"):
        store.enqueue_answers("test", _answers(1), reviews_wanted=0)
    with pytest.raises(DataError, match="holds answers"):
        store.enqueue_pairs("test", [{"prompt": "p", "answer_a": "a", "source_a": "x", "answer_b": "b",
                                      "source_b": "y", "example_id": "1"}])
    assert store.queues()[0]["items"] == 6  # a failed batch adds nothing


def test_served_answers_are_queued_from_the_responses_table(store):
    store.log_response("r1", "m", "chat", [{"role": "user", "content": "hi"}], "hello", "stop", "m:1")
    t = time.time()
    store.log_response("r2", "m", "chat", "hey", "yo", "stop", "m:2")
    store.log_response("r3", "m", "completion", "x", "y", "stop")
    assert store.enqueue_served(model_version="m:2") == 1
    assert store.enqueue_served(since=t) == 1  # r3 (r2 is queued already)
    assert store.enqueue_served() == 1  # r1
    assert store.enqueue_served() == 0
    rows = {r["response_id"]: r for r in _all_items(store, "served")}
    assert rows["r1"]["prompt"] == [{"role": "user", "content": "hi"}] and rows["r1"]["answer"] == "hello"
    # A model that answered nothing is worth a review; one blank answer never blocks the others.
    store.log_response("r4", "m", "completion", "say nothing", "", "length")
    store.log_response("r5", "m", "completion", "say something", "ok", "stop")
    assert store.enqueue_served() == 2
    assert {r["response_id"]: r["answer"] for r in _all_items(store, "served")}["r4"] == ""


def _all_items(store, queue) -> list[dict]:
    eng = store.engine
    with eng.connect() as c:
        return [dict(r._mapping) for r in c.execute(sa.select(ReviewItem.__table__).where(ReviewItem.queue == queue))]


def test_pairs_are_shown_in_a_seeded_random_order_with_sources_hidden_until_submitted(store_url, tmp_path):
    pairs = [{"prompt": f"p{i}", "answer_a": f"base says {i}", "source_a": "base", "answer_b": f"tuned says {i}",
              "source_b": "tuned", "example_id": str(i)} for i in range(40)]
    s = FeedbackStore(store_url)
    assert s.enqueue_pairs("ab", pairs, seed=3) == 40
    assert s.enqueue_pairs("ab", [dict(p, answer_a=p["answer_b"], source_a="tuned", answer_b=p["answer_a"],
                                       source_b="base") for p in pairs], seed=3) == 0  # same pairs, swapped
    shown_a = [r["source_a"] for r in sorted(_all_items(s, "ab"), key=lambda r: r["id"])]
    assert 8 < shown_a.count("base") < 32  # both orders, neither side always first
    other = FeedbackStore(tmp_path / "again.db")
    other.enqueue_pairs("ab", pairs, seed=3)
    assert [r["source_a"] for r in sorted(_all_items(other, "ab"), key=lambda r: r["id"])] == shown_a
    other.close()

    rid = s.reviewer_for_key(s.add_reviewer("ann"))["id"]
    item = s.reserve_next(rid, "ab")
    assert set(item) == {"id", "queue", "kind", "prompt", "answer_a", "answer_b", "reference", "reserved_until"}
    for seen in (item, s.get_item(item["id"]), s.get_item(item["id"], rid)):
        assert "base" not in json.dumps({k: v for k, v in seen.items() if k not in ("answer_a", "answer_b")})
        assert "tuned" not in json.dumps({k: v for k, v in seen.items() if k not in ("answer_a", "answer_b")})
    out = s.submit_review(item["id"], rid, choice="A")
    first = "base" if item["answer_a"].startswith("base") else "tuned"
    assert out["revealed"]["A"] == first and set(out["revealed"].values()) == {"base", "tuned"}
    s.close()


# ------------------------------------------------------------------------------------------ reservations


def test_reservations_hold_resume_expire_and_release(store):
    a = store.reviewer_for_key(store.add_reviewer("ann"))["id"]
    b = store.reviewer_for_key(store.add_reviewer("bob"))["id"]
    store.enqueue_answers("q", _answers(2))
    first = store.reserve_next(a, "q")
    assert first["answer"] == "answer 0" and first["reserved_until"] > time.time() + 800
    assert store.reserve_next(a, "q")["id"] == first["id"]  # a reload finds the item it holds
    second = store.reserve_next(b, "q")
    assert second["id"] != first["id"]
    c = store.reviewer_for_key(store.add_reviewer("cy"))["id"]
    assert store.reserve_next(c, "q") is None  # both held, each wants one review
    store.release(first["id"], a)
    assert store.reserve_next(c, "q")["id"] == first["id"]  # given back: free for others
    store.submit_review(first["id"], c, rating=4)
    assert store.reserve_next(a, "q") is None  # reviewed: nothing for ann (bob holds the other)
    with pytest.raises(NotFoundError, match="reviewer_id 99"):
        store.reserve_next(99)

    # an expired reservation is free again; the reviewer's own work is accepted all the same
    store.enqueue_answers("t", _answers(1, prefix="t"))
    held = store.reserve_next(a, "t", ttl_s=0.2)
    assert store.reserve_next(b, "t") is None
    time.sleep(0.3)
    assert store.get_item(held["id"], a)["reserved_until"] is None
    assert store.reserve_next(b, "t")["id"] == held["id"]
    store.submit_review(held["id"], a, thumb=1)
    assert len(store.reviews(queue="t")) == 1


def test_a_reviewer_skipping_an_item_gets_it_only_after_the_rest(store):
    a = store.reviewer_for_key(store.add_reviewer("ann"))["id"]
    store.enqueue_answers("q", _answers(3))
    one = store.reserve_next(a)
    store.release(one["id"], a)
    order = []
    while (it := store.reserve_next(a)) is not None:
        order.append(it["id"])
        store.submit_review(it["id"], a, rating=3)
    assert order[-1] == one["id"] and len(order) == 3 and len(set(order)) == 3


def test_reviewers_hammering_reserve_next_never_share_an_item_beyond_what_it_wants(store):
    # 30 items; every third wants two reviews. 6 reviewers in threads reserve and review until nothing is left.
    store.enqueue_answers("one", _answers(20, prefix="one"), reviews_wanted=1)
    store.enqueue_answers("two", _answers(10, prefix="two"), reviews_wanted=2)
    wanted = {r["id"]: r["reviews_wanted"] for q in ("one", "two") for r in _all_items(store, q)}
    ids = [store.reviewer_for_key(store.add_reviewer(f"r{i}"))["id"] for i in range(6)]
    got: dict[int, list[int]] = {i: [] for i in wanted}
    lock, errors = threading.Lock(), []
    start = threading.Barrier(len(ids))

    def work(rid: int) -> None:
        try:
            start.wait()
            while (it := store.reserve_next(rid)) is not None:
                with lock:
                    got[it["id"]].append(rid)
                store.submit_review(it["id"], rid, rating=1 + it["id"] % 5)
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(rid,)) for rid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    for item, who in got.items():
        assert len(who) == wanted[item], (item, who)  # given out exactly as often as it wants reviews
        assert len(set(who)) == len(who)  # and never twice to one reviewer
    assert sum(q["done"] for q in store.queues()) == 30
    assert sum(p["reviewed"] for p in store.progress()) == 40


# ------------------------------------------------------------------------------------------ reviews


def test_reviews_are_validated_naming_the_field(store):
    a = store.reviewer_for_key(store.add_reviewer("ann"))["id"]
    store.enqueue_answers("q", _answers(1))
    store.enqueue_pairs("p", [{"prompt": "p", "answer_a": "x", "source_a": "s1", "answer_b": "y", "source_b": "s2",
                               "example_id": "1"}])
    ans, pair = store.reserve_next(a, "q")["id"], store.reserve_next(a, "p")["id"]
    bad = [(ans, {"rating": 0}, "rating"), (ans, {"rating": 6}, "rating"), (ans, {"rating": True}, "rating"),
           (ans, {"thumb": 0}, "thumb"), (ans, {"choice": "A"}, "choice"), (ans, {}, "rating"),
           (ans, {"correction": "  "}, "rating"), (ans, {"criteria": {"tone": "good"}}, "criteria.tone"),
           (pair, {"rating": 4}, "choice"), (pair, {"choice": "C"}, "choice")]
    for item, kw, field in bad:
        with pytest.raises(DataError, match=rf"^{field}"):
            store.submit_review(item, a, **kw)
    with pytest.raises(NotFoundError, match="item_id 999"):
        store.submit_review(999, a, rating=3)
    assert store.reviews() == []
    # a second submission by the same reviewer replaces the first (an edit, or a retry)
    store.submit_review(ans, a, rating=2, criteria={"accurate": False, "tone": 3}, correction="Better.", reason="wrong")
    store.submit_review(ans, a, rating=5, thumb=1)
    (r,) = store.reviews(queue="q")
    assert (r["rating"], r["thumb"], r["correction"], r["criteria"], r["reviewer"]) == (5, 1, None, None, "ann")
    assert store.get_item(ans, a)["review"]["rating"] == 5 and store.get_item(ans, a)["reserved_until"] is None


def _submit_then_die(url: str, rid: int, item_ids: list[int], acked) -> None:
    s = FeedbackStore(url)
    for i, item in enumerate(item_ids):
        s.submit_review(item, rid, rating=1 + i % 5, correction=f"fixed {i}")
        acked.send(item)  # written to the pipe before the next line runs (a Queue's feeder thread might not be)
    os.kill(os.getpid(), signal.SIGKILL)  # no close, no clean shutdown


def test_every_acknowledged_review_survives_a_sigkill(store, store_url):
    rid = store.reviewer_for_key(store.add_reviewer("ann"))["id"]
    store.enqueue_answers("q", _answers(5))
    items = [r["id"] for r in _all_items(store, "q")]
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_submit_then_die, args=(store_url, rid, items, send))
    p.start()
    send.close()
    done = []
    while True:
        try:
            done.append(recv.recv())
        except EOFError:
            break
    p.join(60)
    assert p.exitcode == -signal.SIGKILL and sorted(done) == sorted(items)
    fresh = FeedbackStore(store_url)
    assert sorted(r["item_id"] for r in fresh.reviews()) == sorted(done)
    fresh.close()


def test_progress_and_queues_count_per_reviewer_and_queue(store):
    a = store.reviewer_for_key(store.add_reviewer("ann"))["id"]
    b = store.reviewer_for_key(store.add_reviewer("bob"))["id"]
    store.enqueue_answers("q", _answers(3), reviews_wanted=2)
    for rid in (a, b):
        it = store.reserve_next(rid, "q")
        store.submit_review(it["id"], rid, rating=4)
    store.reserve_next(a, "q")
    prog = {p["reviewer"]: p for p in store.progress()}
    assert (prog["ann"]["reviewed"], prog["ann"]["reserved"], prog["ann"]["queues"]) == (1, 1, {"q": 1})
    assert (prog["bob"]["reviewed"], prog["bob"]["reserved"]) == (1, 0)
    assert store.queues() == [{"queue": "q", "kind": "answer", "items": 3, "done": 1, "reviews": 2,
                               "reviews_wanted": 2}]


# ------------------------------------------------------------------------------------------ agreement


def test_krippendorff_alpha_matches_the_published_worked_example():
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability": 4 observers, 12 units, with gaps
    n = None
    rows = [[1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n], [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3],
            [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n], [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n]]
    units = [[v for v in col if v is not None] for col in zip(*rows)]
    assert round(krippendorff_alpha(units, "nominal"), 3) == 0.743
    assert round(krippendorff_alpha(units, "ordinal"), 3) == 0.815
    assert round(krippendorff_alpha(units, "interval"), 3) == 0.849
    assert krippendorff_alpha([[1, 1], [2, 2], [3, 3]], "ordinal") == 1.0
    assert krippendorff_alpha([[1, 1], [1, 1]], "nominal") is None  # no variation: undefined


def test_agreement_on_items_reviewed_twice(store):
    a = store.reviewer_for_key(store.add_reviewer("ann"))["id"]
    b = store.reviewer_for_key(store.add_reviewer("bob"))["id"]
    store.enqueue_answers("q", _answers(8), reviews_wanted=2)
    store.enqueue_answers("q", _answers(2, source="once"), reviews_wanted=1)  # reviewed once: left out
    ra, rb = [5, 4, 4, 2, 1, 3, 5, 2], [5, 4, 3, 2, 2, 3, 4, 1]
    thumbs_a, thumbs_b = [1, 1, 1, -1, -1, 1, 1, -1], [1, 1, -1, -1, -1, 1, 1, 1]
    items = sorted(r["id"] for r in _all_items(store, "q"))
    for i, item in enumerate(items[:8]):
        store.submit_review(item, a, rating=ra[i], thumb=thumbs_a[i], criteria={"tone": i % 2 == 0})
        store.submit_review(item, b, rating=rb[i], thumb=thumbs_b[i], criteria={"tone": i % 2 == 0})
    for item in items[8:]:
        store.submit_review(item, a, rating=1)
    ag = store.agreement("q")
    assert ag["items"] == 8 and ag["rating"]["items"] == 8
    assert ag["rating"]["cohen_kappa"] == pytest.approx(cohen_kappa_score(ra, rb, weights="quadratic"))
    assert ag["rating"]["krippendorff_alpha"] == pytest.approx(krippendorff_alpha(list(zip(ra, rb)), "ordinal"))
    assert ag["thumb"]["cohen_kappa"] == pytest.approx(cohen_kappa_score(thumbs_a, thumbs_b))
    assert ag["thumb"]["agree"] == pytest.approx(6 / 8)
    assert ag["criteria"]["tone"]["krippendorff_alpha"] == 1.0 and ag["choice"]["items"] == 0

    store.enqueue_pairs("ab", [{"prompt": f"p{i}", "answer_a": f"x{i}", "source_a": "s1", "answer_b": f"y{i}",
                                "source_b": "s2", "example_id": str(i)} for i in range(4)], reviews_wanted=2)
    for rid in (a, b):
        while (it := store.reserve_next(rid, "ab")) is not None:
            store.submit_review(it["id"], rid, choice="A" if it["id"] % 2 else "B")
    ch = store.agreement("ab")["choice"]
    assert ch["items"] == 4 and ch["agree"] == 1.0 and ch["cohen_kappa"] == 1.0
