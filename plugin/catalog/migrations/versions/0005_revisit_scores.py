"""revisit risk scores linked to studies

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 16:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "revisit_score",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("encounter_id", sa.String(length=128), nullable=False),
        sa.Column("risk", sa.Float(), nullable=False),
        sa.Column("flagged", sa.Boolean(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("algorithm_name", sa.String(length=64), nullable=False),
        sa.Column("algorithm_version", sa.String(length=64), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("triage_linked", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["study.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_id", "encounter_id", "algorithm_version"),
    )
    with op.batch_alter_table("revisit_score", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_revisit_score_flagged"), ["flagged"], unique=False)
        batch_op.create_index(batch_op.f("ix_revisit_score_study_id"), ["study_id"], unique=False)


def downgrade() -> None:
    op.drop_table("revisit_score")
