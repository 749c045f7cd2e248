"""Schema migrations, on SQLite and on PostgreSQL: the head schema is exactly the models (no
drift for autogenerate to find), and revision 0002_d (idempotency keys outlive their job) goes
down and up again with data in the table."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import delete, select

from sfumato.control_plane import migrate
from sfumato.control_plane.db import create_engine, session_factory
from sfumato.control_plane.models import Base, IdempotencyRecord, Job, User, utcnow


async def drift(url: str) -> list:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts={"compare_type": True}), Base.metadata
                )
            )
    finally:
        await engine.dispose()


async def test_the_head_schema_is_the_models(database_url: str) -> None:
    assert await drift(database_url) == []


async def test_0002_d_goes_down_and_up_with_data(database_url: str) -> None:
    engine = create_engine(database_url)
    sessions = session_factory(engine)
    try:
        async with sessions() as session:
            session.add(User(id="u", name="alice"))
            await session.flush()
            for job_id in ("kept", "deleted"):
                session.add(Job(id=job_id, owner_id="u", params={}, model_name="pipeline"))
            await session.flush()
            expires = utcnow() + timedelta(hours=1)
            for key, job_id in (("k1", "kept"), ("k2", "deleted")):
                session.add(
                    IdempotencyRecord(
                        principal="u", key=key, request_hash="h", job_id=job_id, expires_at=expires
                    )
                )
            await session.commit()
            await session.execute(delete(Job).where(Job.id == "deleted"))
            await session.commit()
            spent = await session.get(IdempotencyRecord, ("u", "k2"))
            assert spent is not None and spent.job_id is None  # ON DELETE SET NULL
    finally:
        await engine.dispose()

    # Down to 0001 (job_id NOT NULL, ON DELETE CASCADE): the spent key cannot stay.
    await asyncio.to_thread(migrate.downgrade, database_url, "0001")
    await asyncio.to_thread(migrate.upgrade, database_url)
    assert await drift(database_url) == []
    engine = create_engine(database_url)
    try:
        async with session_factory(engine)() as session:
            left = (await session.execute(select(IdempotencyRecord.key, IdempotencyRecord.job_id))).all()
        assert [tuple(row) for row in left] == [("k1", "kept")]
    finally:
        await engine.dispose()
