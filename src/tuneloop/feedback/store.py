"""The feedback store: served responses and what people said about them, in `<workspace>/feedback.db`.

SQLite through SQLAlchemy by default; any SQLAlchemy URL (PostgreSQL for teams) works the same way.
Every served completion is logged with its prompt and the model version that produced it, so a rating
or a corrected answer tied to its response id can later become an SFT correction or a preference pair,
and feedback is tied to a version. Every classified text is logged too (endpoint `classify`, the predicted
label as its output): the live inputs `tuneloop drift` compares with the training data.

Reviews: reviewers sign in with a key (only its hash is stored); review items are answers or blind pairs in
named queues; an item is reserved by one reviewer at a time (or by as many as it wants reviews), and every
review is committed before `submit_review` returns. The schema is versioned (Alembic, `migrations/`) and
opening a store migrates it forward.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import and_, create_engine, event, exists, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..errors import DataError, NotFoundError
from .agreement import agreement_on
from .schema import RELEASED, Feedback, Reservation, Response, Review, ReviewItem, Reviewer

MIGRATIONS = Path(__file__).parent / "migrations"
# pg_advisory_xact_lock key: processes opening one PostgreSQL store at once migrate it one after the other
_PG_MIGRATE_LOCK = 0x7475_6E65  # "tune"
KINDS = ("answer", "pair")
CHOICES = ("A", "B", "equal")


def _engine(url: str):
    if url.startswith(("postgresql://", "postgres://")):
        # the driver the project installs (psycopg 3); SQLAlchemy's bare default would be psycopg2
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    # SQLite commits are durable (journal + fsync); the server writes from a thread pool.
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    # Every transaction takes the write lock up front (BEGIN IMMEDIATE): a reservation reads then writes,
    # and two deferred transactions upgrading their read locks at once would fail with "database is locked"
    # instead of waiting their turn. The driver's own implicit BEGIN is turned off so this one is used.
    @event.listens_for(engine, "connect")
    def _no_driver_begin(dbapi_conn, _record):
        dbapi_conn.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def migrate(engine) -> None:
    """Bring the store's schema to the newest revision, in one transaction that holds the database's write
    lock (SQLite) or an advisory lock (PostgreSQL), so two processes opening one store at once migrate it
    once, one after the other. A store made before the schema was versioned is brought up by revision 0001."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATE_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class FeedbackStore:
    def __init__(self, url_or_path: str | Path):
        url = str(url_or_path)
        if "://" not in url:
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{Path(url).resolve()}"
        self.engine = _engine(url)
        migrate(self.engine)

    @classmethod
    def for_workspace(cls, workspace: Path) -> "FeedbackStore":
        return cls(Path(workspace) / "feedback.db")

    def log_response(self, id: str, model: str, endpoint: str, prompt, output: str, finish_reason: str,
                     model_version: str | None = None) -> None:
        with Session(self.engine) as s, s.begin():
            s.add(Response(id=id, created=time.time(), model=model, endpoint=endpoint, prompt=prompt,
                           output=output, finish_reason=finish_reason, model_version=model_version))

    def log_responses(self, rows: list[dict]) -> None:
        """Many responses in one transaction (a classify batch): each row has `log_response`'s fields and
        `created`."""
        with Session(self.engine) as s, s.begin():
            s.add_all(Response(**row) for row in rows)

    def responses(self, since: float | None = None, model_version: str | None = None,
                  endpoint: str | None = None) -> list[dict]:
        """Logged responses, oldest first: newer than `since` (a time.time()), of one version, of one
        endpoint (`chat`, `completion`, `classify`) when given."""
        with Session(self.engine) as s:
            q = select(Response).order_by(Response.created, Response.id)
            if since is not None:
                q = q.where(Response.created >= since)
            if model_version is not None:
                q = q.where(Response.model_version == model_version)
            if endpoint is not None:
                q = q.where(Response.endpoint == endpoint)
            return [_response_dict(r) for r in s.scalars(q)]

    def add_feedback(self, response_id: str, rating: int | None = None, correction: str | None = None,
                     comment: str | None = None, user: str | None = None) -> int:
        with Session(self.engine) as s, s.begin():
            if s.get(Response, response_id) is None:
                raise NotFoundError(f"response_id {response_id!r}: no such response in the feedback store")
            fb = Feedback(response_id=response_id, created=time.time(), rating=rating, correction=correction,
                          comment=comment, user=user)
            s.add(fb)
            s.flush()
            return fb.id

    def feedback(self, response_id: str | None = None) -> list[dict]:
        """Feedback rows joined with their responses, oldest first."""
        with Session(self.engine) as s:
            q = select(Feedback, Response).join(Response, Feedback.response_id == Response.id).order_by(Feedback.id)
            if response_id is not None:
                q = q.where(Feedback.response_id == response_id)
            return [
                {"id": f.id, "response_id": r.id, "model": r.model, "model_version": r.model_version,
                 "endpoint": r.endpoint, "prompt": r.prompt,
                 "output": r.output, "rating": f.rating, "correction": f.correction, "comment": f.comment,
                 "user": f.user, "created": f.created}
                for f, r in s.execute(q).all()
            ]

    def get_response(self, response_id: str) -> dict | None:
        with Session(self.engine) as s:
            r = s.get(Response, response_id)
            return None if r is None else _response_dict(r)

    # ------------------------------------------------------------------------------------------ reviewers

    def add_reviewer(self, name: str) -> str:
        """A new reviewer; returns their secret key, the only time it exists in clear (its hash is kept)."""
        if not isinstance(name, str) or not name.strip():
            raise DataError("name: a reviewer needs a non-empty name")
        key = "tlr_" + secrets.token_urlsafe(32)
        try:
            with Session(self.engine) as s, s.begin():
                s.add(Reviewer(name=name.strip(), key_hash=_hash_key(key), created=time.time()))
        except IntegrityError:
            raise DataError(f"name: a reviewer named {name.strip()!r} already exists") from None
        return key

    def reviewer_for_key(self, key: str) -> dict | None:
        if not key:
            return None
        with Session(self.engine) as s:
            r = s.scalars(select(Reviewer).where(Reviewer.key_hash == _hash_key(key))).first()
            return None if r is None else {"id": r.id, "name": r.name}

    def reviewers(self) -> list[dict]:
        with Session(self.engine) as s:
            return [{"id": r.id, "name": r.name, "created": r.created}
                    for r in s.scalars(select(Reviewer).order_by(Reviewer.id))]

    # ------------------------------------------------------------------------------------------ queues

    def enqueue_answers(self, queue: str, items: list[dict], reviews_wanted: int = 1) -> int:
        """Queue answers to review. The same (queue, source, example_id or response_id) is queued once;
        returns how many were new."""
        _check_queue(queue, reviews_wanted)
        rows = []
        for i, it in enumerate(items):
            where = f"items[{i}]"
            prompt = _prompt(it.get("prompt"), f"{where}.prompt")
            answer = _answer(it.get("answer"), f"{where}.answer")
            source = _text(it.get("source", "served"), f"{where}.source")
            ident = it.get("example_id") or it.get("response_id") or _content_id(prompt, answer)
            rows.append({"kind": "answer", "prompt": prompt, "answer": answer, "source": source,
                         "response_id": it.get("response_id"), "example_id": _opt_id(it.get("example_id")),
                         "reference": it.get("reference"), "dedup_key": f"{source}\x1f{ident}"})
        return self._enqueue(queue, "answer", rows, reviews_wanted)

    def enqueue_pairs(self, queue: str, items: list[dict], seed: int = 0, reviews_wanted: int = 1) -> int:
        """Queue blind pairs. Which answer is shown as A is drawn per item from (seed, queue, the pair) at
        enqueue and stored; the sources stay in the store until a review of the item is submitted."""
        _check_queue(queue, reviews_wanted)
        rows = []
        for i, it in enumerate(items):
            where = f"items[{i}]"
            prompt = _prompt(it.get("prompt"), f"{where}.prompt")
            sides = [(_answer(it.get(f"answer_{x}"), f"{where}.answer_{x}"), _text(it.get(f"source_{x}"), f"{where}.source_{x}"))
                     for x in "ab"]
            ident = it.get("example_id") or _content_id(prompt, sorted(a for a, _ in sides))
            dedup = "\x1f".join(sorted(src for _, src in sides)) + f"\x1f{ident}"
            if random.Random(f"{seed}\x1f{queue}\x1f{dedup}").random() < 0.5:
                sides.reverse()
            (a, sa), (b, sb) = sides
            rows.append({"kind": "pair", "prompt": prompt, "answer_a": a, "source_a": sa, "answer_b": b,
                         "source_b": sb, "example_id": _opt_id(it.get("example_id")),
                         "reference": it.get("reference"), "dedup_key": dedup})
        return self._enqueue(queue, "pair", rows, reviews_wanted)

    def enqueue_served(self, queue: str = "served", since: float | None = None, model_version: str | None = None,
                       reviews_wanted: int = 1) -> int:
        """Queue the answers this store logged while serving (newer than `since`, of one version if given).
        Generated answers only: a predicted label (endpoint `classify`) is not text for a reviewer to rate."""
        with Session(self.engine) as s:
            q = select(Response).where(Response.endpoint != "classify").order_by(Response.created)
            if since is not None:
                q = q.where(Response.created >= since)
            if model_version is not None:
                q = q.where(Response.model_version == model_version)
            items = [{"prompt": r.prompt, "answer": r.output, "source": r.model_version or r.model,
                      "response_id": r.id} for r in s.scalars(q)]
        return self.enqueue_answers(queue, items, reviews_wanted) if items else 0

    def _enqueue(self, queue: str, kind: str, rows: list[dict], reviews_wanted: int) -> int:
        now = time.time()
        with Session(self.engine) as s, s.begin():
            have = s.scalars(select(ReviewItem.kind).where(ReviewItem.queue == queue).limit(1)).first()
            if have is not None and have != kind:
                raise DataError(f"queue {queue!r} holds {have}s; {kind}s go to a queue of their own")
            dialect = s.get_bind().dialect.name
            new = 0
            for row in rows:
                values = {"queue": queue, "reviews_wanted": reviews_wanted, "created": now, **row}
                if dialect in ("sqlite", "postgresql"):
                    # ON CONFLICT DO NOTHING: another process queueing the same item at once is not an error
                    if dialect == "sqlite":
                        from sqlalchemy.dialects.sqlite import insert
                    else:
                        from sqlalchemy.dialects.postgresql import insert
                    stmt = insert(ReviewItem).values(**values).on_conflict_do_nothing(
                        index_elements=["queue", "dedup_key"]).returning(ReviewItem.id)
                    new += len(s.execute(stmt).all())
                elif s.scalars(select(ReviewItem.id).where(ReviewItem.queue == queue,
                                                           ReviewItem.dedup_key == row["dedup_key"])).first() is None:
                    s.add(ReviewItem(**values))
                    s.flush()
                    new += 1
            return new

    def queues(self) -> list[dict]:
        """Each queue: its kind, how many items, how many have all the reviews they want, reviews wanted."""
        with Session(self.engine) as s:
            counts = (select(ReviewItem.queue, ReviewItem.kind, ReviewItem.reviews_wanted, func.count(Review.id))
                      .outerjoin(Review, Review.item_id == ReviewItem.id).group_by(ReviewItem.id)
                      .order_by(ReviewItem.queue))
            out: dict[str, dict] = {}
            for queue, kind, wanted, n in s.execute(counts):
                q = out.setdefault(queue, {"queue": queue, "kind": kind, "items": 0, "done": 0, "reviews": 0,
                                           "reviews_wanted": wanted})
                q["items"] += 1
                q["done"] += n >= wanted
                q["reviews"] += n
                q["reviews_wanted"] = max(q["reviews_wanted"], wanted)
            return list(out.values())

    # ------------------------------------------------------------------------------------------ reservations

    def reserve_next(self, reviewer_id: int, queue: str | None = None, ttl_s: float = 900) -> dict | None:
        """The next item for this reviewer, held for `ttl_s` seconds: the one they already hold if any, else
        the oldest they have not reviewed whose reviews plus live reservations are fewer than it wants (items
        they gave back come last). One transaction under the write lock (SQLite) or with the item's row
        locked (PostgreSQL, SKIP LOCKED), so two reviewers never get the one item beyond what it wants."""
        now = time.time()
        with Session(self.engine) as s, s.begin():
            self._reviewer(s, reviewer_id)
            held = (select(ReviewItem, Reservation).join(Reservation, Reservation.item_id == ReviewItem.id)
                    .where(Reservation.reviewer_id == reviewer_id, Reservation.until > now))
            if queue is not None:
                held = held.where(ReviewItem.queue == queue)
            row = s.execute(held.order_by(ReviewItem.id).limit(1)).first()
            if row is not None:
                row[1].until = now + ttl_s
                return _item_dict(row[0], row[1].until)
            skipped: list[int] = []
            while True:
                item = s.scalars(self._candidates(s, reviewer_id, queue, now, skipped)).first()
                if item is None:
                    return None
                # counted again now that the row is ours: the candidate query's snapshot may predate a
                # reservation another reviewer committed just before we locked it
                if _taken(s, item.id, now) < item.reviews_wanted:
                    break
                skipped.append(item.id)
            res = s.scalars(select(Reservation).where(Reservation.item_id == item.id,
                                                      Reservation.reviewer_id == reviewer_id)).first()
            if res is None:
                s.add(Reservation(item_id=item.id, reviewer_id=reviewer_id, until=now + ttl_s))
            else:
                res.until = now + ttl_s
            return _item_dict(item, now + ttl_s)

    def _candidates(self, s: Session, reviewer_id: int, queue: str | None, now: float, skipped: list[int]):
        mine = and_(Reservation.item_id == ReviewItem.id, Reservation.reviewer_id == reviewer_id)
        reviewed = exists().where(Review.item_id == ReviewItem.id, Review.reviewer_id == reviewer_id)
        taken = (select(func.count(Review.id)).where(Review.item_id == ReviewItem.id).scalar_subquery()
                 + select(func.count(Reservation.id)).where(Reservation.item_id == ReviewItem.id,
                                                            Reservation.until > now).scalar_subquery())
        q = select(ReviewItem).where(~reviewed, taken < ReviewItem.reviews_wanted)
        if queue is not None:
            q = q.where(ReviewItem.queue == queue)
        if skipped:
            q = q.where(ReviewItem.id.not_in(skipped))
        released_by_me = exists().where(mine, Reservation.until == RELEASED)
        q = q.order_by(released_by_me, ReviewItem.id).limit(1)
        if s.get_bind().dialect.name == "postgresql":
            q = q.with_for_update(of=ReviewItem, skip_locked=True)
        return q

    def get_item(self, item_id: int, reviewer_id: int | None = None) -> dict | None:
        """The item as a reviewer sees it (a pair without its sources); with `reviewer_id`, when their
        reservation runs out and their review of it, if they made one."""
        with Session(self.engine) as s:
            item = s.get(ReviewItem, item_id)
            if item is None:
                return None
            until, review = None, None
            if reviewer_id is not None:
                res = s.scalars(select(Reservation).where(Reservation.item_id == item_id,
                                                          Reservation.reviewer_id == reviewer_id,
                                                          Reservation.until > time.time())).first()
                until = res.until if res is not None else None
                rv = s.scalars(select(Review).where(Review.item_id == item_id,
                                                    Review.reviewer_id == reviewer_id)).first()
                review = _review_dict(rv, item) if rv is not None else None
            out = _item_dict(item, until)
            if review is not None:
                out["review"] = review
            return out

    def release(self, item_id: int, reviewer_id: int) -> None:
        """Give an item back: free for others now, and last in line for this reviewer."""
        with Session(self.engine) as s, s.begin():
            res = s.scalars(select(Reservation).where(Reservation.item_id == item_id,
                                                      Reservation.reviewer_id == reviewer_id)).first()
            if res is not None:
                res.until = RELEASED

    # ------------------------------------------------------------------------------------------ reviews

    def submit_review(self, item_id: int, reviewer_id: int, *, rating: int | None = None,
                      criteria: dict[str, int | bool] | None = None, thumb: int | None = None,
                      correction: str | None = None, reason: str | None = None, choice: str | None = None) -> dict:
        """Store one reviewer's review of one item, committed before it returns (a second submission by the
        same reviewer replaces their first: an edit, or a retry whose answer was lost). Accepted even when
        the reservation ran out: a reviewer's work is never thrown away. Pairs: the sources are revealed."""
        fields = _check_review(rating, criteria, thumb, correction, reason, choice)
        with Session(self.engine) as s, s.begin():
            self._reviewer(s, reviewer_id)
            q = select(ReviewItem).where(ReviewItem.id == item_id)
            if s.get_bind().dialect.name == "postgresql":
                q = q.with_for_update()  # reservations of this item are counted under its row lock
            item = s.scalars(q).first()
            if item is None:
                raise NotFoundError(f"item_id {item_id}: no such review item")
            if item.kind == "pair" and fields["choice"] is None:
                raise DataError(f"choice: required on a pair (one of {', '.join(CHOICES)})")
            if item.kind == "answer" and fields["choice"] is not None:
                raise DataError("choice: only pairs take a choice (this item is one answer)")
            if item.kind == "answer" and all(fields[k] is None for k in ("rating", "criteria", "thumb",
                                                                          "correction", "reason")):
                raise DataError("rating: give a rating, criteria, a thumb, a correction or a reason")
            rv = s.scalars(select(Review).where(Review.item_id == item_id, Review.reviewer_id == reviewer_id)).first()
            if rv is None:
                rv = Review(item_id=item_id, reviewer_id=reviewer_id, created=time.time(), **fields)
                s.add(rv)
            else:
                for k, v in fields.items():
                    setattr(rv, k, v)
                rv.created = time.time()
            s.execute(Reservation.__table__.delete().where(Reservation.item_id == item_id,
                                                           Reservation.reviewer_id == reviewer_id))
            s.flush()
            out = _review_dict(rv, item)
        return out

    def reviews(self, since: float | None = None, queue: str | None = None) -> list[dict]:
        """Every review joined with its item (sources included) and its reviewer's name, oldest first."""
        with Session(self.engine) as s:
            q = (select(Review, ReviewItem, Reviewer.name).join(ReviewItem, Review.item_id == ReviewItem.id)
                 .join(Reviewer, Review.reviewer_id == Reviewer.id).order_by(Review.id))
            if since is not None:
                q = q.where(Review.created >= since)
            if queue is not None:
                q = q.where(ReviewItem.queue == queue)
            out = []
            for rv, item, name in s.execute(q):
                d = _review_dict(rv, item)
                d.pop("revealed", None)
                d.update({"reviewer": name, "queue": item.queue, "kind": item.kind, "prompt": item.prompt,
                          "answer": item.answer, "source": item.source, "answer_a": item.answer_a,
                          "source_a": item.source_a, "answer_b": item.answer_b, "source_b": item.source_b,
                          "response_id": item.response_id, "example_id": item.example_id,
                          "reference": item.reference})
                out.append(d)
            return out

    def progress(self) -> list[dict]:
        """Per reviewer: reviews made, items held now, reviews per queue."""
        now = time.time()
        with Session(self.engine) as s:
            out = {r.id: {"reviewer": r.name, "reviewer_id": r.id, "reviewed": 0, "reserved": 0, "queues": {}}
                   for r in s.scalars(select(Reviewer).order_by(Reviewer.id))}
            per_queue = (select(Review.reviewer_id, ReviewItem.queue, func.count(Review.id))
                         .join(ReviewItem, Review.item_id == ReviewItem.id)
                         .group_by(Review.reviewer_id, ReviewItem.queue))
            for rid, queue, n in s.execute(per_queue):
                out[rid]["queues"][queue] = n
                out[rid]["reviewed"] += n
            held = (select(Reservation.reviewer_id, func.count(Reservation.id)).where(Reservation.until > now)
                    .group_by(Reservation.reviewer_id))
            for rid, n in s.execute(held):
                out[rid]["reserved"] = n
            return list(out.values())

    def agreement(self, queue: str | None = None) -> dict:
        """Agreement on the items reviewed by two or more: ratings (ordinal: weighted kappa, ordinal alpha),
        thumbs and pair choices (nominal), and each rubric criterion (bool nominal, numbers ordinal)."""
        by_item: dict[int, list[dict]] = {}
        for r in self.reviews(queue=queue):
            by_item.setdefault(r["item_id"], []).append(r)
        multi = [sorted(rs, key=lambda r: r["id"]) for rs in by_item.values() if len(rs) >= 2]

        def units(get) -> list[list]:
            return [[v for v in map(get, rs) if v is not None] for rs in multi]

        names = sorted({k for rs in multi for r in rs for k in (r["criteria"] or {})})
        crit = {}
        for name in names:
            u = units(lambda r, n=name: (r["criteria"] or {}).get(n))
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for vs in u for v in vs)
            crit[name] = agreement_on(u, "ordinal" if numeric else "nominal")
        return {"items": len(multi), "rating": agreement_on(units(lambda r: r["rating"]), "ordinal"),
                "thumb": agreement_on(units(lambda r: r["thumb"]), "nominal"),
                "choice": agreement_on(units(lambda r: r["choice"]), "nominal"), "criteria": crit}

    def _reviewer(self, s: Session, reviewer_id: int) -> Reviewer:
        r = s.get(Reviewer, reviewer_id)
        if r is None:
            raise NotFoundError(f"reviewer_id {reviewer_id}: no such reviewer")
        return r

    def close(self) -> None:
        self.engine.dispose()


# ----------------------------------------------------------------------------------------------------
# plain helpers: validation and the dicts the store hands out


def _taken(s: Session, item_id: int, now: float) -> int:
    reviews = s.scalar(select(func.count(Review.id)).where(Review.item_id == item_id))
    held = s.scalar(select(func.count(Reservation.id)).where(Reservation.item_id == item_id, Reservation.until > now))
    return reviews + held


def _response_dict(r: Response) -> dict:
    return {"id": r.id, "model": r.model, "model_version": r.model_version, "endpoint": r.endpoint,
            "prompt": r.prompt, "output": r.output, "finish_reason": r.finish_reason, "created": r.created}


def _item_dict(item: ReviewItem, reserved_until: float | None) -> dict:
    out = {"id": item.id, "queue": item.queue, "kind": item.kind, "prompt": item.prompt}
    if item.kind == "pair":
        out.update(answer_a=item.answer_a, answer_b=item.answer_b)
    else:
        out["answer"] = item.answer
    out.update(reference=item.reference, reserved_until=reserved_until)
    return out


def _review_dict(rv: Review, item: ReviewItem) -> dict:
    out = {"id": rv.id, "item_id": rv.item_id, "reviewer_id": rv.reviewer_id, "created": rv.created,
           "rating": rv.rating, "criteria": rv.criteria, "thumb": rv.thumb, "correction": rv.correction,
           "reason": rv.reason, "choice": rv.choice}
    if item.kind == "pair":
        out["revealed"] = {"A": item.source_a, "B": item.source_b}
    return out


def _check_queue(queue: str, reviews_wanted: int) -> None:
    if not isinstance(queue, str) or not queue.strip():
        raise DataError("queue: a queue needs a non-empty name")
    if isinstance(reviews_wanted, bool) or not isinstance(reviews_wanted, int) or reviews_wanted < 1:
        raise DataError(f"reviews_wanted: {reviews_wanted!r}: a whole number of at least 1")


def _text(v, where: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise DataError(f"{where}: expected non-empty text, got {v!r:.60}")
    return v


def _answer(v, where: str) -> str:
    # A blank answer is text too: a model that answered nothing is exactly what a reviewer should see.
    if not isinstance(v, str):
        raise DataError(f"{where}: expected text, got {v!r:.60}")
    return v


def _opt_id(v) -> str | None:
    return None if v is None else str(v)


def _prompt(v, where: str):
    if isinstance(v, str) and v.strip():
        return v
    if isinstance(v, list) and v and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                         and isinstance(m.get("content"), str) for m in v):
        return [{"role": m["role"], "content": m["content"]} for m in v]
    raise DataError(f"{where}: expected text or chat messages [{{'role', 'content'}}, ...], got {v!r:.60}")


def _content_id(prompt, answer) -> str:
    return hashlib.sha256(json.dumps([prompt, answer], sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _check_review(rating, criteria, thumb, correction, reason, choice) -> dict:
    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if rating is not None and not (whole(rating) and 1 <= rating <= 5):
        raise DataError(f"rating: {rating!r}: a whole number from 1 to 5")
    if thumb is not None and not (whole(thumb) and thumb in (-1, 1)):
        raise DataError(f"thumb: {thumb!r}: -1 (down) or 1 (up)")
    if choice is not None and choice not in CHOICES:
        raise DataError(f"choice: {choice!r}: one of {', '.join(CHOICES)}")
    if criteria is not None:
        if not isinstance(criteria, dict):
            raise DataError(f"criteria: expected an object of name -> mark, got {criteria!r:.60}")
        for k, v in criteria.items():
            if not isinstance(k, str) or not k or not isinstance(v, (bool, int)):
                raise DataError(f"criteria.{k}: {v!r}: a mark is a whole number or true/false")
        criteria = dict(criteria) or None
    texts = {}
    for name, v in (("correction", correction), ("reason", reason)):
        if v is not None and not isinstance(v, str):
            raise DataError(f"{name}: expected text, got {v!r:.60}")
        texts[name] = v if v is not None and v.strip() else None
    return {"rating": rating, "criteria": criteria, "thumb": thumb, "choice": choice, **texts}
