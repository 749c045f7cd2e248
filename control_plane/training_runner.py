"""The training runner: ``sfumato worker --queue trainings`` (and one inside ``sfumato up``).

One training at a time per runner. The runner claims a training from the ``trainings`` queue
with the generations' lease protocol (:func:`sfumato.control_plane.leases.claim` with
``queue="trainings"``: a generation worker never takes a training, nor a runner a generation),
hands it to an executor (:class:`~sfumato.control_plane.local_executor.LocalExecutor`, a guarded
local process, or :class:`~sfumato.control_plane.kubernetes_executor.KubernetesJobExecutor`), and
until it ends:

* heartbeats its lease every ``SFUMATO_HEARTBEAT_S`` and polls the executor; a cancel request
  (seen by the heartbeat) stops the process at once and records ``canceled``; a lost lease
  (deleted, or re-claimed after this runner stalled) stops it too;
* the process exits 0: ``succeeded``; it fails: ``failed`` with its last lines, or back to the
  queue while attempts are left (``SFUMATO_MAX_ATTEMPTS``), to resume from its last checkpoint.

A runner killed with -9 takes its training process with it (the process guard); its lease then
runs out and another runner claims the training, whose process resumes from the checkpoint in
the object store. Shutdown (SIGTERM) stops the process and hands the training back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sfumato.control_plane import leases, trainings
from sfumato.control_plane.services import Services
from sfumato.control_plane.training_executor import TrainingExecutor
from sfumato.control_plane.worker import run_to_completion, worker_id

log = logging.getLogger("sfumato.training_runner")
POLL_S = 0.5


def make_executor(services: Services) -> TrainingExecutor:
    settings = services.settings
    if settings.training_executor == "kubernetes":
        from sfumato.control_plane.kubernetes_executor import KubernetesJobExecutor

        return KubernetesJobExecutor.from_settings(settings)
    from sfumato.control_plane.local_executor import LocalExecutor

    return LocalExecutor(settings)


class TrainingRunner:
    def __init__(
        self, services: Services, *, name: str | None = None, executor: TrainingExecutor | None = None
    ):
        self.services = services
        self.settings = services.settings
        self.id = name or worker_id(f"trainer-{id(self):x}")
        self.executor = executor or make_executor(services)

    async def _db(self, operation, /, **kwargs):  # type: ignore[no-untyped-def]
        async def run():  # type: ignore[no-untyped-def]
            async with self.services.sessions() as session:
                return await operation(session=session, **kwargs)

        return await run_to_completion(run())

    async def run(self, stop: asyncio.Event) -> None:
        log.info("training runner %s started", self.id)
        try:
            while not stop.is_set():
                try:
                    claimed = await self._db(
                        leases.claim,
                        worker_id=self.id,
                        lease_s=self.settings.lease_s,
                        limit=1,
                        queue=trainings.QUEUE,
                    )
                except Exception:
                    log.exception("claiming a training failed; retrying")
                    claimed = []
                if not claimed:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.settings.poll_interval_s):
                            await stop.wait()
                    continue
                await self._run_one(claimed[0], stop)
        finally:
            close = getattr(self.executor, "aclose", None)
            if close is not None:
                await close()
            log.info("training runner %s stopped", self.id)

    async def _run_one(self, job: leases.Claimed, stop: asyncio.Event) -> None:
        log.info(
            "training %s claimed (attempt %d%s)",
            job.id,
            job.attempts,
            ", re-claimed" if job.reclaimed else "",
        )
        try:
            handle = await self.executor.start(training_id=job.id)
        except Exception as exc:
            log.exception("starting training %s failed", job.id)
            await self._db(
                leases.finish, job_id=job.id, worker_id=self.id, status="failed", error=f"start: {exc}"
            )
            return
        beat = asyncio.get_running_loop().time()
        while True:
            if stop.is_set():
                await self.executor.cancel(handle)
                await self._db(leases.release, job_id=job.id, worker_id=self.id)
                log.info("training %s handed back on shutdown", job.id)
                return
            now = asyncio.get_running_loop().time()
            if now - beat >= self.settings.heartbeat_s:
                beat = now
                try:
                    verdict = (
                        await self._db(
                            leases.heartbeat,
                            worker_id=self.id,
                            job_ids=[job.id],
                            lease_s=self.settings.lease_s,
                        )
                    )[job.id]
                except Exception:
                    log.exception("heartbeat of training %s failed; retrying", job.id)
                    verdict = None
                if verdict == "cancel":
                    await self.executor.cancel(handle)
                    await self._db(
                        leases.finish,
                        job_id=job.id,
                        worker_id=self.id,
                        status="canceled",
                        error="canceled while running",
                    )
                    log.info("training %s canceled while running", job.id)
                    return
                if verdict == "lost":
                    await self.executor.cancel(handle)
                    log.warning("training %s is no longer ours (deleted or re-claimed); stopped", job.id)
                    return
            status = await self.executor.poll(handle)
            if status.state == "succeeded":
                await self._db(trainings.complete, training_id=job.id, worker_id=self.id)
                log.info("training %s succeeded", job.id)
                return
            if status.state == "failed":
                await self.executor.cancel(handle)
                if job.attempts < self.settings.max_attempts:
                    await self._db(
                        leases.retry_later,
                        job_id=job.id,
                        worker_id=self.id,
                        delay_s=self.settings.retry_backoff_s,
                        error=f"attempt {job.attempts}: {status.message}",
                    )
                    log.warning(
                        "training %s failed (%s); retrying from its checkpoint", job.id, status.message
                    )
                else:
                    await self._db(
                        leases.finish, job_id=job.id, worker_id=self.id, status="failed", error=status.message
                    )
                    log.warning("training %s failed: %s", job.id, status.message)
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await stop.wait()


async def run_training_runners(services: Services, *, count: int, stop: asyncio.Event) -> None:
    async with asyncio.TaskGroup() as group:
        for index in range(count):
            runner = TrainingRunner(services, name=worker_id(f"trainer-{index}"))
            group.create_task(runner.run(stop), name=f"training runner {runner.id}")
