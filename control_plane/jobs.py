"""Generation jobs: submission (idempotent), reads, waiting, cancel, retry and delete.

Plain functions taking a keyword-only ``session``; routers call them, and every one of them ends
its transaction before it returns (routers neither query nor commit; on SQLite an open
transaction holds the writer lock). A job is committed before any work starts. What workers do
with a job (claim, heartbeat, complete, requeue, ...) is the lease protocol, in
:mod:`sfumato.control_plane.leases`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from sfumato.control_plane import events, pagination, registry, uploads, webhooks
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
from sfumato.control_plane.pagination import Page
from sfumato.control_plane.schemas import GenerationCreate, GenerationOut, ImageOut, Timings
from sfumato.control_plane.settings import Settings
from sfumato.control_plane.storage import ImageStore
from sfumato.control_plane.triton_gateway import TritonGateway
from sfumato.errors import ConflictError, NotFoundError, RateLimitedError, UsageError
from sfumato.serving.contract import JOB_OPTION_NAMES
from sfumato.serving.request import MAX_SEED

ACTIVE = ("queued", "running")


# --------------------------------------------------------------------------- the resource and its events


def to_out(job: Job, images: list[Image] | None = None) -> GenerationOut:
    """The generation resource as ``GET /v1/generations/{id}`` returns it (``images``: instead
    of ``job.images``, for a job whose images are not loaded)."""
    images = job.images if images is None else images
    created = job.created_at
    timings = Timings(
        queued_s=(job.started_at - created).total_seconds() if job.started_at else None,
        inference_s=job.inference_s,
        total_s=(job.finished_at - created).total_seconds() if job.finished_at else None,
    )
    params = {k: v for k, v in job.params.items() if not k.endswith("_key")}
    params.update({k[:-4]: True for k in job.params if k.endswith("_key")})
    return GenerationOut(
        id=job.id,
        status=job.status,  # type: ignore[arg-type]
        progress=job.progress,
        params=params,
        model={"name": job.model_name, "version": job.model_version},
        attempts=job.attempts,
        error=job.error,
        created_at=created,
        started_at=job.started_at,
        finished_at=job.finished_at,
        timings=timings,
        seeds=[img.seed for img in images],
        images=[
            ImageOut(
                index=img.index,
                url=f"/v1/generations/{job.id}/images/{img.index}",
                seed=img.seed,
                width=img.width,
                height=img.height,
                sha256=img.sha256,
            )
            for img in images
        ],
        webhook=job.webhook,
        webhook_events_filter=job.webhook_events if job.webhook else None,
    )


def resource(job: Job, images: list[Image] | None = None) -> dict[str, Any]:
    """The job's resource as JSON data (of its ``status`` and ``completed`` events): a
    generation's, or a training's as ``GET /v1/trainings/{id}`` answers it."""
    if job.queue == "trainings":
        from sfumato.control_plane.trainings import to_out as training_out

        return training_out(job).model_dump(mode="json")
    return to_out(job, images).model_dump(mode="json")


async def publish_state(
    *,
    session: AsyncSession,
    job: Job,
    images: list[Image] | None = None,
    kind: str | None = None,
    new: bool = False,
) -> None:
    """Publish the job's state as it now stands in this transaction: ``completed`` once it is
    final (and its progress events dropped), else ``status``. ``new``: created in this
    transaction."""
    final = job.status in FINAL_STATUSES
    kind = kind or ("completed" if final else "status")
    await events.publish_many(session=session, events=[(job.id, kind, resource(job, images))], new=new)
    if final:  # after numbering the event: the numbers never go back
        await events.drop_progress(session=session, job_id=job.id)


# --------------------------------------------------------------------------- submission


def request_hash(body: GenerationCreate) -> str:
    canonical = json.dumps(
        body.model_dump(mode="json", exclude_none=True), sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


async def _check_unfinished_cap(session: AsyncSession, *, settings: Settings, principal: Principal) -> None:
    """Raise 429 when the caller already has ``max_queued_jobs_per_user`` unfinished jobs.

    Counted under a lock on the owner's row, so that concurrent submissions cannot both see
    "limit - 1" and overshoot the cap. PostgreSQL: a row lock held until commit (the count is a
    second statement, so that it reads after the lock is granted). SQLite needs none: BEGIN
    IMMEDIATE already serialises writing transactions.
    """
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        await session.execute(select(User.id).where(User.id == principal.user_id).with_for_update())
    active = await session.scalar(
        select(func.count()).select_from(Job).where(Job.owner_id == principal.user_id, Job.status.in_(ACTIVE))
    )
    if (active or 0) >= settings.max_queued_jobs_per_user:
        await session.rollback()
        raise RateLimitedError(
            f"you have {active} unfinished jobs; the limit is {settings.max_queued_jobs_per_user}",
            retry_after=5,
            limit="queued_jobs",
        )


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
    triton: TritonGateway | None = None,
) -> tuple[Job, bool]:
    """Record a new queued job (or return the one this idempotency key made); ``(job, created)``.

    With ``triton``, the model version that serves it is chosen now (``model`` /
    ``model_version``, else the deployed default; :func:`registry.choose`) and recorded in the
    job, and the request is checked against that model's limits (422 naming the field)."""
    digest = request_hash(body)
    if idempotency_key is not None:
        if not 1 <= len(idempotency_key) <= 255:
            raise UsageError("Idempotency-Key: must be 1 to 255 characters", field="Idempotency-Key")
        existing = await _idempotent_job(session, principal=principal, key=idempotency_key, digest=digest)
        if existing is not None:
            await session.commit()
            return existing, False
    chosen: registry.Chosen | None = None
    served = None
    if triton is not None:
        await session.commit()  # end the reads so far: no transaction is open while Triton is asked
        chosen = await registry.choose(session=session, model=body.model, version=body.model_version)
        await session.commit()
        served = await registry.check_limits(
            triton=triton, chosen=chosen, fields=body.model_dump(exclude_none=True, exclude={"image", "mask"})
        )
    await _check_unfinished_cap(session, settings=settings, principal=principal)
    if body.mask is not None and body.image is None:
        raise UsageError("mask: needs an image to inpaint", field="mask")
    if body.strength is not None and body.image is None:
        raise UsageError("strength: only applies with an image", field="strength")
    job_id = new_id()
    if body.webhook is not None:  # what the operator allows (https, public hosts, listed http hosts)
        webhooks.check_target(body.webhook, settings)
    params = body.model_dump(
        mode="json", exclude_none=True, exclude={"image", "mask", "model", "model_version", *JOB_OPTION_NAMES}
    )
    if chosen is not None:  # what serves it, fixed now: a deploy meanwhile changes new jobs only
        params.update(model=chosen.model, model_version=chosen.version)
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
        registry.check_image_size(served, width=image.width, height=image.height)
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
        model_name=chosen.model if chosen is not None else settings.model_name,
        model_version=str(chosen.version) if chosen is not None else "",
        images=[],
        webhook=body.webhook,
        webhook_events=body.webhook_events_filter,
    )
    if body.webhook is not None:  # the user's signing secret exists before the first delivery
        await webhooks.ensure_secret(session=session, user_id=principal.user_id)
    session.add(job)
    try:
        # The record's foreign key needs the job row first, and with no ORM relationship between
        # the two the unit of work would not order the inserts: flush the job on its own.
        await session.flush()
        await publish_state(session=session, job=job, images=[], new=True)
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
        await session.commit()
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


async def get_job(
    *, session: AsyncSession, principal: Principal, job_id: str, queue: str = "generations"
) -> Job:
    """The caller's job of ``queue`` (a generation, or a training); another user's job is
    indistinguishable from a missing one. (Inside a transaction that the caller goes on with;
    :func:`read_job` ends it.)"""
    job = await session.get(Job, job_id, populate_existing=True)
    if job is None or job.owner_id != principal.user_id or job.queue != queue:
        raise NotFoundError(f"no {'generation' if queue == 'generations' else 'training'} {job_id}")
    return job


async def read_job(*, session: AsyncSession, principal: Principal, job_id: str) -> Job:
    """The caller's job, read in a transaction that is over when this returns."""
    try:
        return await get_job(session=session, principal=principal, job_id=job_id)
    finally:
        await session.commit()  # end the read transaction now (SQLite: free the writer lock)


async def read_image(*, session: AsyncSession, principal: Principal, job_id: str, index: int) -> Image:
    """Image ``index`` of the caller's job."""
    job = await read_job(session=session, principal=principal, job_id=job_id)
    image = next((img for img in job.images if img.index == index), None)
    if image is None:
        raise NotFoundError(f"generation {job_id} has no image {index}")
    return image


async def job_exists(*, session: AsyncSession, job_id: str) -> bool:
    """Whether the job is still there (whoever owns it)."""
    try:
        return await session.scalar(select(Job.id).where(Job.id == job_id)) is not None
    finally:
        await session.commit()


async def wait_for_job(
    *, session: AsyncSession, hub: events.EventHub, principal: Principal, job: Job, wait_s: float
) -> Job:
    """``Prefer: wait``: the job once it is final, or as it is after ``wait_s`` seconds.

    Woken by the job's ``completed`` event (no polling): it listens first, then reads the job
    once (so a change in between is not missed), and reads it again when the event comes. Each
    read is its own short transaction; nothing is held while waiting."""
    if job.status in FINAL_STATUSES or wait_s <= 0:
        return job
    deadline = time.monotonic() + wait_s
    with hub.listen(job.id) as subscription:
        job = await read_job(session=session, principal=principal, job_id=job.id)
        while job.status not in FINAL_STATUSES:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            event = await subscription.get(min(left, hub.resync_s))
            if event is None and time.monotonic() >= deadline:
                break  # (read once more below)
            if event is None or event.kind == "completed":  # done, or re-read to be sure
                job = await read_job(session=session, principal=principal, job_id=job.id)
    if job.status not in FINAL_STATUSES:  # timed out: as it is now
        job = await read_job(session=session, principal=principal, job_id=job.id)
    return job


@dataclass(frozen=True, slots=True)
class EventStream:
    """Where a client's event stream of one job starts (:func:`open_event_stream`)."""

    job_id: str
    first: list[events.JobEvent]  # sent before the live events
    after_seq: int  # the live events follow this one
    done: bool  # ``first`` ends with the ``completed`` event: nothing follows


async def open_event_stream(
    *,
    session: AsyncSession,
    principal: Principal,
    job_id: str,
    last_event_id: int | None,
    queue: str = "generations",
) -> EventStream:
    """The start of an SSE / WebSocket stream of the caller's job (another user's job is
    :class:`NotFoundError`). A new stream starts with the job as it stands (a ``status`` event,
    or ``completed`` when it is final) numbered as the job's latest event; a resumed one
    (``Last-Event-ID``) with the stored events after that id. A job that is final and whose
    events were purged still ends its stream with a ``completed`` event."""
    job = await get_job(session=session, principal=principal, job_id=job_id, queue=queue)
    final = job.status in FINAL_STATUSES
    if last_event_id is None:
        seq = await events.last_seq(session=session, job_id=job_id)
        await session.commit()
        kind = "completed" if final else "status"
        now = events.JobEvent(job.id, seq, kind, resource(job), utcnow())
        return EventStream(job_id=job.id, first=[now], after_seq=seq, done=final)
    last = await events.last_seq(session=session, job_id=job_id)
    stored = await events.history(session=session, job_id=job_id, after_seq=last_event_id)
    done = any(e.kind == "completed" for e in stored)
    if final and not done:
        stored.append(events.JobEvent(job.id, max(last, last_event_id), "completed", resource(job), utcnow()))
        done = True
    return EventStream(
        job_id=job.id, first=stored, after_seq=stored[-1].seq if stored else last_event_id, done=done
    )


async def follow_events(*, hub: events.EventHub, stream: EventStream) -> AsyncIterator[events.JobEvent]:
    """The events of a stream opened with :func:`open_event_stream`, until ``completed`` (or the
    job is deleted)."""
    for event in stream.first:
        yield event
    if stream.done:
        return
    async for event in hub.subscribe(stream.job_id, after_seq=stream.after_seq):
        yield event
        if event.kind == "completed":
            return


async def list_jobs(
    *, session: AsyncSession, principal: Principal, limit: int, cursor: str | None, status: str | None
) -> Page[Job]:
    """The caller's jobs, newest first, keyset-paginated on (created_at, id)."""
    query = select(Job).where(Job.owner_id == principal.user_id, Job.queue == "generations")
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
    await session.commit()  # end the read transaction now, not after the response is sent
    more = len(rows) > limit
    items = rows[:limit]
    last = items[-1] if more and items else None
    return Page(items=items, next_cursor=pagination.encode_cursor(last.created_at, last.id) if last else None)


# --------------------------------------------------------------------------- cancel / retry / delete


async def request_cancel(*, session: AsyncSession, job_id: str) -> bool:
    """In the caller's transaction: a queued job is canceled at once (True); a running one is
    flagged for its worker or runner, which stops it (False)."""
    result = await session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(
            status="canceled",
            finished_at=utcnow(),
            cancel_requested=True,
            lease_owner=None,
            lease_expires_at=None,
        )
    )
    if result.rowcount:
        return True
    await session.execute(
        update(Job).where(Job.id == job_id, Job.status == "running").values(cancel_requested=True)
    )
    return False


async def cancel_job(*, session: AsyncSession, principal: Principal, job_id: str) -> Job:
    """Queued: canceled at once. Running: flagged; the worker cancels the Triton call."""
    job = await get_job(session=session, principal=principal, job_id=job_id)
    if job.status in FINAL_STATUSES:
        raise ConflictError(f"generation {job_id} is already {job.status}")
    if await request_cancel(session=session, job_id=job_id):  # canceled at once: final now
        job = await get_job(session=session, principal=principal, job_id=job_id)
        await publish_state(session=session, job=job)
    await session.commit()
    return await read_job(session=session, principal=principal, job_id=job_id)


RETRYABLE = frozenset({"failed", "canceled"})


async def retry_job(*, session: AsyncSession, settings: Settings, principal: Principal, job_id: str) -> Job:
    """Queue a failed or canceled job of the caller's again, as new: attempts, error, outage
    clock and timings reset, the parameters kept, the seed among them, so that it draws the
    images a first run would have drawn. It counts against the caller's unfinished-jobs cap."""
    status = (await get_job(session=session, principal=principal, job_id=job_id)).status
    if status not in RETRYABLE:
        await session.rollback()
        raise ConflictError(f"generation {job_id} is {status}; only a failed or canceled one can be retried")
    await _check_unfinished_cap(session, settings=settings, principal=principal)
    result = await session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(RETRYABLE))
        .values(
            status="queued",
            attempts=0,
            error=None,
            progress=0.0,
            cancel_requested=False,
            outage_since=None,
            available_at=utcnow(),
            started_at=None,
            finished_at=None,
            inference_s=None,
            lease_owner=None,
            lease_expires_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 0:  # retried or deleted by a concurrent request meanwhile
        await session.rollback()
        raise ConflictError(f"generation {job_id} changed meanwhile; read it and try again")
    queued = await get_job(session=session, principal=principal, job_id=job_id)
    await publish_state(session=session, job=queued)
    await session.commit()
    return await read_job(session=session, principal=principal, job_id=job_id)


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
