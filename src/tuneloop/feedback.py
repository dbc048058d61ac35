"""The feedback store: served responses and what people said about them, in `<workspace>/feedback.db`.

SQLite through SQLAlchemy by default; any SQLAlchemy URL (PostgreSQL for teams) works the same way.
Every served completion is logged with its prompt and the model version that produced it, so a rating
or a corrected answer tied to its response id can later become an SFT correction or a preference pair,
and feedback is tied to a version.
"""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import JSON, Float, ForeignKey, Integer, String, Text, create_engine, inspect, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .errors import NotFoundError


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


class FeedbackStore:
    def __init__(self, url_or_path: str | Path):
        url = str(url_or_path)
        if "://" not in url:
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{Path(url).resolve()}"
        # SQLite commits are durable (journal + fsync); the server writes from a thread pool.
        kw = {"connect_args": {"check_same_thread": False, "timeout": 30}} if url.startswith("sqlite") else {}
        self.engine = create_engine(url, **kw)
        Base.metadata.create_all(self.engine)
        _add_missing_columns(self.engine)

    @classmethod
    def for_workspace(cls, workspace: Path) -> "FeedbackStore":
        return cls(Path(workspace) / "feedback.db")

    def log_response(self, id: str, model: str, endpoint: str, prompt, output: str, finish_reason: str,
                     model_version: str | None = None) -> None:
        with Session(self.engine) as s, s.begin():
            s.add(Response(id=id, created=time.time(), model=model, endpoint=endpoint, prompt=prompt,
                           output=output, finish_reason=finish_reason, model_version=model_version))

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
            if r is None:
                return None
            return {"id": r.id, "model": r.model, "model_version": r.model_version, "endpoint": r.endpoint,
                    "prompt": r.prompt, "output": r.output, "finish_reason": r.finish_reason, "created": r.created}

    def close(self) -> None:
        self.engine.dispose()




def _add_missing_columns(engine) -> None:
    """Bring a feedback.db made by an older tuneloop up to this schema in place.

    `create_all` makes missing tables but never touches existing ones, so a `responses` table from before
    `model_version` existed would make every insert fail. Such a column is added (nullable: the old rows
    keep NULL, their version unknown) instead of asking people to migrate or lose their feedback.
    """
    have = {c["name"] for c in inspect(engine).get_columns(Response.__tablename__)}
    for col in Response.__table__.columns:
        if col.name not in have and col.nullable:
            kind = col.type.compile(dialect=engine.dialect)
            try:
                with engine.begin() as conn:
                    conn.execute(text(f"ALTER TABLE {Response.__tablename__} ADD COLUMN {col.name} {kind}"))
            except DBAPIError:
                # Another process opening the same store added it first; anything else is a real error.
                if col.name not in {c["name"] for c in inspect(engine).get_columns(Response.__tablename__)}:
                    raise
