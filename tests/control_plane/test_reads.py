"""Reads never take the writer lock: authentication and ``GET`` routes run in read-only
transactions (SQLite: deferred ``BEGIN`` with ``query_only``; PostgreSQL: ``READ ONLY``) and
write nothing, so on SQLite they answer while another connection holds the writer lock."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

PROMPT = "a red circle on a white background"


def read_routes(job_id: str) -> list[str]:
    return [
        f"/v1/generations/{job_id}",
        "/v1/generations",
        "/v1/generations?status=queued&limit=5",
        "/v1/keys",
        "/v1/users",
        "/metrics",
    ]


async def test_read_routes_issue_no_write_and_no_write_transaction(api) -> None:
    admin = await api.user("root", role="admin")
    job = (
        await api.client.post("/v1/generations", json={"prompt": PROMPT}, headers=api.headers(admin))
    ).json()
    engine = api.app.state.services.engine.sync_engine
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        statements.append(" ".join(statement.split()).upper())

    event.listen(engine, "before_cursor_execute", record)
    try:
        for path in read_routes(job["id"]):
            r = await api.client.get(path, headers=api.headers(admin))
            assert r.status_code == 200, (path, r.text)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert statements, "the reads ran no statement at all?"
    writes = [s for s in statements if s.startswith(("INSERT", "UPDATE", "DELETE", "BEGIN IMMEDIATE"))]
    assert not writes, writes


async def test_read_only_sessions_refuse_writes(api) -> None:
    services = api.app.state.services
    async with services.read_sessions() as session:
        assert (await session.execute(text("SELECT count(*) FROM users"))).scalar() == 0
        with pytest.raises(DBAPIError, match=r"(?i)read-only|readonly"):
            await session.execute(text("DELETE FROM users"))
    # The pool's connections are writable again for writing sessions.
    for _ in range(3):
        async with services.sessions() as session:
            await session.execute(text("DELETE FROM users WHERE name = 'nobody'"))
            await session.commit()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the single-writer database
async def test_reads_answer_while_another_connection_holds_the_writer_lock(api) -> None:
    alice = await api.user("alice")
    job = (
        await api.client.post("/v1/generations", json={"prompt": PROMPT}, headers=api.headers(alice))
    ).json()
    holder = sqlite3.connect(make_url(api.settings.database_url).database, isolation_level=None, timeout=0)
    holder.execute("BEGIN IMMEDIATE")  # the writer lock, held until released below
    try:
        # A write must wait for the lock (SQLite's busy timeout is 30 s) ...
        submission = asyncio.create_task(
            api.client.post("/v1/generations", json={"prompt": PROMPT}, headers=api.headers(alice))
        )
        # ... while every read, authentication included, answers now. Were a read to need the
        # lock it would wait the busy timeout and fail: the deadline below only bounds that.
        for path in read_routes(job["id"])[:4]:
            r = await asyncio.wait_for(api.client.get(path, headers=api.headers(alice)), 25)
            assert r.status_code == 200, (path, r.text)
        assert not submission.done(), "the submission did not need the writer lock?"
    finally:
        holder.execute("COMMIT")
        holder.close()
    assert (await submission).status_code == 202
