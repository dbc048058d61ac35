"""The feedback store (served answers, feedback, reviews) and what becomes of it (agreement, export)."""

from .store import FeedbackStore

__all__ = ["FeedbackStore"]
