"""report labels per labeler version, reports that name no study yet, shadow analyses

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 05:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "report_label",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("report_id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("labeler_version", sa.String(length=64), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["report_id"], ["study_report.id"]),
        sa.ForeignKeyConstraint(["study_id"], ["study.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("report_id", "labeler_version"),
    )
    with op.batch_alter_table("report_label", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_report_label_report_id"), ["report_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_report_label_study_id"), ["study_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_report_label_labeler_version"), ["labeler_version"], unique=False
        )
    op.create_table(
        "unlinked_report",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=200), nullable=True),
        sa.Column("accession_number", sa.String(length=64), nullable=True),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("linked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("source", "digest"),
    )
    with op.batch_alter_table("unlinked_report", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_unlinked_report_received_at"), ["received_at"], unique=False
        )
    with op.batch_alter_table("analysis", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("role", sa.String(length=8), server_default="live", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("analysis", schema=None) as batch_op:
        batch_op.drop_column("role")
    op.drop_table("unlinked_report")
    op.drop_table("report_label")
