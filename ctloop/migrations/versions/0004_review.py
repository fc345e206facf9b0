"""annotation review

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 16:51:24.723266
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import ctloop.db

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("annotation_revisions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "review_status", sa.String(length=16), server_default="pending", nullable=False
            )
        )
        batch_op.add_column(sa.Column("reviewer", sa.String(length=128), nullable=True))
        batch_op.add_column(
            sa.Column("review_comment", sa.Text(), server_default="", nullable=False)
        )
        batch_op.add_column(
            sa.Column("reviewed_at", ctloop.db.UtcDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("annotation_revisions", schema=None) as batch_op:
        batch_op.drop_column("reviewed_at")
        batch_op.drop_column("review_comment")
        batch_op.drop_column("reviewer")
        batch_op.drop_column("review_status")
