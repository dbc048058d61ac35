"""The feedback store's tables as SQLAlchemy models (what the store's queries read and write).

The database itself is made and changed only by the migrations in `migrations/versions/` (Alembic); a
change here needs a new migration there, and tests/test_feedback_store.py checks the two agree.
"""

from __future__ import annotations

from sqlalchemy import JSON, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Response(Base):
    __tablename__ = "responses"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created: Mapped[float] = mapped_column(Float)
    model: Mapped[str] = mapped_column(String(128), index=True)
    endpoint: Mapped[str] = mapped_column(String(32))
    prompt: Mapped[object] = mapped_column(JSON)  # chat messages (list) or a completion prompt (str)
    output: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str] = mapped_column(String(32))
    # `NAME:VERSION` of a registered version, else the run folder's name; NULL in rows logged before it existed.
    model_version: Mapped[str | None] = mapped_column(String(160), nullable=True)


class Feedback(Base):
    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    response_id: Mapped[str] = mapped_column(ForeignKey("responses.id"), index=True)
    created: Mapped[float] = mapped_column(Float)
    rating: Mapped[int | None] = mapped_column(Integer, nullable=True)
    correction: Mapped[str | None] = mapped_column(Text, nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    user: Mapped[str | None] = mapped_column(String(128), nullable=True)


class Reviewer(Base):
    __tablename__ = "reviewers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    # sha256 of the key: keys are 32 random bytes, so a fast hash is enough (no password to brute-force)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created: Mapped[float] = mapped_column(Float)


class ReviewItem(Base):
    """One thing to review: an answer (`kind="answer"`) or a blind pair (`kind="pair"`, shown as A / B)."""

    __tablename__ = "review_items"
    __table_args__ = (UniqueConstraint("queue", "dedup_key", name="uq_review_items_queue_dedup"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    queue: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    prompt: Mapped[object] = mapped_column(JSON)  # chat messages (list) or a prompt (str)
    answer: Mapped[str | None] = mapped_column(Text, nullable=True)
    source: Mapped[str | None] = mapped_column(String(256), nullable=True)  # version / run / "served"
    # a pair in the order it is shown; the sources are the hidden names, revealed after a review
    answer_a: Mapped[str | None] = mapped_column(Text, nullable=True)
    source_a: Mapped[str | None] = mapped_column(String(256), nullable=True)
    answer_b: Mapped[str | None] = mapped_column(Text, nullable=True)
    source_b: Mapped[str | None] = mapped_column(String(256), nullable=True)
    response_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    example_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    reference: Mapped[str | None] = mapped_column(Text, nullable=True)
    reviews_wanted: Mapped[int] = mapped_column(Integer, default=1)
    # what makes an item "the same" for idempotent enqueueing: source(s) and example or response id
    dedup_key: Mapped[str] = mapped_column(String(600))
    created: Mapped[float] = mapped_column(Float)


class Reservation(Base):
    """An item held by one reviewer until `until` (epoch seconds). A released one keeps its row with
    `until = RELEASED` so the reviewer who skipped it gets it only after everything else."""

    __tablename__ = "reservations"
    __table_args__ = (UniqueConstraint("item_id", "reviewer_id", name="uq_reservations_item_reviewer"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("review_items.id"), index=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("reviewers.id"), index=True)
    until: Mapped[float] = mapped_column(Float)


class Review(Base):
    __tablename__ = "reviews"
    __table_args__ = (UniqueConstraint("item_id", "reviewer_id", name="uq_reviews_item_reviewer"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("review_items.id"), index=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("reviewers.id"), index=True)
    created: Mapped[float] = mapped_column(Float, index=True)
    rating: Mapped[int | None] = mapped_column(Integer, nullable=True)  # 1..5
    criteria: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # rubric name -> mark (int or bool)
    thumb: Mapped[int | None] = mapped_column(Integer, nullable=True)  # -1 / +1
    correction: Mapped[str | None] = mapped_column(Text, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    choice: Mapped[str | None] = mapped_column(String(8), nullable=True)  # pairs: "A" | "B" | "equal" as shown


RELEASED = -1.0  # Reservation.until of an item its reviewer gave back
