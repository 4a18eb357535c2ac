"""the task performer's claims journal (one row per UPS workitem it took) and its heartbeat

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 17:30:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ups_workitem",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("workitem_uid", sa.String(length=64), nullable=False),
        sa.Column("performer", sa.String(length=16), nullable=False),
        sa.Column("transaction_uid", sa.String(length=64), nullable=False),
        sa.Column("task_code", sa.String(length=64), nullable=False),
        sa.Column("step", sa.String(length=16), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("generation", sa.Integer(), nullable=True),
        sa.Column("task_id", sa.String(length=64), nullable=True),
        sa.Column("analysis_id", sa.Integer(), nullable=True),
        sa.Column("output_url", sa.Text(), nullable=True),
        sa.Column("outputs", sa.JSON(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_try_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("workitem_uid", "performer"),
    )
    for column in ("workitem_uid", "performer", "step"):
        op.create_index(f"ix_ups_workitem_{column}", "ups_workitem", [column])
    op.create_table(
        "ups_performer",
        sa.Column("performer", sa.String(length=16), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("task_manager", sa.Text(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reachable", sa.Boolean(), nullable=False),
        sa.Column("down_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("performer"),
    )


def downgrade() -> None:
    op.drop_table("ups_performer")
    for column in ("step", "performer", "workitem_uid"):
        op.drop_index(f"ix_ups_workitem_{column}", table_name="ups_workitem")
    op.drop_table("ups_workitem")
