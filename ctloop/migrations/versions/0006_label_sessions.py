"""MONAI Label sessions: images segmented outside the loop, removed when they expire

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 07:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import ctloop.db

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "label_sessions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("site_id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("created_at", ctloop.db.UtcDateTime(timezone=True), nullable=False),
        sa.Column("last_access_at", ctloop.db.UtcDateTime(timezone=True), nullable=False),
        sa.Column("expiry_s", sa.Integer(), nullable=False),
        sa.Column("image_key", sa.String(length=512), nullable=False),
        sa.Column("image_version", sa.String(length=256), nullable=True),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("masks", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("label_sessions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_label_sessions_last_access_at"), ["last_access_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_label_sessions_site_id"), ["site_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_label_sessions_user_id"), ["user_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("label_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_label_sessions_user_id"))
        batch_op.drop_index(batch_op.f("ix_label_sessions_site_id"))
        batch_op.drop_index(batch_op.f("ix_label_sessions_last_access_at"))
    op.drop_table("label_sessions")
