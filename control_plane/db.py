"""Database engine and sessions (SQLAlchemy 2 async): SQLite (aiosqlite) or PostgreSQL (asyncpg).

Two kinds of session share one engine (one connection pool):

* **writing** sessions (:func:`session_factory`): on SQLite every transaction is
  ``BEGIN IMMEDIATE``, so that concurrent writers (submissions, worker claims) serialise on the
  single writer lock at the start of the transaction instead of failing with "database is
  locked" half way through;
* **read-only** sessions (``session_factory(engine, read_only=True)``): on SQLite a deferred
  ``BEGIN`` with ``PRAGMA query_only``, which in WAL mode reads a snapshot without ever taking
  or waiting for the writer lock; on PostgreSQL a ``READ ONLY`` transaction. A write in one is
  an error, not a silent lock.

SQLite runs in WAL mode with a busy timeout. PostgreSQL claims jobs with ``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

READ_ONLY = "sfumato_read_only"  # execution option of the read-only sessions' engine


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def create_engine(url: str, *, echo: bool = False) -> AsyncEngine:
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        # SQLite connections are cheap and readers do not block each other in WAL mode: a pool
        # as large as the API's concurrency keeps readers from queueing for a connection.
        engine = create_async_engine(
            url, echo=echo, connect_args={"timeout": 30}, pool_size=20, max_overflow=44
        )

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            # Let SQLAlchemy, not the driver, open transactions, so we can say how (below).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _sqlite_begin(connection) -> None:  # type: ignore[no-untyped-def]
            read_only = bool(connection.get_execution_options().get(READ_ONLY))
            if connection.info.get("query_only") != read_only:  # set once per change, not per transaction
                connection.exec_driver_sql(f"PRAGMA query_only={int(read_only)}")
                connection.info["query_only"] = read_only
            connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    return create_async_engine(url, echo=echo, pool_size=10, max_overflow=20, pool_pre_ping=True)


def session_factory(engine: AsyncEngine, *, read_only: bool = False) -> async_sessionmaker[AsyncSession]:
    """Sessions on ``engine``: writing ones, or with ``read_only`` ones that never take a write lock."""
    if read_only:
        options: dict[str, object] = {READ_ONLY: True}
        if engine.dialect.name == "postgresql":
            options["postgresql_readonly"] = True
        engine = engine.execution_options(**options)
    return async_sessionmaker(engine, expire_on_commit=False)
