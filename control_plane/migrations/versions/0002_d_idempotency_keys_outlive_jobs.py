"""Idempotency keys outlive their job: ``idempotency_records.job_id`` becomes nullable with
``ON DELETE SET NULL`` (it was ``ON DELETE CASCADE``), so that a deleted job's key answers 409
until it expires instead of silently making a new job.

Revision ID: 0002_d
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_d"
down_revision = "0001"
branch_labels = None
depends_on = None

TABLE = "idempotency_records"
# 0001 left the foreign key unnamed: PostgreSQL named it itself; on SQLite batch mode names the
# reflected constraint with this convention so that it can be dropped.
NAMING = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}
SQLITE_FK = "fk_idempotency_records_job_id_jobs"
POSTGRESQL_FK = "idempotency_records_job_id_fkey"


def _replace_foreign_key(*, nullable: bool, ondelete: str) -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table(TABLE, naming_convention=NAMING, recreate="always") as batch:
            batch.drop_constraint(SQLITE_FK, type_="foreignkey")
            batch.alter_column("job_id", existing_type=sa.String(length=32), nullable=nullable)
            batch.create_foreign_key(SQLITE_FK, "jobs", ["job_id"], ["id"], ondelete=ondelete)
        return
    op.drop_constraint(POSTGRESQL_FK, TABLE, type_="foreignkey")
    op.alter_column(TABLE, "job_id", existing_type=sa.String(length=32), nullable=nullable)
    op.create_foreign_key(POSTGRESQL_FK, TABLE, "jobs", ["job_id"], ["id"], ondelete=ondelete)


def upgrade() -> None:
    _replace_foreign_key(nullable=True, ondelete="SET NULL")


def downgrade() -> None:
    op.execute(sa.text(f"DELETE FROM {TABLE} WHERE job_id IS NULL"))
    _replace_foreign_key(nullable=False, ondelete="CASCADE")
