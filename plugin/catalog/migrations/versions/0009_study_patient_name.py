"""patient name of each study, and the index that finds a patient's priors

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 11:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Shown on the dashboard's worklist and study page only (never logged); null for studies
    # recorded before this migration, whose page reads it from the stored header instead.
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.add_column(sa.Column("patient_name", sa.Text(), nullable=True))
        batch_op.create_index("ix_study_patient_id", ["patient_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_index("ix_study_patient_id")
        batch_op.drop_column("patient_name")
