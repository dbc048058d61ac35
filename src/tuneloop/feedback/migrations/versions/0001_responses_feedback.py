"""responses and feedback: the tables tuneloop made before the schema was versioned.

A store from then has these tables and no alembic_version (and maybe no responses.model_version): this
migration finds them, adds what is missing (nullable: old rows keep NULL) and the store is stamped at 0001,
so nobody has to migrate by hand or lose their feedback.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    insp = sa.inspect(op.get_bind())
    if not insp.has_table("responses"):
        op.create_table(
            "responses",
            sa.Column("id", sa.String(64), primary_key=True),
            sa.Column("created", sa.Float, nullable=False),
            sa.Column("model", sa.String(128), nullable=False),
            sa.Column("endpoint", sa.String(32), nullable=False),
            sa.Column("prompt", sa.JSON, nullable=False),
            sa.Column("output", sa.Text, nullable=False),
            sa.Column("finish_reason", sa.String(32), nullable=False),
            sa.Column("model_version", sa.String(160), nullable=True),
        )
        op.create_index("ix_responses_model", "responses", ["model"])
    elif "model_version" not in {c["name"] for c in insp.get_columns("responses")}:
        op.add_column("responses", sa.Column("model_version", sa.String(160), nullable=True))
    if not insp.has_table("feedback"):
        op.create_table(
            "feedback",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("response_id", sa.String(64), sa.ForeignKey("responses.id"), nullable=False),
            sa.Column("created", sa.Float, nullable=False),
            sa.Column("rating", sa.Integer, nullable=True),
            sa.Column("correction", sa.Text, nullable=True),
            sa.Column("comment", sa.Text, nullable=True),
            sa.Column("user", sa.String(128), nullable=True),
        )
        op.create_index("ix_feedback_response_id", "feedback", ["response_id"])


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_table("responses")
