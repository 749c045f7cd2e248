"""Trainings: job records in the ``trainings`` queue, and what the runner and the training write.

A training is a row of ``jobs`` with ``queue = "trainings"``: the same lease protocol
(:mod:`sfumato.control_plane.leases`, ``claim(queue="trainings")``) as generations, so a runner
that died leaves a training that another runner claims again (and resumes from its last
checkpoint). Its parameters are in ``params``; what it reports while it runs (step, loss, ETA,
validation images, the version it made) in ``details``.

Who may train: the ``trainer`` and ``admin`` roles (a training takes a machine's CPU or GPU for
minutes to hours); a ``member`` gets 403.

Plain functions taking a keyword-only ``session``; each ends its transaction before it returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import raiseload

from sfumato.control_plane import events, jobs, pagination, webhooks
from sfumato.control_plane.auth import Principal
from sfumato.control_plane.models import FINAL_STATUSES, Dataset, Job, new_id, utcnow
from sfumato.control_plane.settings import Settings
from sfumato.control_plane.training_schemas import (
    TrainingCreate,
    TrainingOut,
    TrainingOutput,
    TrainingProgress,
    ValidationImage,
)
from sfumato.errors import ConflictError, NotFoundError, PermissionDeniedError, RateLimitedError, UsageError

QUEUE = "trainings"
TRAINER_ROLES = frozenset({"trainer", "admin"})
DEFAULT_EPOCHS = 100
DEFAULT_RANK = 4
MAX_ACTIVE_PER_USER = 4


HIDDEN = ("dataset_prefix", "base_pipeline_prefix")


def to_out(job: Job) -> TrainingOut:
    """A training as the API shows it (``GET /v1/trainings/{id}``, its events)."""
    details = job.details or {}
    params = job.params
    output = details.get("output")
    return TrainingOut(
        id=job.id,
        status=job.status,  # type: ignore[arg-type]
        progress=TrainingProgress(
            step=details.get("step", 0),
            total=details.get("total", params["steps"]),
            loss=details.get("loss"),
            eta_s=details.get("eta_s") if job.status == "running" else None,
        ),
        params={k: v for k, v in params.items() if k not in HIDDEN},
        dataset_id=params["dataset_id"],
        base_model=params["base_model"],
        method=params["method"],
        estimated_duration_s=params.get("estimated_duration_s", 0.0),
        validation_images=[
            ValidationImage(index=i, prompt=image["prompt"], url=f"/v1/trainings/{job.id}/validation/{i}")
            for i, image in enumerate(details.get("validation", []))
        ],
        output=TrainingOutput(**output) if output else None,
        weights_url=f"/v1/trainings/{job.id}/weights"
        if job.status == "succeeded" and params["method"] == "lora"
        else None,
        attempts=job.attempts,
        error=job.error,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        webhook=job.webhook,
        webhook_events_filter=job.webhook_events if job.webhook else None,
    )


def require_trainer(principal: Principal) -> None:
    if principal.role not in TRAINER_ROLES:
        raise PermissionDeniedError("training needs the trainer or admin role")


async def _default_model(session: AsyncSession, settings: Settings) -> str:
    """The model new generations get: the registry's default, else ``SFUMATO_MODEL_NAME``."""
    from sfumato.control_plane.models import RegisteredModel

    name = await session.scalar(select(RegisteredModel.name).where(RegisteredModel.is_default.is_(True)))
    return name or settings.model_name


async def _base(session: AsyncSession, settings: Settings, name: str) -> dict[str, Any]:
    """Where a training of ``name`` starts: the registry's deployed version of it, whose lineage
    names the diffusers folder a training stored (``pipeline_prefix``); the served model
    (``SFUMATO_MODEL_NAME``) without one starts from ``SFUMATO_TRAINING_BASE_DIR``."""
    from sfumato.control_plane.models import RegisteredModel

    row = await session.get(RegisteredModel, name)
    if row is None:
        if name != settings.model_name:
            raise UsageError(f"base_model: no registered model {name!r} (GET /v1/models)", field="base_model")
        return {"base_version": None, "base_pipeline_prefix": None}
    deployed = next((v for v in row.versions if v.deployed), None)
    return {
        "base_version": deployed.version if deployed else None,
        "base_pipeline_prefix": (deployed.lineage or {}).get("pipeline_prefix") if deployed else None,
    }


def total_steps(body: TrainingCreate, *, num_images: int, settings: Settings) -> int:
    if body.steps is not None:
        steps = body.steps
    else:
        epochs = body.epochs or DEFAULT_EPOCHS
        steps = epochs * math.ceil(num_images / body.batch_size)
    if steps > settings.max_training_steps:
        field = "steps" if body.steps else "epochs"
        raise UsageError(
            f"{field}: {steps} steps; the limit is {settings.max_training_steps}",
            field=field,
        )
    return steps


def estimated_duration_s(params: dict[str, Any], settings: Settings) -> float:
    """Steps over the expected speed (``SFUMATO_TRAINING_STEPS_PER_S`` at batch 16; a smaller
    batch is not proportionally faster), plus a minute for loading, fusing and exporting."""
    per_step = max(params["batch_size"], 4) / 16 / settings.training_steps_per_s
    return round(params["steps"] * per_step + 60.0, 1)


async def create_training(
    *, session: AsyncSession, settings: Settings, principal: Principal, body: TrainingCreate
) -> Job:
    require_trainer(principal)
    if body.webhook is not None:  # what the operator allows (https, public hosts, listed http hosts)
        webhooks.check_target(body.webhook, settings)
    base_model = body.base_model or await _default_model(session, settings)
    base = await _base(session, settings, base_model)
    dataset = await session.get(Dataset, body.dataset_id)
    if dataset is None or dataset.owner_id != principal.user_id:
        await session.rollback()
        raise UsageError(f"dataset_id: no dataset {body.dataset_id}", field="dataset_id")
    active = await session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.owner_id == principal.user_id, Job.queue == QUEUE, Job.status.in_(("queued", "running")))
    )
    if (active or 0) >= MAX_ACTIVE_PER_USER:
        await session.rollback()
        raise RateLimitedError(
            f"you have {active} unfinished trainings; the limit is {MAX_ACTIVE_PER_USER}",
            retry_after=60,
            limit="queued_trainings",
        )
    params = body.model_dump(mode="json", exclude={"steps", "epochs", "webhook", "webhook_events_filter"})
    params.update(
        base_model=base_model,
        **base,
        output_model=body.output_model or base_model,
        steps=total_steps(body, num_images=dataset.num_images, settings=settings),
        epochs=body.epochs,
        rank=body.rank or DEFAULT_RANK if body.method == "lora" else None,
        dataset_prefix=dataset.storage_prefix,
        dataset_sha256=dataset.sha256,
        num_images=dataset.num_images,
    )
    params["estimated_duration_s"] = estimated_duration_s(params, settings)
    job = Job(
        id=new_id(),
        owner_id=principal.user_id,
        status="queued",
        queue=QUEUE,
        params=params,
        model_name=base_model,
        details={"step": 0, "total": params["steps"], "loss": None, "eta_s": None, "history": []},
        images=[],
        webhook=body.webhook,
        webhook_events=body.webhook_events_filter,
    )
    session.add(job)
    if body.webhook is not None:  # the user's signing secret exists before the first delivery
        await webhooks.ensure_secret(session=session, user_id=principal.user_id)
    await session.commit()
    return job


async def read_training(*, session: AsyncSession, principal: Principal, training_id: str) -> Job:
    """The caller's training (another user's is as missing as one that never was)."""
    try:
        job = await session.get(Job, training_id, populate_existing=True)
        if job is None or job.owner_id != principal.user_id or job.queue != QUEUE:
            raise NotFoundError(f"no training {training_id}")
        return job
    finally:
        await session.commit()


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Job]
    next_cursor: str | None


async def list_trainings(
    *, session: AsyncSession, principal: Principal, limit: int, cursor: str | None, status: str | None
) -> Page:
    query = select(Job).where(Job.owner_id == principal.user_id, Job.queue == QUEUE)
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
    await session.commit()
    more = len(rows) > limit
    items = rows[:limit]
    last = items[-1] if more and items else None
    return Page(items=items, next_cursor=pagination.encode_cursor(last.created_at, last.id) if last else None)


async def cancel_training(*, session: AsyncSession, principal: Principal, training_id: str) -> Job:
    """Queued: canceled at once. Running: flagged; the runner's next heartbeat stops the
    training process (within ``SFUMATO_HEARTBEAT_S``) and records ``canceled``."""
    job = await read_training(session=session, principal=principal, training_id=training_id)
    if job.status in FINAL_STATUSES:
        raise ConflictError(f"training {training_id} is already {job.status}")
    if await jobs.request_cancel(session=session, job_id=training_id):  # canceled at once: final now
        job = await session.get(Job, training_id, populate_existing=True)
        await jobs.publish_state(session=session, job=job)
    await session.commit()
    return await read_training(session=session, principal=principal, training_id=training_id)


def weights_key(training_id: str) -> str:
    return f"trainings/{training_id}/weights/pytorch_lora_weights.safetensors"


def checkpoint_key(training_id: str) -> str:
    return f"trainings/{training_id}/checkpoint.pt"


def validation_key(training_id: str, index: int) -> str:
    return f"trainings/{training_id}/validation/{index}.png"


async def weights_of(*, session: AsyncSession, principal: Principal, training_id: str) -> str:
    """The store key of a succeeded LoRA training's weights file."""
    job = await read_training(session=session, principal=principal, training_id=training_id)
    if job.params.get("method") != "lora":
        raise NotFoundError(f"training {training_id} is a full fine-tune: it has no LoRA file")
    if job.status != "succeeded":
        raise ConflictError(f"training {training_id} is {job.status}; its weights come once it succeeded")
    return weights_key(training_id)


async def validation_image_of(
    *, session: AsyncSession, principal: Principal, training_id: str, index: int
) -> str:
    job = await read_training(session=session, principal=principal, training_id=training_id)
    images = (job.details or {}).get("validation", [])
    if not 0 <= index < len(images):
        raise NotFoundError(f"training {training_id} has no validation image {index}")
    return images[index]["key"]


# --------------------------------------------------------------------------- the training's side


async def load_training(*, session: AsyncSession, training_id: str) -> Job:
    """A training record for the process that runs it (no owner check: the runner started it)."""
    try:
        job = await session.get(Job, training_id, options=[raiseload(Job.images)])
        if job is None or job.queue != QUEUE:
            raise NotFoundError(f"no training {training_id}")
        return job
    finally:
        await session.commit()


async def report(
    *, session: AsyncSession, training_id: str, details: dict[str, Any], progress: float
) -> bool:
    """Write the running training's ``details`` (merged) and ``progress``; False when it is no
    longer running (canceled, deleted, finished: the process should stop). The row is locked
    while ``details`` is merged (PostgreSQL; SQLite has one writer): two reports at once must not
    lose each other's keys."""
    query = (
        select(Job)
        .options(raiseload(Job.images))
        .where(Job.id == training_id)
        .execution_options(populate_existing=True)
    )
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        query = query.with_for_update()
    job = await session.scalar(query)
    if job is None or job.status != "running":
        await session.rollback()
        return False
    job.details = {**(job.details or {}), **details}
    job.progress = progress
    if "step" in details:
        await events.publish(
            session=session,
            job_id=training_id,
            kind="progress",
            data={k: job.details.get(k) for k in ("step", "total", "loss", "eta_s")} | {"progress": progress},
        )
    await session.commit()
    return True


async def complete(*, session: AsyncSession, training_id: str, worker_id: str) -> datetime | None:
    """The runner records success (only while it holds the lease); the finish time, or None."""
    query = (
        select(Job)
        .options(raiseload(Job.images))
        .where(Job.id == training_id, Job.lease_owner == worker_id, Job.status == "running")
    )
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        query = query.with_for_update()
    job = await session.scalar(query)
    if job is None:
        await session.rollback()
        return None
    job.status = "succeeded"
    job.progress = 1.0
    job.finished_at = utcnow()
    job.lease_owner = None
    job.lease_expires_at = None
    job.error = None
    await jobs.publish_state(session=session, job=job, images=[])
    finished = job.finished_at
    await session.commit()
    return finished
