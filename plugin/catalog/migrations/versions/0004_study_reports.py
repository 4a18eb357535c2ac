"""study reports and their embeddings

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 15:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "study_report",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["study.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_id", "source", "digest"),
    )
    with op.batch_alter_table("study_report", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_study_report_study_id"), ["study_id"], unique=False)
    op.create_table(
        "report_embedding",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("report_id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("model_ref", sa.String(length=130), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["report_id"], ["study_report.id"]),
        sa.ForeignKeyConstraint(["study_id"], ["study.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("report_id", "model_ref"),
    )
    with op.batch_alter_table("report_embedding", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_report_embedding_model_ref"), ["model_ref"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_report_embedding_report_id"), ["report_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_report_embedding_study_id"), ["study_id"], unique=False
        )


def downgrade() -> None:
    op.drop_table("report_embedding")
    op.drop_table("study_report")
