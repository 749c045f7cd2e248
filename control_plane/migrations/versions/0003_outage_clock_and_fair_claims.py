"""jobs: the outage clock (outage_since), indexes for fair claims and for the last success

Revision ID: 0003
Revises: 0002_d
Create Date: 2026-11-23 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002_d"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("outage_since", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(
            "ix_jobs_status_owner_created", ["status", "owner_id", "created_at"], unique=False
        )
        batch_op.create_index("ix_jobs_status_finished", ["status", "finished_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_status_finished")
        batch_op.drop_index("ix_jobs_status_owner_created")
        batch_op.drop_column("outage_since")
