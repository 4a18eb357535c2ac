"""what a dispatch job delivers (results, or a STAT flag to the webhook or HL7 receiver),
whether its dead letter is replayed when its destination answers again, and when its
scheduled retry is due

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 12:30:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Every job before this revision sent result objects.
    with op.batch_alter_table("dispatch_job", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=16), nullable=False, server_default="results")
        )
        # Dead letters from before this revision wait for an operator, as they did.
        batch_op.add_column(
            sa.Column("replayable", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("dispatch_job", schema=None) as batch_op:
        batch_op.drop_column("next_attempt_at")
        batch_op.drop_column("replayable")
        batch_op.drop_column("kind")
