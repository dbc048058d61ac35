"""The feedback store (served answers, feedback, reviews) and what becomes of it (agreement, export).

`from tuneloop.feedback import FeedbackStore` loads the store (SQLAlchemy, Alembic) on first use only, so
the CLI, which registers `tuneloop feedback ...` from this package, starts without them.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import FeedbackStore

__all__ = ["FeedbackStore"]


def __getattr__(name: str):
    if name == "FeedbackStore":
        from .store import FeedbackStore

        return FeedbackStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
