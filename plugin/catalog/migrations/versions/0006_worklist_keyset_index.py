"""worklist keyset pagination indexes

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 19:00:00.000000

"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The dashboard's worklist pages through studies newest first by (received_at, id), also
    # within one state or priority: keyset pagination stays an index range scan at any depth.
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.create_index("ix_study_received_at_id", ["received_at", "id"], unique=False)
        batch_op.create_index(
            "ix_study_state_received_at_id", ["state", "received_at", "id"], unique=False
        )
        batch_op.create_index(
            "ix_study_priority_received_at_id", ["priority", "received_at", "id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_index("ix_study_priority_received_at_id")
        batch_op.drop_index("ix_study_state_received_at_id")
        batch_op.drop_index("ix_study_received_at_id")
