"""The training runner end to end, with real training processes (tiny: seconds of training):

* a runner killed with -9 takes its training process with it; the next runner claims the
  training once the lease ran out and resumes from the last checkpoint: the step count goes on
  from there and the loss curve before it is the one the first run wrote; the LoRA weights are
  then a diffusers LoRA file that ``load_lora_weights`` takes, the validation image is there;
* cancel stops a running training within a heartbeat or two, process included.

SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.control_plane.datasets_zip import shapes_zip

pytestmark = pytest.mark.slow

RUNNER_SETTINGS = {
    "lease_s": 3.0,
    "heartbeat_s": 0.5,
    "poll_interval_s": 0.1,
    "retry_backoff_s": 0.2,
    "training_checkpoint_every": 5,
    "training_threads": 1,
}


def _processes_naming(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


async def _wait(what: str, check, timeout: float = 240.0, interval: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(interval)


async def _submit(api, who, **body) -> dict:  # type: ignore[no-untyped-def]
    data = await api.client.post(
        "/v1/datasets", headers=api.headers(who), files={"file": ("d.zip", shapes_zip(6), "application/zip")}
    )
    assert data.status_code == 201, data.text
    response = await api.client.post(
        "/v1/trainings", headers=api.headers(who), json={"dataset_id": data.json()["id"], **body}
    )
    assert response.status_code == 202, response.text
    return response.json()


def _spawn_runner(api, log: Path) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    from sfumato.control_plane.local_executor import child_environment

    env = child_environment(api.settings)
    env.update(
        SFUMATO_LEASE_S=str(api.settings.lease_s),
        SFUMATO_HEARTBEAT_S=str(api.settings.heartbeat_s),
        SFUMATO_POLL_INTERVAL_S=str(api.settings.poll_interval_s),
        SFUMATO_RETRY_BACKOFF_S=str(api.settings.retry_backoff_s),
        SFUMATO_TRAINING_NICE="0",
    )
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "sfumato.cli", "worker", "--queue", "trainings", "--log-level", "info"],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )


async def test_killed_runner_resumes_from_the_checkpoint(
    api_factory, tmp_path: Path, demo_model: Path
) -> None:
    api = await api_factory(**RUNNER_SETTINGS, training_min_step_s=0.3)
    tess = await api.user("tess", role="trainer")
    training = await _submit(
        api,
        tess,
        method="lora",
        steps=30,
        batch_size=2,
        learning_rate=1e-3,
        validation_prompts=["a pink circle"],
    )
    path = f"/v1/trainings/{training['id']}"

    async def read() -> dict:
        response = await api.client.get(path, headers=api.headers(tess))
        assert response.status_code == 200, response.text
        return response.json()

    log = tmp_path / "runners.log"
    first = _spawn_runner(api, log)
    try:
        seen = await _wait("a first checkpoint", lambda: _checkpointed(api, training["id"]))
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    before = seen
    assert before["status"] == "running"
    # The training process died with its runner (the process guard): nothing runs it now.
    await _wait("the orphaned training process to be gone", _gone(training["id"]), timeout=60)

    second = _spawn_runner(api, log)
    try:
        done = await _wait(
            "the training to finish on the second runner",
            lambda: _final(read),
            timeout=300,
        )
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(60)
    assert done["status"] == "succeeded", (done, log.read_text(errors="replace")[-3000:])
    assert done["attempts"] == 2
    details = await _details(api, training["id"])
    resumed = details["resumed_from"]
    assert len(resumed) == 1 and resumed[0] >= before["checkpoint_step"] and resumed[0] % 5 == 0
    steps = [step for step, _ in details["history"]]
    assert steps == list(range(5, 31, 5)), steps  # one curve, no restart at step 0
    kept = [entry for entry in before["history"] if entry[0] <= resumed[0]]
    assert details["history"][: len(kept)] == kept  # the curve before the checkpoint is the first run's
    assert done["progress"]["step"] == 30 and done["output"] == {"model": "pipeline", "version": None}

    weights = await api.client.get(f"{path}/weights", headers=api.headers(tess))
    assert weights.status_code == 200 and weights.content[:8] != b""
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    (lora_dir / "pytorch_lora_weights.safetensors").write_bytes(weights.content)
    await asyncio.to_thread(_load_lora, demo_model, lora_dir)
    image = await api.client.get(f"{path}/validation/0", headers=api.headers(tess))
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert done["validation_images"][0]["prompt"] == "a pink circle"
    assert _processes_naming(training["id"]) == []


def _load_lora(model: Path, lora_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    pipe.load_lora_weights(str(lora_dir))
    pipe.fuse_lora()


async def _details(api, training_id: str) -> dict:  # type: ignore[no-untyped-def]
    from sfumato.control_plane.models import Job

    async with api.app.state.services.sessions() as session:
        job = await session.get(Job, training_id)
        return {"status": job.status, **(job.details or {})}


async def _checkpointed(api, training_id: str):  # type: ignore[no-untyped-def]
    details = await _details(api, training_id)
    return details if details.get("checkpoint_step") else None


def _gone(training_id: str):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return _processes_naming(training_id) == []

    return check


async def _final(read):  # type: ignore[no-untyped-def]
    body = await read()
    return body if body["status"] in ("succeeded", "failed", "canceled") else None


async def test_cancel_stops_a_running_training(api_factory) -> None:
    from sfumato.control_plane.training_runner import TrainingRunner

    api = await api_factory(**RUNNER_SETTINGS, training_min_step_s=0.05, training_nice=0)
    tess = await api.user("tess", role="trainer")
    training = await _submit(api, tess, method="full", steps=100_000, batch_size=1)
    path = f"/v1/trainings/{training['id']}"
    runner = TrainingRunner(api.app.state.services, name="test-runner")
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:

        async def stepping():  # type: ignore[no-untyped-def]
            body = (await api.client.get(path, headers=api.headers(tess))).json()
            return body if body["progress"]["step"] > 0 else None

        running = await _wait("the training to make steps", stepping)
        assert running["status"] == "running" and running["progress"]["eta_s"] is not None
        asked = time.monotonic()
        response = await api.client.post(f"{path}/cancel", headers=api.headers(tess))
        assert response.status_code == 200

        async def canceled():  # type: ignore[no-untyped-def]
            body = (await api.client.get(path, headers=api.headers(tess))).json()
            return body if body["status"] == "canceled" else None

        done = await _wait("the training to be canceled", canceled, timeout=60)
        took = time.monotonic() - asked
        await _wait("its process to be gone", _gone(training["id"]), timeout=30)
        print(f"canceled {took:.1f} s after the request (heartbeat {api.settings.heartbeat_s} s)")
        assert done["error"] == "canceled while running"
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
