"""trainings: jobs.queue and jobs.details; the datasets table

Revision ID: 0004_f_trainings
Revises: 0004_w
Create Date: 2026-11-23 01:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_f_trainings"
down_revision = "0004_w"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTER TABLE (no batch "move and copy" of jobs, which on SQLite would fire the
    # foreign keys that point at it).
    op.add_column(
        "jobs", sa.Column("queue", sa.String(length=16), server_default="generations", nullable=False)
    )
    op.add_column("jobs", sa.Column("details", sa.JSON(), nullable=True))
    op.create_index("ix_jobs_queue_status", "jobs", ["queue", "status"], unique=False)
    op.create_table(
        "datasets",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("owner_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("num_images", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("storage_prefix", sa.String(length=255), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["owner_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.create_index("ix_datasets_owner_created", ["owner_id", "created_at", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_index("ix_datasets_owner_created")
    op.drop_table("datasets")
    # Plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35 has it), as above.
    op.drop_index("ix_jobs_queue_status", table_name="jobs")
    op.drop_column("jobs", "details")
    op.drop_column("jobs", "queue")
