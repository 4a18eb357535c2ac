"""the access log: who saw which study (and patient), who changed what, who was refused;
append-only for the application (updates refused by a trigger)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 14:30:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NO_UPDATE = "access log entries are never changed"


def upgrade() -> None:
    op.create_table(
        "access_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("display_name", sa.String(length=255), nullable=False),
        sa.Column("roles", sa.String(length=100), nullable=False),
        sa.Column("via", sa.String(length=16), nullable=False),
        sa.Column("action", sa.String(length=48), nullable=False),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("route", sa.String(length=200), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("client_host", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    for column in ("at", "action", "study_instance_uid", "patient_id"):
        op.create_index(f"ix_access_event_{column}", "access_event", [column])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION access_event_no_update() RETURNS trigger AS $$ BEGIN "
            f"RAISE EXCEPTION '{NO_UPDATE}'; END; $$ LANGUAGE plpgsql"
        )
        op.execute(
            "CREATE TRIGGER access_event_no_update BEFORE UPDATE ON access_event "
            "FOR EACH ROW EXECUTE FUNCTION access_event_no_update()"
        )
    else:
        op.execute(
            "CREATE TRIGGER access_event_no_update BEFORE UPDATE ON access_event "
            f"BEGIN SELECT RAISE(ABORT, '{NO_UPDATE}'); END"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER access_event_no_update ON access_event")
        op.execute("DROP FUNCTION access_event_no_update()")
    else:
        op.execute("DROP TRIGGER access_event_no_update")
    for column in ("patient_id", "study_instance_uid", "action", "at"):
        op.drop_index(f"ix_access_event_{column}", table_name="access_event")
    op.drop_table("access_event")
