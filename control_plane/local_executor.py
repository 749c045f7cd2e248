"""Trainings as local processes: ``sfumato training run --id ID`` under the process guard.

The default executor (``SFUMATO_TRAINING_EXECUTOR=local``). Each training is a process of its own
(PyTorch, its memory and its threads stay out of the runner and the API), started through
:mod:`sfumato.process_guard`, so it dies with the runner that started it, by any death, SIGKILL
included: a training never runs twice at once because its first runner vanished. It runs at
``SFUMATO_TRAINING_NICE`` with ``SFUMATO_TRAINING_THREADS`` CPU threads, so that serving on the
same machine stays responsive. The child gets the runner's settings through ``SFUMATO_*``
variables (database, object store, Triton), whatever way the runner was given them.
"""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field

from sfumato import process_guard
from sfumato.control_plane.settings import Settings
from sfumato.control_plane.training_executor import ExecutorStatus

CANCEL_GRACE_S = 5.0
LOG_LINES = 20


def child_environment(settings: Settings) -> dict[str, str]:
    """The environment of a training process: this one's, plus the settings it needs."""
    env = dict(os.environ)
    values = {
        "ENV": settings.env,
        "DATA_DIR": str(settings.data_dir.resolve()),
        "DATABASE_URL": settings.resolved_database_url,
        "IMAGE_DIR": str(settings.resolved_image_dir.resolve()),
        "STORAGE_URL": settings.storage_url,
        "S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "S3_REGION": settings.s3_region,
        "TRITON_URL": settings.triton_url,
        "MODEL_NAME": settings.model_name,
        "MODEL_REPOSITORY": str(settings.model_repository.resolve()) if settings.model_repository else None,
        "TRAINING_THREADS": str(settings.training_threads),
        "TRAINING_CHECKPOINT_EVERY": str(settings.training_checkpoint_every),
        "TRAINING_MIN_STEP_S": str(settings.training_min_step_s),
        "TRAINING_BASE_DIR": str(settings.training_base_dir.resolve()),
        "SECRET_KEY": settings.secret_key.get_secret_value() if settings.secret_key else None,
        "TRITON_ADMIN_KEY": settings.triton_admin_key.get_secret_value()
        if settings.triton_admin_key
        else None,
    }
    for name, value in values.items():
        if value is not None:
            env[f"SFUMATO_{name}"] = value
    threads = str(settings.training_threads)
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    return env


@dataclass
class _Run:
    process: subprocess.Popen
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LOG_LINES))


class LocalExecutor:
    """Implements :class:`~sfumato.control_plane.training_executor.TrainingExecutor`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._runs: dict[str, _Run] = {}

    async def start(self, *, training_id: str) -> str:
        run = self._runs.get(training_id)
        if run is not None and run.process.poll() is None:
            return training_id  # already running here
        nice = self.settings.training_nice
        command = [
            "nice", "-n", str(nice),
            sys.executable, "-m", "sfumato.cli", "training", "run", "--id", training_id,
        ]  # fmt: skip
        process = await asyncio.to_thread(
            process_guard.start,
            command,
            env=child_environment(self.settings),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        run = _Run(process=process)
        threading.Thread(
            target=self._drain, args=(run,), daemon=True, name=f"training {training_id} log"
        ).start()
        self._runs[training_id] = run
        return training_id

    @staticmethod
    def _drain(run: _Run) -> None:
        assert run.process.stdout is not None
        for raw in run.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                run.tail.append(line)
                sys.stderr.write(f"[training] {line}\n")

    async def poll(self, handle: str) -> ExecutorStatus:
        run = self._runs.get(handle)
        if run is None:
            return ExecutorStatus("failed", "not started by this runner")
        code = run.process.poll()
        if code is None:
            return ExecutorStatus("running")
        if code == 0:
            return ExecutorStatus("succeeded")
        tail = "\n".join(list(run.tail)[-5:])
        return ExecutorStatus("failed", f"the training process exited with {code}: {tail}")

    async def cancel(self, handle: str) -> None:
        run = self._runs.pop(handle, None)
        if run is not None:
            await asyncio.to_thread(process_guard.stop, run.process, timeout=CANCEL_GRACE_S)

    async def aclose(self) -> None:
        for handle in list(self._runs):
            await self.cancel(handle)
