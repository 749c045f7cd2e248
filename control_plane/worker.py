"""Workers: claim a job, call Triton's ``pipeline`` model over gRPC, store the images.

One :class:`Worker` runs one job at a time; ``sfumato serve`` starts ``SFUMATO_WORKERS`` of them
in-process and ``sfumato worker`` runs them alone, to scale out. While a job runs, a heartbeat
extends its lease and watches for cancellation (it then cancels the gRPC call, which Triton
passes on to the pipeline model). Transient Triton errors (unavailable, deadline exceeded) are
retried with exponential backoff up to ``SFUMATO_MAX_ATTEMPTS``; invalid arguments fail at once.
On shutdown a worker stops claiming and hands its unfinished job back. Beside the workers,
:func:`run_maintenance` sweeps expired Idempotency-Key records.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import os
import socket
import time
from typing import Any

import numpy as np
from PIL import Image as PILImage

from sfumato.clients.png import encode_png
from sfumato.clients.triton_grpc import pipeline_inputs
from sfumato.control_plane import jobs
from sfumato.control_plane.services import Services
from sfumato.serving.contract import OPTIONS

log = logging.getLogger("sfumato.worker")

# Worth another attempt: Triton down or restarting, the deadline passed, its queue was full.
# Anything else (invalid argument, an internal error of the pipeline) fails the job at once.
TRANSIENT = {
    "StatusCode.UNAVAILABLE",
    "StatusCode.DEADLINE_EXCEEDED",
    "StatusCode.RESOURCE_EXHAUSTED",
}


WORKER_ID_LENGTH = 64  # the ``jobs.lease_owner`` column


def worker_id(index: int | str) -> str:
    """``host:pid:index``, at most :data:`WORKER_ID_LENGTH` characters.

    A long host name (a Kubernetes pod name has up to 63) is cut from the front: its end (the
    pod's random suffix) and the pid tell workers apart, and two workers must never share an id.
    """
    suffix = f":{os.getpid()}:{index}"
    return socket.gethostname()[-(WORKER_ID_LENGTH - len(suffix)) :] + suffix


class TritonFailure(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    @property
    def transient(self) -> bool:
        return self.code in TRANSIENT


class Worker:
    def __init__(self, services: Services, *, name: str | None = None) -> None:
        self.services = services
        self.settings = services.settings
        self.id = name or worker_id(f"{id(self):x}")
        self._client: Any = None

    async def _triton(self) -> Any:
        if self._client is None:
            import tritonclient.grpc.aio as aio

            self._client = aio.InferenceServerClient(self.settings.triton_url)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and run jobs until ``stop`` is set; then finish or release the job in hand."""
        log.info("worker %s started", self.id)
        try:
            while not stop.is_set():
                try:
                    async with self.services.sessions() as session:
                        job = await jobs.claim_next(
                            session=session, worker_id=self.id, lease_s=self.settings.lease_s
                        )
                except Exception:
                    log.exception("claiming a job failed; retrying")
                    job = None
                if job is None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.settings.poll_interval_s)
                    continue
                await self.process(job.id, dict(job.params), attempts=job.attempts, stop=stop)
        finally:
            await self.close()
            log.info("worker %s stopped", self.id)

    async def process(
        self, job_id: str, params: dict[str, Any], *, attempts: int, stop: asyncio.Event
    ) -> None:
        metrics = self.services.metrics
        metrics.workers_busy.inc()
        call = asyncio.create_task(self._call(job_id, params))
        heartbeat = asyncio.create_task(self._heartbeat(job_id, call))
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({call, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not call.done():  # shutting down: give the job back rather than run past the grace period
                call.cancel()
                with contextlib.suppress(BaseException):
                    await call
                async with self.services.sessions() as session:
                    await jobs.release_job(session=session, job_id=job_id, worker_id=self.id)
                log.info("released job %s on shutdown", job_id)
                return
            await self._record(job_id, params, call, heartbeat, attempts=attempts)
        finally:
            for task in (heartbeat, stopping):
                task.cancel()
            metrics.workers_busy.dec()

    async def _heartbeat(self, job_id: str, call: asyncio.Task) -> str | None:
        """Extend the lease; on cancel or loss, cancel the Triton call and say why."""
        while not call.done():
            await asyncio.sleep(self.settings.heartbeat_s)
            try:
                async with self.services.sessions() as session:
                    verdict = await jobs.extend_lease(
                        session=session, job_id=job_id, worker_id=self.id, lease_s=self.settings.lease_s
                    )
            except Exception:
                log.exception("heartbeat for job %s failed", job_id)
                continue
            if verdict is not None:
                call.cancel()
                return verdict
        return None

    async def _call(self, job_id: str, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, float, str]:
        import tritonclient.grpc.aio as aio
        from tritonclient.utils import InferenceServerException

        fields = {k: params[k] for k in OPTIONS if k in params}
        arrays: dict[str, np.ndarray] = {}
        for name, mode in (("image", "RGB"), ("mask", "L")):
            key = params.get(f"{name}_key")
            if key:
                data = await self.services.store.get(key)
                with PILImage.open(io.BytesIO(data)) as img:
                    arrays[name] = np.asarray(img.convert(mode), dtype=np.uint8)
        client = await self._triton()
        inputs = pipeline_inputs(aio, prompt=params["prompt"], **arrays, **fields)
        started = time.perf_counter()
        try:
            result = await client.infer(
                self.settings.model_name,
                inputs,
                outputs=[aio.InferRequestedOutput("images"), aio.InferRequestedOutput("seeds")],
                client_timeout=self.settings.triton_timeout_s,
                request_id=job_id,
            )
        except InferenceServerException as exc:
            self.services.metrics.triton_errors.labels(code=str(exc.status())).inc()
            raise TritonFailure(str(exc.status()), exc.message() or str(exc)) from None
        elapsed = time.perf_counter() - started
        self.services.metrics.triton_duration.observe(elapsed)
        version = str(result.get_response().model_version)
        return result.as_numpy("images"), result.as_numpy("seeds"), elapsed, version

    async def _finish(self, job_id: str, *, status: str, error: str) -> None:
        """Record ``failed`` or ``canceled`` (while holding the lease) and count it."""
        async with self.services.sessions() as session:
            await jobs.finish_job(
                session=session, job_id=job_id, worker_id=self.id, status=status, error=error
            )
        self.services.metrics.jobs_finished.labels(status=status).inc()

    async def _record(
        self,
        job_id: str,
        params: dict[str, Any],
        call: asyncio.Task,
        heartbeat: asyncio.Task,
        *,
        attempts: int,
    ) -> None:
        sessions = self.services.sessions
        try:
            images, seeds, elapsed, version = call.result()
        except asyncio.CancelledError:
            verdict = heartbeat.result() if heartbeat.done() else None
            if verdict == "cancel":
                await self._finish(job_id, status="canceled", error="canceled while running")
            log.info("job %s stopped: %s", job_id, verdict or "cancelled")
            return
        except TritonFailure as failure:
            if failure.transient and attempts < self.settings.max_attempts:
                delay = self.settings.retry_backoff_s * 2 ** (attempts - 1)
                async with sessions() as session:
                    await jobs.retry_later(
                        session=session,
                        job_id=job_id,
                        worker_id=self.id,
                        delay_s=delay,
                        error=f"attempt {attempts}: {failure}",
                    )
                log.warning(
                    "job %s: transient Triton error (%s); retry in %.1f s", job_id, failure.code, delay
                )
                return
            await self._finish(job_id, status="failed", error=str(failure))
            return
        except Exception as exc:  # a bug: log it, fail the job with the reason, keep the worker alive
            log.exception("job %s failed unexpectedly", job_id)
            await self._finish(job_id, status="failed", error=f"internal: {exc!r}")
            return
        rows = []
        for index, (image, seed) in enumerate(zip(images, seeds, strict=True)):
            text = {"prompt": params["prompt"], "seed": str(int(seed))}
            text.update({k: str(params[k]) for k in OPTIONS if k in params and k != "seed"})
            png = encode_png(image, text=text)
            key = f"generations/{job_id}/{index}.png"
            await self.services.store.put(key, png)
            rows.append(
                {
                    "index": index,
                    "storage_key": key,
                    "seed": int(seed),
                    "width": int(image.shape[1]),
                    "height": int(image.shape[0]),
                    "sha256": hashlib.sha256(png).hexdigest(),
                }
            )
        async with sessions() as session:
            done = await jobs.complete_job(
                session=session,
                job_id=job_id,
                worker_id=self.id,
                images=rows,
                inference_s=elapsed,
                model_version=version,
            )
        if done:
            self.services.metrics.jobs_finished.labels(status="succeeded").inc()
            return
        # Lost the lease. Re-claimed by another worker: it writes the same bytes under the same
        # keys (the seed is fixed at submission), so the files stay. Deleted: remove them.
        async with sessions() as session:
            exists = await session.get(jobs.Job, job_id) is not None
        if not exists:
            for row in rows:
                await self.services.store.delete(row["storage_key"])
        log.warning(
            "job %s finished but its lease was lost (%s); result discarded",
            job_id,
            "re-claimed" if exists else "deleted",
        )


async def run_maintenance(services: Services, *, stop: asyncio.Event) -> None:
    """Housekeeping beside the workers, every ``SFUMATO_MAINTENANCE_INTERVAL_S``: expired
    Idempotency-Key records are deleted. Safe in every worker process at once (the deletes are
    idempotent and batched); a failed round is logged and tried again next interval."""
    interval = services.settings.maintenance_interval_s
    while not stop.is_set():
        try:
            async with services.sessions() as session:
                purged = await jobs.purge_expired_idempotency(session=session)
            if purged:
                log.info("maintenance: deleted %d expired idempotency keys", purged)
        except Exception:
            log.exception("maintenance round failed; retrying in %.0f s", interval)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


async def run_workers(services: Services, *, count: int, stop: asyncio.Event) -> None:
    """``count`` workers and the maintenance task, until ``stop`` is set."""
    workers = [Worker(services, name=worker_id(i)) for i in range(count)]
    await asyncio.gather(run_maintenance(services, stop=stop), *(w.run(stop) for w in workers))
