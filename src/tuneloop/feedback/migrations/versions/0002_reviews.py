"""review tables: reviewers (hashed keys), review items (answers and blind pairs), reservations, reviews.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reviewers",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created", sa.Float, nullable=False),
    )
    op.create_table(
        "review_items",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("queue", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("prompt", sa.JSON, nullable=False),
        sa.Column("answer", sa.Text, nullable=True),
        sa.Column("source", sa.String(256), nullable=True),
        sa.Column("answer_a", sa.Text, nullable=True),
        sa.Column("source_a", sa.String(256), nullable=True),
        sa.Column("answer_b", sa.Text, nullable=True),
        sa.Column("source_b", sa.String(256), nullable=True),
        sa.Column("response_id", sa.String(64), nullable=True),
        sa.Column("example_id", sa.String(256), nullable=True),
        sa.Column("reference", sa.Text, nullable=True),
        sa.Column("reviews_wanted", sa.Integer, nullable=False),
        sa.Column("dedup_key", sa.String(600), nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.UniqueConstraint("queue", "dedup_key", name="uq_review_items_queue_dedup"),
    )
    op.create_index("ix_review_items_queue", "review_items", ["queue"])
    op.create_index("ix_review_items_response_id", "review_items", ["response_id"])
    op.create_table(
        "reservations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("item_id", sa.Integer, sa.ForeignKey("review_items.id"), nullable=False),
        sa.Column("reviewer_id", sa.Integer, sa.ForeignKey("reviewers.id"), nullable=False),
        sa.Column("until", sa.Float, nullable=False),
        sa.UniqueConstraint("item_id", "reviewer_id", name="uq_reservations_item_reviewer"),
    )
    op.create_index("ix_reservations_item_id", "reservations", ["item_id"])
    op.create_index("ix_reservations_reviewer_id", "reservations", ["reviewer_id"])
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("item_id", sa.Integer, sa.ForeignKey("review_items.id"), nullable=False),
        sa.Column("reviewer_id", sa.Integer, sa.ForeignKey("reviewers.id"), nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("rating", sa.Integer, nullable=True),
        sa.Column("criteria", sa.JSON, nullable=True),
        sa.Column("thumb", sa.Integer, nullable=True),
        sa.Column("correction", sa.Text, nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("choice", sa.String(8), nullable=True),
        sa.UniqueConstraint("item_id", "reviewer_id", name="uq_reviews_item_reviewer"),
    )
    op.create_index("ix_reviews_item_id", "reviews", ["item_id"])
    op.create_index("ix_reviews_reviewer_id", "reviews", ["reviewer_id"])
    op.create_index("ix_reviews_created", "reviews", ["created"])


def downgrade() -> None:
    for t in ("reviews", "reservations", "review_items", "reviewers"):
        op.drop_table(t)
