"""The job-event channel: status changes and progress of every job, published when they happen.

**Born in one place.** :func:`publish` (called by :mod:`jobs`, :mod:`leases` and the workers at
each change) writes a ``job_events`` row in the caller's transaction, the same one as the change
it reports, numbered per job (``seq`` 1, 2, ...; callers hold the job's row, so the numbers are
gap-free and ordered). An event exists exactly when its change committed, and a client that
resumes with ``Last-Event-ID`` reads what it missed from the table. Kinds: ``status`` (queued,
running; data: the job's resource), ``progress`` (``{"step", "total", "progress", "preview"?}``)
and ``completed`` (a final status; data: the resource).

**Delivered after commit** by the process's :class:`EventHub` (``services.events``):

* in process, at once (an ``after_commit`` hook of the session hands the events to the hub);
* across processes: Redis pub/sub when ``SFUMATO_REDIS_URL`` is set (published after commit);
  else on PostgreSQL a ``NOTIFY`` sent in the same transaction (so it too is delivered only on
  commit) and one ``LISTEN`` connection per process; else (SQLite) one connection per process
  that reads new rows every ``SFUMATO_EVENT_POLL_S``.

A subscriber numbers what it has seen: a duplicate (an event that arrived by two routes) is
dropped, a gap (a lost notification, a full queue, a reconnect) is filled from the table, and
every ``SFUMATO_EVENT_RESYNC_S`` without events it re-reads the table anyway, so no transport
loss is ever permanent.

Idle workers wait on :meth:`EventHub.wait_for_queued`; ``Prefer: wait``, SSE and the WebSocket
on :meth:`EventHub.subscribe`. Events of jobs finished more than ``SFUMATO_EVENT_RETENTION_S``
ago are purged by the maintenance sweep (:func:`purge`); a job's progress events are dropped
when it finishes (its ``completed`` event says all).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, event, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from sfumato.control_plane import webhooks
from sfumato.control_plane.db import READ_ONLY
from sfumato.control_plane.models import FINAL_STATUSES, Job, JobEventRow, utcnow

log = logging.getLogger("sfumato.events")

KINDS = frozenset({"status", "progress", "completed"})
PG_CHANNEL = "sfumato_job_events"
HUB_KEY = "sfumato_event_hub"  # Session.info: the hub that delivers the session's events
_PENDING = "sfumato_job_events_pending"  # Session.info: events published, not yet committed
_NOTIFY_MAX = 7900  # PostgreSQL's NOTIFY payload limit is 8000 bytes
_QUEUE_SIZE = 256  # per subscriber; beyond it the subscriber re-reads the table
_RECONNECT_S = 1.0


@dataclass(frozen=True, slots=True)
class JobEvent:
    job_id: str
    seq: int
    kind: str
    data: dict[str, Any]
    created_at: datetime

    def message(self) -> dict[str, Any]:
        """The WebSocket message (and the SSE fields): ``{"event", "id", "data"}``."""
        return {"event": self.kind, "id": self.seq, "data": self.data}


def _wire(event: JobEvent, origin: str, *, with_data: bool = True) -> str:
    body: dict[str, Any] = {"o": origin, "j": event.job_id, "s": event.seq, "k": event.kind}
    body["t"] = event.created_at.isoformat()
    if with_data:
        body["d"] = event.data
    return json.dumps(body, separators=(",", ":"))


def _unwire(payload: str | bytes) -> tuple[str, JobEvent | None, tuple[str, int]]:
    """``(origin, event or None when the data was left out, (job id, seq))``."""
    body = json.loads(payload)
    key = (body["j"], int(body["s"]))
    if "d" not in body:
        return body["o"], None, key
    return (
        body["o"],
        JobEvent(key[0], key[1], body["k"], body["d"], datetime.fromisoformat(body["t"])),
        key,
    )


def _row_event(row: JobEventRow) -> JobEvent:
    return JobEvent(row.job_id, row.seq, row.kind, dict(row.data), row.created_at)


def _postgres(session: AsyncSession) -> bool:
    return session.bind is not None and session.bind.dialect.name == "postgresql"


# --------------------------------------------------------------------------- publishing


async def publish(*, session: AsyncSession, job_id: str, kind: str, data: dict) -> None:
    """Record one event of ``job_id`` in ``session``'s transaction; it is delivered once that
    commits (and never if it rolls back). The caller has written (so locked) the job's row in
    this transaction, which orders concurrent publishers of one job."""
    await publish_many(session=session, events=[(job_id, kind, data)])


async def publish_many(
    *, session: AsyncSession, events: list[tuple[str, str, dict]], new: bool = False
) -> None:
    """:func:`publish` of several ``(job_id, kind, data)`` in three statements, whatever their
    number (a worker's progress of many jobs, a claim of many jobs). ``new``: the jobs were
    created in this transaction (they have no events yet: one statement less)."""
    if not events:
        return
    for _, kind, _ in events:
        if kind not in KINDS:
            raise ValueError(f"unknown job event kind {kind!r}")
    ids = {job_id for job_id, _, _ in events}
    last: dict[str, int] = {}
    if not new:
        query = (
            select(JobEventRow.job_id, func.max(JobEventRow.seq))
            .where(JobEventRow.job_id.in_(ids))
            .group_by(JobEventRow.job_id)
        )
        last = {job_id: seq for job_id, seq in (await session.execute(query)).all()}
    created = utcnow()
    published = []
    for job_id, kind, data in events:
        last[job_id] = last.get(job_id, 0) + 1
        published.append(JobEvent(job_id, last[job_id], kind, data, created))
    session.add_all(
        JobEventRow(job_id=e.job_id, seq=e.seq, kind=e.kind, data=e.data, created_at=created)
        for e in published
    )
    session.info.setdefault(_PENDING, []).extend(published)
    hub: EventHub | None = session.info.get(HUB_KEY)
    if _postgres(session) and (hub is None or hub.transport == "postgresql"):
        origin = hub.origin if hub is not None else ""
        payloads = []
        for item in published:
            payload = _wire(item, origin)
            if len(payload.encode()) > _NOTIFY_MAX:
                payload = _wire(item, origin, with_data=False)  # listeners read it from the table
            payloads.append(payload)
        await session.execute(
            text("SELECT pg_notify(:channel, p) FROM unnest(CAST(:payloads AS text[])) AS p"),
            {"channel": PG_CHANNEL, "payloads": payloads},
        )
    # Webhooks: each event a job's webhook takes gets its delivery in the outbox, in this same
    # transaction (sfumato.control_plane.webhooks).
    await webhooks.enqueue_job_events(session=session, events=events, now=created)


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    pending = session.info.pop(_PENDING, None)
    hub = session.info.get(HUB_KEY)
    if pending and hub is not None:
        hub.committed(pending)


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop(_PENDING, None)


async def history(*, session: AsyncSession, job_id: str, after_seq: int = 0) -> list[JobEvent]:
    """The stored events of ``job_id`` after ``after_seq``, in order (ends the transaction)."""
    try:
        rows = await session.scalars(
            select(JobEventRow)
            .where(JobEventRow.job_id == job_id, JobEventRow.seq > after_seq)
            .order_by(JobEventRow.seq)
        )
        return [_row_event(row) for row in rows]
    finally:
        await session.commit()


async def last_seq(*, session: AsyncSession, job_id: str) -> int:
    """The number of the job's latest event (0: none), inside the caller's transaction."""
    return await session.scalar(select(func.max(JobEventRow.seq)).where(JobEventRow.job_id == job_id)) or 0


async def drop_progress(*, session: AsyncSession, job_id: str) -> None:
    """A job finished: its progress events are moot (in the caller's transaction)."""
    await session.execute(
        delete(JobEventRow)
        .where(JobEventRow.job_id == job_id, JobEventRow.kind == "progress")
        .execution_options(synchronize_session=False)
    )


async def purge(*, session: AsyncSession, older_than_s: float, batch: int = 1000) -> int:
    """Delete the events of jobs that finished more than ``older_than_s`` ago; the count."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    total = 0
    while True:
        doomed = (
            select(JobEventRow.id)
            .join(Job, Job.id == JobEventRow.job_id)
            .where(Job.status.in_(FINAL_STATUSES), Job.finished_at < cutoff)
            .limit(batch)
        )
        result = await session.execute(
            delete(JobEventRow).where(JobEventRow.id.in_(doomed)).execution_options(synchronize_session=False)
        )
        await session.commit()
        total += result.rowcount or 0
        if (result.rowcount or 0) < batch:
            return total


def is_queued(event: JobEvent) -> bool:
    """A job became claimable (submitted, retried, handed back)."""
    return event.kind == "status" and event.data.get("status") == "queued"


# --------------------------------------------------------------------------- delivery


class Subscription:
    """Live events of one job, as the hub receives them (possibly twice, possibly with gaps:
    :meth:`EventHub.subscribe` numbers them)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self._queue: asyncio.Queue[JobEvent | None] = asyncio.Queue(_QUEUE_SIZE)

    def put(self, event: JobEvent | None) -> None:
        """An event, or ``None``: "re-read the table" (a reconnect, an overflow)."""
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(None)

    async def get(self, timeout: float) -> JobEvent | None:
        """The next event, or ``None`` after ``timeout`` seconds or when told to re-read."""
        try:
            async with asyncio.timeout(timeout):
                return await self._queue.get()
        except TimeoutError:
            return None


class EventHub:
    """One per process (``services.events``): takes the events this process commits and those
    of other processes (PostgreSQL LISTEN, Redis, or the SQLite poller) to the subscribers of
    each job and to idle workers."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        read_sessions: async_sessionmaker[AsyncSession],
        redis_url: str | None = None,
        poll_s: float = 0.25,
        resync_s: float = 15.0,
    ) -> None:
        self.engine = engine
        self.read_sessions = read_sessions
        self.redis_url = redis_url
        self.poll_s = poll_s
        self.resync_s = resync_s
        self.origin = uuid.uuid4().hex  # tells this process's notifications from others'
        url = engine.url.render_as_string(hide_password=False)
        self.redis_channel = "sfumato:job-events:" + hashlib.sha256(url.encode()).hexdigest()[:16]
        self.transport = (
            "redis" if redis_url else "postgresql" if engine.dialect.name == "postgresql" else "sqlite-poll"
        )
        self._subscribers: dict[str, set[Subscription]] = {}
        self._queued = 0  # how many "job queued" events this hub has seen
        self._queued_changed: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._redis: Any = None
        self._sends: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.delivered = 0  # events handed to subscribers (for tests and metrics)

    def attach(self, *sessionmakers: async_sessionmaker[AsyncSession]) -> None:
        """Sessions made by these factories hand their committed events to this hub."""
        for maker in sessionmakers:
            maker.configure(info={HUB_KEY: self})

    # ----------------------------------------------------------------------- lifecycle

    @property
    def started(self) -> bool:
        return self._loop is not None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queued_changed = asyncio.Event()
        if self.transport == "postgresql":
            self._tasks.append(asyncio.create_task(self._listen_postgres(), name="job events: LISTEN"))
        elif self.transport == "redis":
            import redis.asyncio as aioredis

            self._redis = aioredis.from_url(self.redis_url)
            self._tasks.append(asyncio.create_task(self._listen_redis(), name="job events: Redis"))
        else:
            self._tasks.append(asyncio.create_task(self._poll_sqlite(), name="job events: SQLite poll"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self._loop = None
        if self._sends:
            await asyncio.wait(list(self._sends), timeout=5)
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    # ----------------------------------------------------------------------- intake

    def committed(self, events: list[JobEvent]) -> None:
        """Called (by the session's after-commit hook) with the events a transaction committed."""
        loop = self._loop
        if loop is None:  # not started (a CLI process, a test's bare services): stored only
            return
        loop.call_soon(self._dispatch, events)
        if self._redis is not None:
            payloads = [_wire(e, self.origin) for e in events]
            task = loop.create_task(self._send_redis(payloads))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)

    async def _send_redis(self, payloads: list[str]) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for payload in payloads:
                    pipe.publish(self.redis_channel, payload)
                await pipe.execute()
        except Exception:
            log.exception("publishing job events to Redis failed (subscribers re-read the table)")

    def _dispatch(self, events: list[JobEvent]) -> None:
        queued = False
        for item in events:
            for subscription in self._subscribers.get(item.job_id, ()):
                subscription.put(item)
                self.delivered += 1
            queued = queued or is_queued(item)
        if queued:
            self._queued += 1
            if self._queued_changed is not None:
                self._queued_changed.set()
                self._queued_changed = asyncio.Event()

    def _resync_all(self) -> None:
        """Notifications may have been missed (a reconnect): every subscriber re-reads the table,
        and idle workers look for work."""
        for subscriptions in self._subscribers.values():
            for subscription in subscriptions:
                subscription.put(None)
        self._dispatch([])
        self._queued += 1
        if self._queued_changed is not None:
            self._queued_changed.set()
            self._queued_changed = asyncio.Event()

    async def _notified(self, payload: str | bytes) -> None:
        try:
            origin, item, (job_id, seq) = _unwire(payload)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed job event notification: %r", payload[:200])
            return
        if origin == self.origin:
            return  # delivered in process at commit
        if item is None:  # too large for the notification: read it
            async with self.read_sessions() as session:
                found = await history(session=session, job_id=job_id, after_seq=seq - 1)
            item = next((e for e in found if e.seq == seq), None)
            if item is None:
                return
        self._dispatch([item])

    async def _listen_postgres(self) -> None:
        import asyncpg

        dsn = make_url(self.engine.url.render_as_string(hide_password=False)).set(drivername="postgresql")
        dsn_text = dsn.render_as_string(hide_password=False)
        pending: set[asyncio.Task] = set()

        def on_notify(_connection: Any, _pid: int, _channel: str, payload: str) -> None:
            task = asyncio.create_task(self._notified(payload))
            pending.add(task)
            task.add_done_callback(pending.discard)

        first = True
        while True:
            try:
                connection = await asyncpg.connect(dsn_text)
            except Exception as exc:
                log.warning("job events: cannot LISTEN on PostgreSQL (%s); retrying", exc)
                await asyncio.sleep(_RECONNECT_S)
                continue
            lost = asyncio.Event()
            connection.add_termination_listener(lambda _c, lost=lost: lost.set())
            try:
                await connection.add_listener(PG_CHANNEL, on_notify)
                if not first:
                    self._resync_all()
                first = False
                await lost.wait()
                log.warning("job events: the LISTEN connection was lost; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job events: LISTEN failed; reconnecting")
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(connection.close(timeout=2))
            await asyncio.sleep(_RECONNECT_S)

    async def _listen_redis(self) -> None:
        first = True
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.redis_channel)
                if not first:
                    self._resync_all()
                first = False
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        await self._notified(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("job events: Redis subscription failed (%s); reconnecting", exc)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())
            await asyncio.sleep(_RECONNECT_S)

    async def _poll_sqlite(self) -> None:
        """SQLite without Redis: one read-only connection of this process reads new rows."""
        last_id: int | None = None
        engine = self.engine.execution_options(**{READ_ONLY: True})
        while True:
            try:
                async with engine.connect() as connection:
                    while True:
                        if last_id is None:
                            last_id = (await connection.scalar(select(func.max(JobEventRow.id)))) or 0
                        else:
                            newer = select(JobEventRow).where(JobEventRow.id > last_id)
                            rows = (await connection.execute(newer.order_by(JobEventRow.id))).all()
                            if rows:
                                last_id = rows[-1].id
                                self._dispatch(
                                    [
                                        JobEvent(r.job_id, r.seq, r.kind, dict(r.data), r.created_at)
                                        for r in rows
                                    ]
                                )
                        await connection.commit()
                        await asyncio.sleep(self.poll_s)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job events: reading the table failed; retrying")
                await asyncio.sleep(_RECONNECT_S)

    # ----------------------------------------------------------------------- consumers

    @contextlib.contextmanager
    def listen(self, job_id: str) -> Iterator[Subscription]:
        """Receive the live events of ``job_id`` while inside the block."""
        subscription = Subscription(job_id)
        self._subscribers.setdefault(job_id, set()).add(subscription)
        try:
            yield subscription
        finally:
            subscribers = self._subscribers.get(job_id)
            if subscribers is not None:
                subscribers.discard(subscription)
                if not subscribers:
                    del self._subscribers[job_id]

    async def subscribe(self, job_id: str, *, after_seq: int | None = None) -> AsyncIterator[JobEvent]:
        """The events of ``job_id`` in order, each once: those stored after ``after_seq``, then
        the live ones (``after_seq=None``: only those after now). Ends when the job is gone; the
        caller ends it after the ``completed`` event."""
        with self.listen(job_id) as subscription:
            if after_seq is None:
                async with self.read_sessions() as session:
                    after_seq = await last_seq(session=session, job_id=job_id)
                    await session.commit()
            last = after_seq
            missed = True  # read the table first
            while True:
                if missed:
                    async with self.read_sessions() as session:
                        stored = await history(session=session, job_id=job_id, after_seq=last)
                        if not stored and not await self._exists(session, job_id):
                            return
                    for item in stored:
                        yield item
                        last = item.seq
                    missed = False
                item = await subscription.get(self.resync_s)
                if item is None or item.seq > last + 1:
                    missed = True
                    continue
                if item.seq <= last:
                    continue  # seen (it arrived by two routes)
                yield item
                last = item.seq

    @staticmethod
    async def _exists(session: AsyncSession, job_id: str) -> bool:
        try:
            return await session.scalar(select(Job.id).where(Job.id == job_id)) is not None
        finally:
            await session.commit()

    @property
    def queued_count(self) -> int:
        """How many "job queued" events this hub has seen (pass it to :meth:`wait_for_queued`)."""
        return self._queued

    async def wait_for_queued(self, timeout: float, *, since: int | None = None) -> bool:
        """Wait until some job is queued (by any process), at most ``timeout`` seconds; whether
        one was. With ``since`` (a :attr:`queued_count` read earlier), one queued since then
        counts too, so a worker that looked for work and found none misses nothing."""
        if since is not None and self._queued != since:
            return True
        if self._queued_changed is None:  # not started
            await asyncio.sleep(timeout)
            return False
        changed = self._queued_changed
        try:
            async with asyncio.timeout(timeout):
                await changed.wait()
            return True
        except TimeoutError:
            return False
