"""Generation jobs: submission (idempotent), reads, cancel, delete, and the worker's claim/lease.

Plain functions taking a keyword-only ``session``; routers and workers call them. A job is
committed before any work starts. Workers claim with a lease: on PostgreSQL with
``FOR UPDATE SKIP LOCKED`` (concurrent claimers skip each other's rows), on SQLite inside one
``BEGIN IMMEDIATE`` transaction (the single writer serialises claimers). A job whose lease
expired (its worker died) is claimable again; completion is conditional on still holding the
lease, so a job that runs twice is recorded once.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from sfumato.control_plane import pagination, uploads
from sfumato.control_plane.auth import Principal
from sfumato.control_plane.models import (
    FINAL_STATUSES,
    IdempotencyRecord,
    Image,
    Job,
    User,
    new_id,
    utcnow,
)
from sfumato.control_plane.schemas import GenerationCreate
from sfumato.control_plane.settings import Settings
from sfumato.control_plane.storage import ImageStore
from sfumato.errors import ConflictError, NotFoundError, RateLimitedError, UsageError
from sfumato.serving.request import MAX_SEED

ACTIVE = ("queued", "running")


# --------------------------------------------------------------------------- submission


def request_hash(body: GenerationCreate) -> str:
    canonical = json.dumps(
        body.model_dump(mode="json", exclude_none=True), sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


async def _idempotent_job(
    session: AsyncSession, *, principal: Principal, key: str, digest: str
) -> Job | None:
    record = await session.get(IdempotencyRecord, (principal.user_id, key))
    if record is None:
        return None
    if record.expires_at <= utcnow():
        await session.delete(record)
        await session.commit()
        return None
    if record.request_hash != digest:
        raise UsageError(
            "Idempotency-Key: this key was already used with a different request body",
            field="Idempotency-Key",
        )
    job = await session.get(Job, record.job_id) if record.job_id is not None else None
    if job is None:  # the job was deleted; the key is spent (until it expires)
        raise ConflictError("Idempotency-Key: the job created with this key has been deleted")
    return job


async def create_job(
    *,
    session: AsyncSession,
    settings: Settings,
    store: ImageStore,
    principal: Principal,
    body: GenerationCreate,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Record a new queued job (or return the one this idempotency key made); ``(job, created)``."""
    digest = request_hash(body)
    if idempotency_key is not None:
        if not 1 <= len(idempotency_key) <= 255:
            raise UsageError("Idempotency-Key: must be 1 to 255 characters", field="Idempotency-Key")
        existing = await _idempotent_job(session, principal=principal, key=idempotency_key, digest=digest)
        if existing is not None:
            return existing, False
    # Count and insert under a lock on the owner's row, so that concurrent submissions cannot
    # both see "limit - 1" and overshoot the cap. PostgreSQL: a row lock held until commit (the
    # count is a second statement, so that it reads after the lock is granted). SQLite needs
    # none: BEGIN IMMEDIATE already serialises writing transactions.
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        await session.execute(select(User.id).where(User.id == principal.user_id).with_for_update())
    active = await session.scalar(
        select(func.count()).select_from(Job).where(Job.owner_id == principal.user_id, Job.status.in_(ACTIVE))
    )
    if (active or 0) >= settings.max_queued_jobs_per_user:
        raise RateLimitedError(
            f"you have {active} unfinished jobs; the limit is {settings.max_queued_jobs_per_user}",
            retry_after=5,
            limit="queued_jobs",
        )
    if body.mask is not None and body.image is None:
        raise UsageError("mask: needs an image to inpaint", field="mask")
    if body.strength is not None and body.image is None:
        raise UsageError("strength: only applies with an image", field="strength")
    job_id = new_id()
    params = body.model_dump(mode="json", exclude_none=True, exclude={"image", "mask"})
    # Fix the seed now: a retried or re-claimed job then draws exactly the same images.
    params.setdefault("seed", secrets.randbelow(MAX_SEED - 16))
    inputs: dict[str, bytes] = {}
    if body.image is not None:
        image = await uploads.read_image(
            body.image,
            field="image",
            mode="RGB",
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
        )
        for name, value, actual in (
            ("width", body.width, image.width),
            ("height", body.height, image.height),
        ):
            if value is not None and value != actual:
                raise UsageError(f"{name}: {value} does not match the image's {actual}", field=name)
        inputs["image"] = image.png
        if body.mask is not None:
            mask = await uploads.read_image(
                body.mask,
                field="mask",
                mode="L",
                max_bytes=settings.max_image_bytes,
                max_pixels=settings.max_image_pixels,
            )
            if (mask.width, mask.height) != (image.width, image.height):
                raise UsageError(
                    f"mask: {mask.width}x{mask.height} does not match the image's "
                    f"{image.width}x{image.height}",
                    field="mask",
                )
            inputs["mask"] = mask.png
    for name, data in inputs.items():
        key = f"inputs/{job_id}/{name}.png"
        await store.put(key, data)
        params[f"{name}_key"] = key
    job = Job(
        id=job_id,
        owner_id=principal.user_id,
        status="queued",
        params=params,
        model_name=settings.model_name,
        images=[],
    )
    session.add(job)
    try:
        # The record's foreign key needs the job row first, and with no ORM relationship between
        # the two the unit of work would not order the inserts: flush the job on its own.
        await session.flush()
        if idempotency_key is not None:
            session.add(
                IdempotencyRecord(
                    principal=principal.user_id,
                    key=idempotency_key,
                    request_hash=digest,
                    job_id=job_id,
                    expires_at=utcnow() + timedelta(seconds=settings.idempotency_ttl_s),
                )
            )
        await session.commit()
    except IntegrityError:  # the same key raced us; answer with the winner's job
        await session.rollback()
        for key in inputs:
            await store.delete(params[f"{key}_key"])
        existing = await _idempotent_job(
            session, principal=principal, key=idempotency_key or "", digest=digest
        )
        if existing is None:
            raise
        return existing, False
    return job, True


async def purge_expired_idempotency(
    *, session: AsyncSession, now: datetime | None = None, batch: int = 1000
) -> int:
    """Delete Idempotency-Key records past their TTL, ``batch`` rows per transaction; the count.

    A key is also dropped lazily when it is reused after expiry; this sweep (run by the workers'
    maintenance task) keeps keys that are never reused from piling up.
    """
    cutoff = now or utcnow()
    total = 0
    while True:
        doomed = (
            select(IdempotencyRecord.principal, IdempotencyRecord.key)
            .where(IdempotencyRecord.expires_at <= cutoff)
            .limit(batch)
        )
        result = await session.execute(
            delete(IdempotencyRecord)
            .where(tuple_(IdempotencyRecord.principal, IdempotencyRecord.key).in_(doomed))
            .execution_options(synchronize_session=False)
        )
        await session.commit()
        total += result.rowcount or 0
        if (result.rowcount or 0) < batch:
            return total


# --------------------------------------------------------------------------- reads


async def get_job(*, session: AsyncSession, principal: Principal, job_id: str) -> Job:
    """The caller's job; another user's job is indistinguishable from a missing one."""
    job = await session.get(Job, job_id, populate_existing=True)
    if job is None or job.owner_id != principal.user_id:
        raise NotFoundError(f"no generation {job_id}")
    return job


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Job]
    next_cursor: str | None


async def list_jobs(
    *, session: AsyncSession, principal: Principal, limit: int, cursor: str | None, status: str | None
) -> Page:
    """The caller's jobs, newest first, keyset-paginated on (created_at, id)."""
    query = select(Job).where(Job.owner_id == principal.user_id)
    if status is not None:
        query = query.where(Job.status == status)
    if cursor is not None:
        after = pagination.decode_cursor(cursor)
        query = query.where(
            or_(
                Job.created_at < after.created_at,
                and_(Job.created_at == after.created_at, Job.id < after.id),
            )
        )
    rows = list(
        (await session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1))).all()
    )
    more = len(rows) > limit
    items = rows[:limit]
    last = items[-1] if more and items else None
    return Page(items=items, next_cursor=pagination.encode_cursor(last.created_at, last.id) if last else None)


# --------------------------------------------------------------------------- cancel / delete


async def cancel_job(*, session: AsyncSession, principal: Principal, job_id: str) -> Job:
    """Queued: canceled at once. Running: flagged; the worker cancels the Triton call."""
    job = await get_job(session=session, principal=principal, job_id=job_id)
    if job.status in FINAL_STATUSES:
        raise ConflictError(f"generation {job_id} is already {job.status}")
    now = utcnow()
    result = await session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(
            status="canceled", finished_at=now, cancel_requested=True, lease_owner=None, lease_expires_at=None
        )
    )
    if result.rowcount == 0:
        await session.execute(
            update(Job).where(Job.id == job_id, Job.status == "running").values(cancel_requested=True)
        )
    await session.commit()
    return await get_job(session=session, principal=principal, job_id=job_id)


async def delete_job(*, session: AsyncSession, store: ImageStore, principal: Principal, job_id: str) -> None:
    """Remove the record, its images and its inputs. A running job's worker finds it gone and stops.

    An Idempotency-Key that made the job stays, pointing at no job: until it expires, the key
    answers 409 (spent) instead of silently making a new job."""
    job = await get_job(session=session, principal=principal, job_id=job_id)
    keys = [img.storage_key for img in job.images] + [
        job.params[k] for k in ("image_key", "mask_key") if k in job.params
    ]
    await session.execute(
        update(IdempotencyRecord).where(IdempotencyRecord.job_id == job_id).values(job_id=None)
    )
    await session.execute(delete(Job).where(Job.id == job_id))
    await session.commit()
    for key in keys:
        await store.delete(key)


# --------------------------------------------------------------------------- workers


async def claim_next(*, session: AsyncSession, worker_id: str, lease_s: float) -> Job | None:
    """Take the oldest claimable job: queued and due, or running with an expired lease."""
    now = utcnow()
    claimable = or_(
        and_(Job.status == "queued", Job.available_at <= now),
        and_(Job.status == "running", Job.lease_expires_at < now),
    )
    query = select(Job).where(claimable).order_by(Job.available_at, Job.created_at).limit(1)
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    job = await session.scalar(query)
    if job is None:
        await session.rollback()
        return None
    job.status = "running"
    job.lease_owner = worker_id
    job.lease_expires_at = now + timedelta(seconds=lease_s)
    job.attempts += 1
    job.started_at = now
    job.progress = 0.1
    await session.commit()
    return job


async def extend_lease(*, session: AsyncSession, job_id: str, worker_id: str, lease_s: float) -> str | None:
    """Heartbeat. Returns ``"cancel"`` when cancellation was asked, ``"lost"`` when the job is no
    longer ours (deleted, or re-claimed after our lease expired), else ``None``."""
    result = await session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == worker_id, Job.status == "running")
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
        .returning(Job.cancel_requested)
    )
    row = result.first()
    await session.commit()
    if row is None:
        return "lost"
    return "cancel" if row[0] else None


async def _owned(session: AsyncSession, job_id: str, worker_id: str) -> Job | None:
    query = select(Job).where(Job.id == job_id, Job.lease_owner == worker_id, Job.status == "running")
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        query = query.with_for_update()
    return await session.scalar(query.execution_options(populate_existing=True))


async def complete_job(
    *,
    session: AsyncSession,
    job_id: str,
    worker_id: str,
    images: list[dict[str, Any]],
    inference_s: float,
    model_version: str = "",
) -> bool:
    """Record success and the images, once: only while this worker still holds the lease."""
    job = await _owned(session, job_id, worker_id)
    if job is None:
        await session.rollback()
        return False
    for image in images:
        session.add(Image(job_id=job_id, **image))
    job.status = "succeeded"
    job.progress = 1.0
    job.finished_at = utcnow()
    job.inference_s = inference_s
    job.model_version = model_version
    job.error = None
    job.lease_owner = None
    job.lease_expires_at = None
    await session.commit()
    return True


async def finish_job(
    *, session: AsyncSession, job_id: str, worker_id: str, status: str, error: str | None
) -> bool:
    """Record ``failed`` or ``canceled`` (while holding the lease)."""
    job = await _owned(session, job_id, worker_id)
    if job is None:
        await session.rollback()
        return False
    job.status = status
    job.error = error
    job.finished_at = utcnow()
    job.lease_owner = None
    job.lease_expires_at = None
    await session.commit()
    return True


async def retry_later(
    *, session: AsyncSession, job_id: str, worker_id: str, delay_s: float, error: str
) -> bool:
    """Give the job back to the queue after a transient failure, due again in ``delay_s``."""
    job = await _owned(session, job_id, worker_id)
    if job is None:
        await session.rollback()
        return False
    job.status = "queued"
    job.error = error
    job.progress = 0.0
    job.available_at = utcnow() + timedelta(seconds=delay_s)
    job.lease_owner = None
    job.lease_expires_at = None
    await session.commit()
    return True


async def release_job(*, session: AsyncSession, job_id: str, worker_id: str) -> bool:
    """Graceful shutdown: hand an unfinished job back at once, not counting the attempt."""
    job = await _owned(session, job_id, worker_id)
    if job is None:
        await session.rollback()
        return False
    job.status = "queued"
    job.attempts = max(job.attempts - 1, 0)
    job.progress = 0.0
    job.available_at = utcnow()
    job.lease_owner = None
    job.lease_expires_at = None
    await session.commit()
    return True
