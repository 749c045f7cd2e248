"""The lease protocol between workers and the jobs table: claim, heartbeat, complete, finish,
retry later, requeue (outage), release (shutdown), and the outage clock of waiting jobs.

Plain functions taking a keyword-only ``session``; each is one transaction. A job is
``running`` under a lease (``lease_owner``, ``lease_expires_at``); a job whose lease expired (its
worker died or stalled) is claimable again. Every write after the claim is conditional on still
holding the lease, so a job that runs twice is recorded once.

**Fair claims.** A claim takes up to ``limit`` jobs, each the oldest claimable job of the owner
with the fewest running jobs: every claimable job gets a *slot* number, its owner's live running
jobs plus its rank among the owner's claimable jobs (oldest first), and the claim takes the lowest
slots. So a user with nothing running goes before a user with many jobs running, however many
that user has queued, and one claim of several jobs interleaves owners round-robin.
``per_owner`` caps the jobs of one owner that the claiming worker holds, so that a worker keeps
slots free for other users' jobs however much one user has queued.

**Concurrent claimers.** SQLite: the claim is one ``BEGIN IMMEDIATE`` transaction, so claimers
are serialised by the single writer. PostgreSQL: the claim first locks the rows of the owners it
may take jobs from, ``FOR UPDATE SKIP LOCKED``. Only a claim makes a job ``running`` and every
claim holds its owners' locks, so an owner's running count cannot change under the claimer that
holds the owner (the slot numbers are exact); another claimer skips that owner rather than
wait. The chosen job rows are then locked ``FOR UPDATE SKIP LOCKED`` too (a cancel or delete in
progress is skipped, not waited for) and re-checked as still claimable.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import raiseload

from sfumato.control_plane import events
from sfumato.control_plane import jobs as job_records
from sfumato.control_plane.models import Image, Job, User, utcnow

Verdict = Literal["cancel", "lost"]


@dataclass(frozen=True, slots=True)
class Claimed:
    """A job a worker now holds (plain data, detached from the session)."""

    id: str
    owner_id: str
    model_name: str
    params: dict[str, Any]
    attempts: int
    created_at: datetime
    queue_wait_s: float | None  # submission (or retry) to this claim, on a job's first claim only
    reclaimed: bool  # taken over from a worker whose lease expired


@dataclass(frozen=True, slots=True)
class Ended:
    """A job that reached a final status (for the duration metric)."""

    id: str
    model_name: str
    status: str
    created_at: datetime
    finished_at: datetime


def _postgres(session: AsyncSession) -> bool:
    return session.bind is not None and session.bind.dialect.name == "postgresql"


def _claimable(now: datetime, queue: str = "generations"):  # -> SQL expression
    return and_(
        Job.queue == queue,
        or_(
            and_(Job.status == "queued", Job.available_at <= now),
            and_(Job.status == "running", Job.lease_expires_at < now),
        ),
    )


async def claim(
    *,
    session: AsyncSession,
    worker_id: str,
    lease_s: float,
    limit: int = 1,
    per_owner: int | None = None,
    queue: str = "generations",
) -> list[Claimed]:
    """Take up to ``limit`` claimable jobs of ``queue`` (``generations``: the generation workers,
    ``trainings``: the training runner), fairly across owners (see the module's docstring)."""
    now = utcnow()
    claimable = _claimable(now, queue)
    candidates = select(Job.id, Job.owner_id, Job.created_at).where(claimable)
    if _postgres(session):
        owners = list(
            await session.scalars(
                select(User.id)
                .where(User.id.in_(select(Job.owner_id).where(claimable)))
                .with_for_update(skip_locked=True, of=User)
            )
        )
        if not owners:
            await session.rollback()
            return []
        candidates = candidates.where(Job.owner_id.in_(owners))
    running = (  # per owner: live leases over all workers, and those of this worker
        select(
            Job.owner_id,
            func.count().label("n"),
            func.sum(case((Job.lease_owner == worker_id, 1), else_=0)).label("mine"),
        )
        .where(Job.queue == queue, Job.status == "running", Job.lease_expires_at >= now)
        .group_by(Job.owner_id)
        .subquery()
    )
    jobs = candidates.subquery()
    rank = func.row_number().over(partition_by=jobs.c.owner_id, order_by=(jobs.c.created_at, jobs.c.id))
    ranked = (
        select(
            jobs.c.id,
            jobs.c.created_at,
            (func.coalesce(running.c.n, 0) + rank).label("slot"),
            (func.coalesce(running.c.mine, 0) + rank).label("held"),  # the owner's jobs here if taken
        )
        .select_from(jobs.outerjoin(running, running.c.owner_id == jobs.c.owner_id))
        .subquery()
    )
    pick = select(ranked.c.id)
    if per_owner is not None:
        pick = pick.where(ranked.c.held <= per_owner)
    ids = list(
        await session.scalars(pick.order_by(ranked.c.slot, ranked.c.created_at, ranked.c.id).limit(limit))
    )
    if not ids:
        await session.rollback()
        return []
    rows = select(Job).options(raiseload(Job.images)).where(Job.id.in_(ids), claimable)
    if _postgres(session):
        rows = rows.with_for_update(skip_locked=True)
    order = {job_id: i for i, job_id in enumerate(ids)}
    held = sorted((await session.scalars(rows)).all(), key=lambda job: order[job.id])
    claimed = []
    for job in held:
        first = job.started_at is None
        claimed.append(
            Claimed(
                id=job.id,
                owner_id=job.owner_id,
                model_name=job.model_name,
                params=dict(job.params),
                attempts=job.attempts + 1,
                created_at=job.created_at,
                queue_wait_s=(now - job.available_at).total_seconds() if first else None,
                reclaimed=job.status == "running",
            )
        )
        job.status = "running"
        job.lease_owner = worker_id
        job.lease_expires_at = now + timedelta(seconds=lease_s)
        job.attempts += 1
        job.started_at = job.started_at or now
        job.progress = 0.1
    await events.publish_many(
        session=session, events=[(job.id, "status", job_records.resource(job, [])) for job in held]
    )
    await session.commit()
    return claimed


async def heartbeat(
    *, session: AsyncSession, worker_id: str, job_ids: list[str], lease_s: float
) -> dict[str, Verdict | None]:
    """Extend the leases of all of ``job_ids`` in one statement. Per job: ``"cancel"`` when its
    owner asked to cancel it, ``"lost"`` when it is no longer ours (deleted, finished, or claimed
    by another worker after our lease expired), else ``None``."""
    if not job_ids:
        return {}
    result = await session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.lease_owner == worker_id, Job.status == "running")
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
        .returning(Job.id, Job.cancel_requested)
        .execution_options(synchronize_session=False)
    )
    held = {job_id: cancel for job_id, cancel in result.all()}
    await session.commit()
    return {job_id: ("cancel" if held[job_id] else None) if job_id in held else "lost" for job_id in job_ids}


async def _held(session: AsyncSession, job_id: str, worker_id: str) -> Job | None:
    query = (
        select(Job)
        .options(raiseload(Job.images))
        .where(Job.id == job_id, Job.lease_owner == worker_id, Job.status == "running")
    )
    if _postgres(session):
        query = query.with_for_update()
    return await session.scalar(query)


def _end(job: Job, status: str, error: str | None, now: datetime) -> Ended:
    job.status = status
    job.error = error
    job.finished_at = now
    job.lease_owner = None
    job.lease_expires_at = None
    return Ended(
        id=job.id, model_name=job.model_name, status=status, created_at=job.created_at, finished_at=now
    )


async def complete(
    *,
    session: AsyncSession,
    job_id: str,
    worker_id: str,
    images: list[dict[str, Any]],
    inference_s: float,
    model_version: str = "",
) -> Ended | None:
    """Record success and the images, once: only while ``worker_id`` still holds the lease."""
    job = await _held(session, job_id, worker_id)
    if job is None:
        await session.rollback()
        return None
    rows = [Image(job_id=job_id, **image) for image in images]
    session.add_all(rows)
    job.progress = 1.0
    job.inference_s = inference_s
    job.model_version = model_version
    job.outage_since = None
    ended = _end(job, "succeeded", None, utcnow())
    await job_records.publish_state(session=session, job=job, images=rows)
    await session.commit()
    return ended


async def finish(
    *, session: AsyncSession, job_id: str, worker_id: str, status: str, error: str | None
) -> Ended | None:
    """Record ``failed`` or ``canceled`` (while holding the lease)."""
    job = await _held(session, job_id, worker_id)
    if job is None:
        await session.rollback()
        return None
    ended = _end(job, status, error, utcnow())
    await job_records.publish_state(session=session, job=job, images=[])
    await session.commit()
    return ended


def _back_to_queue(job: Job, *, due: datetime) -> None:
    job.status = "queued"
    job.progress = 0.0
    job.available_at = due
    job.lease_owner = None
    job.lease_expires_at = None


async def retry_later(
    *, session: AsyncSession, job_id: str, worker_id: str, delay_s: float, error: str
) -> bool:
    """A transient failure (Triton answered, but not now): back to the queue, due in ``delay_s``;
    the attempt is spent."""
    job = await _held(session, job_id, worker_id)
    if job is None:
        await session.rollback()
        return False
    job.error = error
    job.outage_since = None  # Triton answered
    _back_to_queue(job, due=utcnow() + timedelta(seconds=delay_s))
    await job_records.publish_state(session=session, job=job, images=[])
    await session.commit()
    return True


def outage_error(max_outage_s: float, problem: str, *, waited_s: float | None = None) -> str:
    """The error of a job that waited out an outage for longer than ``SFUMATO_MAX_OUTAGE_S``."""
    waited = f"for {waited_s:.0f} s, " if waited_s is not None else "for "
    return f"Triton was unavailable {waited}longer than SFUMATO_MAX_OUTAGE_S ({max_outage_s:g} s): {problem}"


async def requeue(
    *,
    session: AsyncSession,
    job_id: str,
    worker_id: str,
    delay_s: float,
    max_outage_s: float,
    error: str,
) -> Ended | Literal["queued"] | None:
    """Triton was unavailable (down, restarting, unreachable): hand the job back without spending
    the attempt, due in ``delay_s``. The job's outage clock starts at its first such failure;
    once it has run past ``max_outage_s`` the job fails instead, with an error that says so.
    ``"queued"``, the :class:`Ended` failure, or ``None`` when the lease is no longer ours."""
    job = await _held(session, job_id, worker_id)
    if job is None:
        await session.rollback()
        return None
    now = utcnow()
    if job.outage_since is None or job.outage_since < await _last_success(session, before=now):
        job.outage_since = now  # a first failure, or Triton has served some job since the last one
    waited = (now - job.outage_since).total_seconds()
    if waited >= max_outage_s:
        ended = _end(job, "failed", outage_error(max_outage_s, error, waited_s=waited), now)
        await job_records.publish_state(session=session, job=job, images=[])
        await session.commit()
        return ended
    job.error = f"waiting for Triton (unavailable for {waited:.0f} s): {error}"
    job.attempts = max(job.attempts - 1, 0)
    _back_to_queue(job, due=now + timedelta(seconds=delay_s))
    await job_records.publish_state(session=session, job=job, images=[])
    await session.commit()
    return "queued"


async def release(*, session: AsyncSession, job_id: str, worker_id: str) -> bool:
    """Graceful shutdown: hand an unfinished job back at once, not counting the attempt."""
    job = await _held(session, job_id, worker_id)
    if job is None:
        await session.rollback()
        return False
    job.attempts = max(job.attempts - 1, 0)
    _back_to_queue(job, due=utcnow())
    await job_records.publish_state(session=session, job=job, images=[])
    await session.commit()
    return True


async def _last_success(session: AsyncSession, *, before: datetime) -> datetime:
    """When some job last succeeded (Triton served it); the epoch if none did."""
    last = await session.scalar(
        select(func.max(Job.finished_at)).where(
            Job.queue == "generations", Job.status == "succeeded", Job.finished_at <= before
        )
    )
    return last or datetime.fromtimestamp(0, UTC)


async def outage_tick(*, session: AsyncSession, max_outage_s: float, problem: str) -> list[Ended]:
    """A worker finds Triton not ready, so it starts no job: start the outage clock of every due
    queued job that has none, and fail the queued jobs whose clock has run past ``max_outage_s``.
    Returns the jobs failed. Idempotent: every worker process may run it during an outage.

    A clock that started before some job last succeeded is started afresh: Triton has served
    work since (it came back between outages, or this worker alone cannot reach it while others
    can), so the job has not been waiting on one outage all that time."""
    now = utcnow()
    await session.execute(
        update(Job)
        .where(
            Job.queue == "generations",
            Job.status == "queued",
            Job.outage_since < await _last_success(session, before=now),
        )
        .values(outage_since=None)
        .execution_options(synchronize_session=False)
    )
    await session.execute(
        update(Job)
        .where(
            Job.queue == "generations",
            Job.status == "queued",
            Job.available_at <= now,
            Job.outage_since.is_(None),
        )
        .values(outage_since=now)
        .execution_options(synchronize_session=False)
    )
    overdue = (
        select(Job)
        .options(raiseload(Job.images))
        .where(
            Job.queue == "generations",
            Job.status == "queued",
            Job.outage_since <= now - timedelta(seconds=max_outage_s),
        )
    )
    if _postgres(session):
        overdue = overdue.with_for_update(skip_locked=True)
    failed = []
    for job in (await session.scalars(overdue)).all():
        job.status = "failed"
        job.finished_at = now
        job.error = outage_error(max_outage_s, problem)
        await job_records.publish_state(session=session, job=job, images=[])
        failed.append(Ended(job.id, job.model_name, "failed", job.created_at, now))
    await session.commit()
    return failed


@dataclass(frozen=True, slots=True)
class ProgressUpdate:
    """A running job's progress: ``step`` of ``total`` denoising steps, and a preview image (a
    PNG data URL) when the request asked for previews."""

    job_id: str
    step: int
    total: int
    preview: str | None = None


async def progress_many(*, session: AsyncSession, worker_id: str, updates: list[ProgressUpdate]) -> list[str]:
    """Write the progress of several running jobs and publish a ``progress`` event for each, in
    one transaction and three statements, for those ``worker_id`` still holds; their ids."""
    if not updates:
        return []
    values = {u.job_id: round(u.step / u.total, 4) if u.total else 0.0 for u in updates}
    result = await session.execute(
        update(Job)
        .where(Job.id.in_(list(values)), Job.lease_owner == worker_id, Job.status == "running")
        .values(progress=case(values, value=Job.id, else_=Job.progress))
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    held = set(result.scalars().all())
    published = []
    for u in updates:
        if u.job_id in held:
            data: dict[str, Any] = {"step": u.step, "total": u.total, "progress": values[u.job_id]}
            if u.preview is not None:
                data["preview"] = u.preview
            published.append((u.job_id, "progress", data))
    await events.publish_many(session=session, events=published)
    await session.commit()
    return [job_id for job_id, _, _ in published]


async def progress(
    *, session: AsyncSession, job_id: str, worker_id: str, step: int, total: int, preview: str | None = None
) -> bool:
    """One job's progress (:func:`progress_many` of one); whether ``worker_id`` still holds it."""
    update_ = ProgressUpdate(job_id, step, total, preview)
    return bool(await progress_many(session=session, worker_id=worker_id, updates=[update_]))
