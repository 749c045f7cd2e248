"""Workers: keep Triton's ``pipeline`` model full with claimed jobs, fairly, through outages.

A :class:`Worker` holds many jobs in flight, each an asyncio task, up to its *capacity*: the
``pipeline`` model's instance count read from Triton (``SFUMATO_WORKER_CAPACITY`` overrides it),
so that REST jobs reach Triton's dynamic batcher concurrently, as direct gRPC callers do.
``sfumato serve`` runs ``SFUMATO_WORKERS`` workers in-process (one is the default, and enough:
one worker fills the pipeline); ``sfumato worker`` runs them alone, to scale out.

* **Claims** take as many jobs as there are free slots in one transaction, fairly across owners
  (:func:`sfumato.control_plane.leases.claim`: the oldest job of the owner with the fewest jobs
  running first), and one user's jobs hold at most ``SFUMATO_MAX_USER_SHARE`` of a worker's
  slots, so that another user's job starts at once however much one user has queued. An idle
  worker waits ``SFUMATO_POLL_INTERVAL_S`` between claims (:meth:`Worker.wait_for_work`, the one
  place a job-event channel will plug in); a job that ends wakes it at once.
* **One heartbeat loop per worker** extends the leases of all its jobs in one statement every
  ``SFUMATO_HEARTBEAT_S`` and learns which were canceled (their Triton call is cancelled, which
  Triton passes on to the model) or lost (deleted, or re-claimed after the lease expired).
* **Outages.** While Triton is not ready (the gateway's cached readiness), the worker claims
  nothing; a call that finds Triton unavailable puts its job back without spending an attempt.
  A job waits out an outage for up to ``SFUMATO_MAX_OUTAGE_S``, then fails saying so. Other
  transient errors (deadline exceeded, Triton's queue full) retry with exponential backoff up to
  ``SFUMATO_MAX_ATTEMPTS``; invalid arguments fail at once with Triton's message.
* **Shutdown** stops claiming, cancels the Triton calls in flight and hands their jobs back.
  Every task here ends when cancelled: database writes run to completion first
  (:func:`run_to_completion`, bounded), everything else is cancelled where it waits.

Beside the workers, :func:`run_maintenance` sweeps expired Idempotency-Key records and finished
webhook deliveries, and the webhook dispatcher (:mod:`sfumato.control_plane.webhooks`) sends the
outbox.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, TypeVar

import numpy as np
from PIL import Image as PILImage

from sfumato.clients.png import encode_png
from sfumato.clients.triton_grpc import (
    Progress,
    TritonCallError,
    TritonCancelledError,
    TritonUnavailableError,
)
from sfumato.control_plane import events, jobs, leases, webhooks
from sfumato.control_plane.models import utcnow
from sfumato.control_plane.services import Services
from sfumato.control_plane.triton_gateway import Generated
from sfumato.serving.contract import MODEL, OPTIONS

log = logging.getLogger("sfumato.worker")

T = TypeVar("T")
WORKER_ID_LENGTH = 64  # the ``jobs.lease_owner`` column
DB_GRACE_S = 30.0  # after a cancel, how long a database write in progress may still take
StopReason = Literal["cancel", "lost", "shutdown"]


def worker_id(index: int | str) -> str:
    """``host:pid:index``, at most :data:`WORKER_ID_LENGTH` characters.

    A long host name (a Kubernetes pod name has up to 63) is cut from the front: its end (the
    pod's random suffix) and the pid tell workers apart, and two workers must never share an id.
    """
    suffix = f":{os.getpid()}:{index}"
    return socket.gethostname()[-(WORKER_ID_LENGTH - len(suffix)) :] + suffix


async def run_to_completion(coro: Coroutine[Any, Any, T], *, grace_s: float = DB_GRACE_S) -> T:
    """Await ``coro`` in a task of its own; if the caller is cancelled meanwhile, let it finish
    (for up to ``grace_s`` more) and then re-raise the cancellation.

    For database writes: a SQLAlchemy + aiosqlite operation cancelled halfway can leave the
    SQLite write lock held by a connection nobody owns any more, after which every writer waits
    out the 30 s busy timeout, and a task cancelled in that state takes as long to end. Run to
    completion, the operation commits or rolls back and its connection goes back to the pool.
    """
    task = asyncio.ensure_future(coro)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait((task,), timeout=grace_s if cancelled else None)
        except asyncio.CancelledError:
            cancelled = True
            continue
        if cancelled and not task.done():  # the grace period is over: give up on it
            task.cancel()
            await asyncio.wait((task,))
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved: the outcome no longer matters to a cancelled caller
        raise asyncio.CancelledError
    return task.result()


@dataclass(eq=False)
class _InFlight:
    """One job a worker holds."""

    job: leases.Claimed
    task: asyncio.Task | None = None
    calling: bool = False  # in the part that may be cancelled: inputs, the Triton call, the PNGs
    stop: StopReason | None = None  # why the worker stopped it, if it did
    written: list[str] = field(default_factory=list)  # image store keys written so far
    step: Progress | None = None  # the latest step of its stream not yet written
    preview: np.ndarray | None = None  # the latest preview not yet written

    def interrupt(self, reason: StopReason) -> None:
        """Stop the job: cancel its Triton call if it is in one (else it stops at the next step)."""
        if self.stop is None:
            self.stop = reason
        if self.calling and self.task is not None:
            self.task.cancel()


class Worker:
    def __init__(self, services: Services, *, name: str | None = None) -> None:
        self.services = services
        self.settings = services.settings
        self.triton = services.triton
        self.metrics = services.metrics
        self.id = name or worker_id(f"{id(self):x}")
        self.capacity = 0
        self._triton_models: dict[str, str] = {}  # registered model -> its Triton pipeline
        self._in_flight: dict[str, _InFlight] = {}
        self._wakeup = asyncio.Event()
        self._progress_due = asyncio.Event()
        self._triton_ready: bool | None = None
        self._capacity_problem: str | None = None

    async def _db(self, operation: Callable[..., Awaitable[T]], /, **kwargs: Any) -> T:
        """One lease operation in a session of its own, run to completion (see
        :func:`run_to_completion`)."""

        async def run() -> T:
            async with self.services.sessions() as session:
                return await operation(session=session, **kwargs)

        return await run_to_completion(run())

    # ----------------------------------------------------------------------- the loops

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and run jobs until ``stop`` is set (or this task is cancelled); then hand back
        the jobs still in flight."""
        log.info("worker %s started", self.id)
        relay = asyncio.create_task(self._wake_on(stop), name=f"{self.id} stop relay")
        heartbeats = asyncio.create_task(self._heartbeats(), name=f"{self.id} heartbeats")
        progress = asyncio.create_task(self._progress_writer(), name=f"{self.id} progress")
        try:
            await self._claim_loop(stop)
        finally:
            try:
                await self._hand_back()
            finally:
                for task in (relay, heartbeats, progress):
                    task.cancel()
                await asyncio.wait((relay, heartbeats, progress))
                self.metrics.worker_capacity.dec(self.capacity)
                self.capacity = 0
                log.info("worker %s stopped", self.id)

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wakeup.set()

    async def wait_for_work(self, timeout: float, *, since: int | None = None) -> None:
        """Wait until there may be work: a job is queued (the job-event channel, from any
        process; ``since``: the hub's ``queued_count`` before the last claim, so that a job
        queued meanwhile wakes it at once), a job of this worker ends, the worker is stopped, or
        ``timeout`` seconds pass (the fallback for jobs that come due later: retry backoff,
        expired leases)."""
        hub = self.services.events
        if hub is None or not hub.started:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
            self._wakeup.clear()
            return
        if not self._wakeup.is_set():
            waiters = [
                asyncio.ensure_future(hub.wait_for_queued(timeout, since=since)),
                asyncio.ensure_future(self._wakeup.wait()),
            ]
            try:
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
                await asyncio.wait(waiters)
        self._wakeup.clear()

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not await self._triton_is_ready():
                await self.wait_for_work(self.settings.poll_interval_s)
                continue
            free = await self._refresh_capacity() - len(self._in_flight)
            if free <= 0:  # woken when one of ours ends
                await self.wait_for_work(self.settings.poll_interval_s)
                continue
            hub = self.services.events
            queued_before = hub.queued_count if hub is not None else None
            try:
                claimed = await run_to_completion(self._claim(free))
            except Exception:
                log.exception("claiming jobs failed; retrying")
                claimed = 0
            if claimed < free:  # nothing more to take for now: wait for a queued job
                await self.wait_for_work(self.settings.poll_interval_s, since=queued_before)

    async def _claim(self, limit: int) -> int:
        """Claim up to ``limit`` jobs and start them, in one piece: if the worker is cancelled
        meanwhile, the jobs it claimed are still in flight, and so handed back on the way out."""
        async with self.services.sessions() as session:
            claimed = await leases.claim(
                session=session,
                worker_id=self.id,
                lease_s=self.settings.lease_s,
                limit=limit,
                per_owner=self._per_user_cap(),
            )
        for job in claimed:
            self._start(job)
        return len(claimed)

    async def _triton_is_ready(self) -> bool:
        """Triton's readiness (cached by the gateway). While it is not ready, run the outage
        clock of the waiting jobs (:func:`sfumato.control_plane.leases.outage_tick`)."""
        problem = await self.triton.readiness()
        was_ready, self._triton_ready = self._triton_ready, problem is None
        try:
            if problem is not None:
                if was_ready is not False:
                    log.warning("Triton is not ready (%s); not claiming jobs until it is", problem)
                for ended in await self._db(
                    leases.outage_tick, max_outage_s=self.settings.max_outage_s, problem=problem
                ):
                    self._observe_end(ended)
                    log.warning("job %s failed: Triton unavailable for longer than the limit", ended.id)
            elif was_ready is False:
                log.info("Triton is ready again")
        except Exception:
            log.exception("updating the outage clocks failed; retrying")
        return problem is None

    def _per_user_cap(self) -> int | None:
        """How many of this worker's slots one user's jobs may hold (``None``: all of them)."""
        share = self.settings.max_user_share
        return None if share >= 1 else max(1, math.ceil(share * self.capacity))

    async def _refresh_capacity(self) -> int:
        capacity = self.settings.worker_capacity
        if capacity is None:
            try:
                capacity = await self.triton.pipeline_capacity()
                self._capacity_problem = None
            except TritonCallError as error:
                capacity = self.capacity or 1
                if str(error) != self._capacity_problem:  # once per distinct problem, not every round
                    self._capacity_problem = str(error)
                    log.warning(
                        "reading the pipeline's instance count failed (%s); capacity %d", error, capacity
                    )
        if capacity != self.capacity:
            log.info("worker %s: capacity %d jobs in flight", self.id, capacity)
            self.metrics.worker_capacity.inc(capacity - self.capacity)
            self.capacity = capacity
        return capacity

    async def _heartbeats(self) -> None:
        """Every ``heartbeat_s``: extend the leases of all jobs in flight in one statement, and
        stop those that were canceled or lost."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            if not self._in_flight:
                continue
            try:
                verdicts = await self._db(
                    leases.heartbeat,
                    worker_id=self.id,
                    job_ids=list(self._in_flight),
                    lease_s=self.settings.lease_s,
                )
            except Exception:
                log.exception("heartbeat failed; retrying in %.1f s", self.settings.heartbeat_s)
                continue
            for job_id, verdict in verdicts.items():
                slot = self._in_flight.get(job_id)
                if verdict is not None and slot is not None:
                    slot.interrupt(verdict)

    async def _hand_back(self) -> None:
        """Shutdown: stop every job in flight (their tasks hand them back) and wait for them."""
        slots = list(self._in_flight.values())
        if slots:
            log.info("worker %s stopping: handing back %d jobs in flight", self.id, len(slots))
        for slot in slots:
            slot.interrupt("shutdown")
        tasks = [slot.task for slot in slots if slot.task is not None]
        if tasks:
            await asyncio.wait(tasks)

    # ----------------------------------------------------------------------- one job

    def _start(self, job: leases.Claimed) -> None:
        slot = _InFlight(job)
        self._in_flight[job.id] = slot
        log.debug("job %s claimed by %s (attempt %d)", job.id, self.id, job.attempts)
        self.metrics.jobs_in_flight.inc()
        if job.reclaimed:
            self.metrics.job_reclaims.inc()
            log.info("job %s re-claimed (its worker's lease expired); attempt %d", job.id, job.attempts)
        if job.queue_wait_s is not None:
            self.metrics.job_queue_wait.labels(model=job.model_name).observe(job.queue_wait_s)
        slot.task = asyncio.create_task(self._work(slot), name=f"job {job.id}")

    async def _work(self, slot: _InFlight) -> None:
        job = slot.job
        try:
            if slot.stop is not None:
                await self._stopped(slot)
                return
            slot.calling = True
            try:
                rows, generated = await self._generate(slot)
            except asyncio.CancelledError:
                slot.calling = False
                if slot.stop is None:  # cancelled from outside: the service is going away
                    slot.stop = "shutdown"
                    await self._stopped(slot)
                    raise
                await self._stopped(slot)
                return
            except TritonCallError as error:
                slot.calling = False
                await self._failed(job, error)
                return
            except Exception as exc:  # a bug: log it, fail the job with the reason, keep the worker
                slot.calling = False
                log.exception("job %s failed unexpectedly", job.id)
                await self._finish(job, status="failed", error=f"internal: {exc!r}")
                return
            slot.calling = False
            await self._record(slot, rows, generated)
        except Exception:
            log.exception(
                "job %s: recording its outcome failed; it runs again once its lease expires", job.id
            )
        finally:
            del self._in_flight[job.id]
            self.metrics.jobs_in_flight.dec()
            self._wakeup.set()

    async def _generate(self, slot: _InFlight) -> tuple[list[dict[str, Any]], Generated]:
        """Inputs from the store, the Triton call, the PNGs into the store (the cancellable part)."""
        job, params, store = slot.job, slot.job.params, self.services.store
        arrays: dict[str, np.ndarray] = {}
        for name, mode in (("image", "RGB"), ("mask", "L")):
            key = params.get(f"{name}_key")
            if key:
                arrays[name] = await asyncio.to_thread(_decode, await store.get(key), mode)
        fields = {k: params[k] for k in OPTIONS if k in params}
        if "model" in params:  # the version chosen at submission (registry), pinned in Triton
            fields["model"] = await self._triton_model(params["model"])
            fields["model_version"] = params["model_version"]
        pipeline = fields.get("model") or self.settings.model_name
        # Every registered model has its streaming twin (``<pipeline>_stream``, see
        # sfumato.model_repository); a pipeline of another layout is called plainly.
        if self.settings.worker_streaming and pipeline.endswith(MODEL):
            generated = await self.triton.generate_stream(
                request_id=job.id,
                prompt=params["prompt"],
                on_progress=lambda step: self._progress(slot, step),
                preview_every=params.get("preview_every"),
                **arrays,
                **fields,
            )
        else:
            generated = await self.triton.generate(
                request_id=job.id, prompt=params["prompt"], **arrays, **fields
            )
        pngs = await asyncio.to_thread(_encode_all, generated, params)
        rows = []
        for index, (png, digest) in enumerate(pngs):
            key = f"generations/{job.id}/{index}.png"
            slot.written.append(key)
            await store.put(key, png)
            image = generated.images[index]
            rows.append(
                {
                    "index": index,
                    "storage_key": key,
                    "seed": int(generated.seeds[index]),
                    "width": int(image.shape[1]),
                    "height": int(image.shape[0]),
                    "sha256": digest,
                }
            )
        return rows, generated

    async def _progress(self, slot: _InFlight, step: Progress) -> None:
        """One step of a job's stream: kept for the worker's progress writer (the last step is
        not: the job's completion follows at once)."""
        if step.preview is not None:
            slot.preview = step.preview
        if step.step < step.total:
            slot.step = step
            self._progress_due.set()

    async def _progress_writer(self) -> None:
        """Every ``SFUMATO_PROGRESS_WRITE_INTERVAL_S`` at most: the latest step of every job in
        flight that moved, with its latest preview, in one transaction (so one job's progress is
        written at most that often, and 16 streaming jobs cost one write, not 16)."""
        interval = self.settings.progress_write_interval_s
        while True:
            await self._progress_due.wait()
            self._progress_due.clear()
            updates = []
            for slot in list(self._in_flight.values()):
                if slot.step is not None:
                    updates.append((slot.job.id, slot.step, slot.preview))
                    slot.step = slot.preview = None
            if updates:
                try:
                    rows = await asyncio.to_thread(_progress_rows, updates)
                    await self._db(leases.progress_many, worker_id=self.id, updates=rows)
                except Exception:  # progress is a courtesy: the jobs go on
                    log.warning("writing the progress of %d jobs failed", len(updates), exc_info=True)
            await asyncio.sleep(interval)

    async def _triton_model(self, model: str) -> str:
        """A registered model's Triton pipeline (a model's Triton names never change: cached)."""
        name = self._triton_models.get(model)
        if name is None:
            from sfumato.control_plane.models import RegisteredModel

            async with self.services.read_sessions() as session:
                row = await session.get(RegisteredModel, model)
                await session.commit()
            if row is None:
                raise RuntimeError(f"model {model!r} is no longer registered")
            name = self._triton_models[model] = row.triton_pipeline
        return name

    async def _record(self, slot: _InFlight, rows: list[dict[str, Any]], generated: Generated) -> None:
        job = slot.job
        ended = await self._db(
            leases.complete,
            job_id=job.id,
            worker_id=self.id,
            images=rows,
            inference_s=generated.elapsed_s,
            model_version=generated.model_version,
        )
        if ended is not None:
            self._observe_end(ended)
            return
        # Lost the lease. Re-claimed by another worker: it writes the same bytes under the same
        # keys (the seed is fixed at submission), so the files stay. Deleted: remove them.
        await self._discard(slot, "finished, but its lease was lost")

    async def _stopped(self, slot: _InFlight) -> None:
        job = slot.job
        if slot.stop == "cancel":
            await self._finish(job, status="canceled", error="canceled while running")
            log.info("job %s canceled while running", job.id)
        elif slot.stop == "shutdown":
            if await self._db(leases.release, job_id=job.id, worker_id=self.id):
                self.metrics.job_requeues.labels(reason="shutdown").inc()
                log.info("job %s handed back on shutdown", job.id)
        else:
            await self._discard(slot, "stopped: no longer ours")

    async def _discard(self, slot: _InFlight, why: str) -> None:
        exists = await self._db(jobs.job_exists, job_id=slot.job.id)
        if not exists:
            for key in slot.written:
                await self.services.store.delete(key)
        log.warning(
            "job %s %s (%s); result discarded", slot.job.id, why, "re-claimed" if exists else "deleted"
        )

    async def _failed(self, job: leases.Claimed, error: TritonCallError) -> None:
        """A Triton call failed: put the job back (outage), retry it later (transient), or fail it."""
        settings = self.settings
        if isinstance(error, TritonUnavailableError | TritonCancelledError):
            outcome = await self._db(
                leases.requeue,
                job_id=job.id,
                worker_id=self.id,
                delay_s=settings.retry_backoff_s,
                max_outage_s=settings.max_outage_s,
                error=str(error),
            )
            if outcome == "queued":
                self.metrics.job_requeues.labels(reason="outage").inc()
                log.warning("job %s: Triton unavailable (%s); handed back, attempt not spent", job.id, error)
            elif isinstance(outcome, leases.Ended):
                self._observe_end(outcome)
                log.warning("job %s failed: Triton unavailable for longer than the limit", job.id)
            return
        if error.transient and job.attempts < settings.max_attempts:
            delay = settings.retry_backoff_s * 2 ** (job.attempts - 1)
            if await self._db(
                leases.retry_later,
                job_id=job.id,
                worker_id=self.id,
                delay_s=delay,
                error=f"attempt {job.attempts}: {error}",
            ):
                self.metrics.job_retries.labels(reason=error.code).inc()
                log.warning("job %s: transient Triton error (%s); retry in %.1f s", job.id, error.code, delay)
            return
        await self._finish(job, status="failed", error=str(error))

    async def _finish(self, job: leases.Claimed, *, status: str, error: str) -> None:
        ended = await self._db(leases.finish, job_id=job.id, worker_id=self.id, status=status, error=error)
        if ended is not None:
            self._observe_end(ended)

    def _observe_end(self, ended: leases.Ended) -> None:
        self.metrics.job_duration.labels(model=ended.model_name, status=ended.status).observe(
            (ended.finished_at - ended.created_at).total_seconds()
        )


def _decode(data: bytes, mode: str) -> np.ndarray:
    with PILImage.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert(mode), dtype=np.uint8)


def _progress_rows(updates: list[tuple[str, Progress, np.ndarray | None]]) -> list[leases.ProgressUpdate]:
    return [
        leases.ProgressUpdate(
            job_id, step.step, step.total, _preview_url(preview) if preview is not None else None
        )
        for job_id, step, preview in updates
    ]


def _preview_url(preview: np.ndarray) -> str:
    """A progress event's preview: the images as they stand, side by side, as a PNG data URL."""
    strip = np.concatenate(list(np.asarray(preview, dtype=np.uint8)), axis=1)
    return "data:image/png;base64," + base64.b64encode(encode_png(strip)).decode("ascii")


def _encode_all(generated: Generated, params: dict[str, Any]) -> list[tuple[bytes, str]]:
    """Each image as PNG (the prompt, its seed and the parameters in text chunks) and its SHA-256."""
    out = []
    for image, seed in zip(generated.images, generated.seeds, strict=True):
        text = {"prompt": params["prompt"], "seed": str(int(seed))}
        text.update({k: str(params[k]) for k in OPTIONS if k in params and k != "seed"})
        png = encode_png(image, text=text)
        out.append((png, hashlib.sha256(png).hexdigest()))
    return out


async def run_maintenance(services: Services, *, stop: asyncio.Event) -> None:
    """Housekeeping beside the workers, every ``SFUMATO_MAINTENANCE_INTERVAL_S``: expired
    Idempotency-Key records are deleted, and the events of jobs finished more than
    ``SFUMATO_EVENT_RETENTION_S`` ago. Safe in every worker process at once (the deletes are
    idempotent and batched); a failed round is logged and tried again next interval."""
    interval = services.settings.maintenance_interval_s

    async def sweep() -> tuple[int, int]:
        async with services.sessions() as session:
            keys = await jobs.purge_expired_idempotency(session=session)
            old_events = await events.purge(session=session, older_than_s=services.settings.event_retention_s)
            return keys, old_events

    async def sweep_webhooks() -> int:
        before = utcnow() - timedelta(seconds=services.settings.webhook_retention_s)
        async with services.sessions() as session:
            return await webhooks.purge_finished(session=session, before=before)

    while not stop.is_set():
        try:
            purged, purged_events = await run_to_completion(sweep())
            if purged:
                log.info("maintenance: deleted %d expired idempotency keys", purged)
            if purged_events:
                log.info("maintenance: deleted %d events of long-finished jobs", purged_events)
            purged = await run_to_completion(sweep_webhooks())
            if purged:
                log.info("maintenance: deleted %d finished webhook deliveries", purged)
        except Exception:
            log.exception("maintenance round failed; retrying in %.0f s", interval)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stop.wait()


async def run_workers(services: Services, *, count: int, stop: asyncio.Event) -> None:
    """``count`` workers and the maintenance task, until ``stop`` is set (or cancelled).

    A task group, not ``gather``: cancelled, ``gather`` returns as soon as its first child is
    cancelled, while the workers are still handing their jobs back; the group returns once every
    one of them has ended."""
    async with asyncio.TaskGroup() as group:
        group.create_task(run_maintenance(services, stop=stop), name="maintenance")
        group.create_task(webhooks.run_dispatcher(services, stop=stop), name="webhooks")
        for index in range(count):
            worker = Worker(services, name=worker_id(index))
            group.create_task(worker.run(stop), name=f"worker {worker.id}")
