"""From a user's images to a new version served by Triton, in one call: a tiny LoRA training
whose result is exported (``export_version``, the parity checks) as version 2 of the served
model into the model repository, loaded by a real Triton and validated through it
(``publish_version``), with its lineage in ``GET /v1/models``. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import pytest

from sfumato.control_plane.training_runner import TrainingRunner
from tests.control_plane.datasets_zip import shapes_zip

pytestmark = pytest.mark.slow


@pytest.fixture
def private_triton(tmp_path: Path, exported_repo: Path):  # -> (TritonServer, repository)
    """A Triton of its own on a copy of the exported demo model (the test adds a version to it)."""
    from sfumato.triton_server import TritonServer, free_port

    repository = tmp_path / "model_repository"
    shutil.copytree(exported_repo, repository)
    server = TritonServer(
        repository=repository,
        work_dir=tmp_path / "triton",
        admin_key=os.environ["SFUMATO_TRITON_ADMIN_KEY"],
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
    )
    server.start(timeout=600)
    yield server, repository
    server.stop()


# On PostgreSQL only: it is the hand-off to Triton (export, load, validation); the training and
# registry rows are tested on both databases by test_trainings_api and test_registry.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_training_becomes_a_new_version_in_triton(api_factory, private_triton) -> None:
    server, repository = private_triton
    api = await api_factory(
        model_repository=repository,
        triton_url=server.grpc_url,
        heartbeat_s=0.5,
        lease_s=30.0,
        training_threads=1,
        training_nice=0,
    )
    tess = await api.user("tess", role="trainer")
    data = await api.client.post(
        "/v1/datasets", headers=api.headers(tess), files={"file": ("d.zip", shapes_zip(6), "application/zip")}
    )
    models = (await api.client.get("/v1/models", headers=api.headers(tess))).json()
    served = next(m for m in models if m["default"])
    response = await api.client.post(
        "/v1/trainings",
        headers=api.headers(tess),
        json={
            "dataset_id": data.json()["id"],
            "method": "lora",
            "steps": 4,
            "batch_size": 2,
            "validation_prompts": ["a pink circle on a white background"],
        },
    )
    assert response.status_code == 202, response.text
    training = response.json()
    assert training["base_model"] == served["name"]
    runner = TrainingRunner(api.app.state.services, name="test-runner")
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        deadline = time.monotonic() + 900
        while True:
            body = (await api.client.get(f"/v1/trainings/{training['id']}", headers=api.headers(tess))).json()
            if body["status"] in ("succeeded", "failed", "canceled"):
                break
            assert time.monotonic() < deadline, body
            await asyncio.sleep(1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 120)
    assert body["status"] == "succeeded", body
    assert body["output"] == {"model": served["name"], "version": "2"}
    models = (await api.client.get("/v1/models", headers=api.headers(tess))).json()
    model = next(m for m in models if m["name"] == served["name"])
    version = next(v for v in model["versions"] if v["version"] == 2)
    assert version["status"] == "ready", version
    assert version["lineage"]["training_id"] == training["id"]
    assert version["lineage"]["dataset_id"] == data.json()["id"]
    assert version["lineage"]["base_model"] == served["name"] and version["lineage"]["base_version"] == 1
    assert version["validation"], version  # the validation prompt ran through Triton
    assert not version["deployed"] and model["deployed_version"] == 1  # deploy: false
