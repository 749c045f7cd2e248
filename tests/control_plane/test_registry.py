"""The model registry against a real Triton: two versions of a model side by side, generations
naming a model and version, limits at submission, deploy / rollback under steady traffic with no
failed request, publishing a version (export -> load -> validation -> lineage) and deleting it.

One Triton per module serves a repository of its own: the demo model exported with small
instance counts as version 1, and as version 2 a copy whose VAE decoder draws less red (so the
two versions' images tell them apart). Every test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from sfumato.control_plane import registry
from sfumato.model_repository import models_on_disk
from tests.triton_exit import stop_and_check

from .problems import assert_problem

PROMPT = "a red circle on a white background"
pytestmark = pytest.mark.slow


@dataclass
class Versioned:
    repository: Path
    tinted: Path  # the demo model with a tinted VAE decoder (a "fine-tune": less red)
    grpc_url: str
    admin_key: str


def tinted_copy(demo_model: Path, out: Path) -> Path:
    """The demo model with the VAE decoder's red output bias lowered: the same shapes, less red."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(demo_model, out)
    weights = out / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["decoder.conv_out.bias"] = tensors["decoder.conv_out.bias"] + np.array([-0.6, 0, 0], np.float32)
    save_file(tensors, weights)
    return out


@pytest.fixture(scope="module")
def versioned(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Versioned]:
    from sfumato.export.repository import ExportOptions, export_model_repository
    from sfumato.export.versions import export_version
    from sfumato.triton_server import TritonServer, free_port

    base = tmp_path_factory.mktemp("versioned")
    repository = base / "model_repository"
    export_model_repository(
        demo_model,
        repository,
        ExportOptions(target="cpu", default_guidance=5.0, pipeline_instances=2, stream_instances=1),
    )
    tinted = tinted_copy(demo_model, base / "tinted")
    exported = export_version(tinted, repository=repository, model="sfumato-shapes")
    assert exported.version == 2 and exported.pipeline_model == "pipeline"
    server = TritonServer(
        repository=repository,
        work_dir=tmp_path_factory.mktemp("triton-versioned"),
        admin_key=os.environ["SFUMATO_TRITON_ADMIN_KEY"],
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        exit_timeout_secs=30,
    )
    server.start(timeout=300)
    yield Versioned(
        repository=repository, tinted=tinted, grpc_url=server.grpc_url, admin_key=server.admin_key
    )
    stop_and_check(server)


async def _api(api_factory, versioned: Versioned, **settings: object):
    return await api_factory(
        triton_url=versioned.grpc_url,
        triton_admin_key=versioned.admin_key,
        model_repository=versioned.repository,
        poll_interval_s=0.05,
        **settings,
    )


def _mean_rgb(png: bytes) -> np.ndarray:
    with PILImage.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(axis=0)


async def test_models_list_versions_limits_and_admin_routes(api_factory, versioned) -> None:
    api = await _api(api_factory, versioned)
    admin, alice = await api.user("root", role="admin"), await api.user("alice")

    assert_problem(await api.client.get("/v1/models"), 401)
    r = await api.client.get("/v1/models", headers=api.headers(alice))
    assert r.status_code == 200, r.text
    [model] = r.json()
    assert (model["name"], model["default"], model["triton_model"]) == ("sfumato-shapes", True, "pipeline")
    # Registered from the repository on first start; the latest version deployed.
    assert [(v["version"], v["status"], v["deployed"]) for v in model["versions"]] == [
        (1, "ready", False),
        (2, "ready", True),
    ]
    assert model["deployed_version"] == 2
    assert model["limits"]["min_size"] == 16 and model["limits"]["max_size"] == 64
    assert model["defaults"]["width"] == 32 and model["defaults"]["guidance_scale"] == 5.0
    assert model["versions"][1]["files"]["pipeline/2/model.py"]  # file hashes from the manifest
    assert model["versions"][0]["lineage"]["source"].endswith("sfumato-shapes")

    r = await api.client.get("/v1/models/sfumato-shapes/versions/1", headers=api.headers(alice))
    assert r.status_code == 200 and r.json()["version"] == 1, r.text
    assert_problem(await api.client.get("/v1/models/nonesuch", headers=api.headers(alice)), 404)
    assert_problem(
        await api.client.get("/v1/models/sfumato-shapes/versions/9", headers=api.headers(alice)), 404
    )
    assert_problem(
        await api.client.get("/v1/models/sfumato-shapes/versions/0", headers=api.headers(alice)), 422
    )

    # Admin only: deploy, rollback, delete (members get 403 whatever the target).
    for method, path in (
        ("POST", "/v1/models/sfumato-shapes/versions/1/deploy"),
        ("POST", "/v1/models/sfumato-shapes/rollback"),
        ("DELETE", "/v1/models/sfumato-shapes/versions/1"),
        ("POST", "/v1/models/nonesuch/versions/1/deploy"),
    ):
        assert_problem(await api.client.request(method, path, headers=api.headers(alice)), 403)
        assert_problem(await api.client.request(method, path), 401)
    assert_problem(
        await api.client.post("/v1/models/nonesuch/versions/1/deploy", headers=api.headers(admin)), 404
    )
    assert_problem(
        await api.client.post("/v1/models/sfumato-shapes/versions/7/deploy", headers=api.headers(admin)), 404
    )
    assert_problem(await api.client.post("/v1/models/nonesuch/rollback", headers=api.headers(admin)), 404)
    assert_problem(await api.client.delete("/v1/models/nonesuch/versions/1", headers=api.headers(admin)), 404)
    assert_problem(
        await api.client.delete("/v1/models/sfumato-shapes/versions/7", headers=api.headers(admin)), 404
    )

    # Deploy 1, roll back to 2, roll back to 1 again.
    r = await api.client.post("/v1/models/sfumato-shapes/versions/1/deploy", headers=api.headers(admin))
    assert r.status_code == 200 and r.json()["deployed"] is True, r.text
    r = await api.client.get("/v1/models/sfumato-shapes", headers=api.headers(alice))
    assert r.json()["deployed_version"] == 1
    r = await api.client.post("/v1/models/sfumato-shapes/rollback", headers=api.headers(admin))
    assert r.status_code == 200 and r.json()["version"] == 2, r.text
    r = await api.client.post("/v1/models/sfumato-shapes/rollback", headers=api.headers(admin))
    assert r.status_code == 200 and r.json()["version"] == 1, r.text

    # The deployed version cannot be deleted; nothing changed on disk.
    body = assert_problem(
        await api.client.delete("/v1/models/sfumato-shapes/versions/1", headers=api.headers(admin)), 409
    )
    assert "deployed" in body["detail"]
    assert models_on_disk(versioned.repository)["sfumato-shapes"] == [1, 2]
    # Back to the state the other tests start from.
    r = await api.client.post("/v1/models/sfumato-shapes/versions/2/deploy", headers=api.headers(admin))
    assert r.status_code == 200, r.text


async def test_generations_name_a_model_and_version_side_by_side(api_factory, versioned) -> None:
    api = await _api(api_factory, versioned, workers=1)
    alice = await api.user("alice")
    means = {}
    for version in (1, 2):
        body = {"prompt": PROMPT, "steps": 10, "seed": 7, "model": "sfumato-shapes", "model_version": version}
        r = await api.client.post("/v1/generations", json=body, headers=api.headers(alice, Prefer="wait=120"))
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["status"] == "succeeded", job
        assert job["model"] == {"name": "sfumato-shapes", "version": str(version)}
        assert job["params"]["model"] == "sfumato-shapes" and job["params"]["model_version"] == version
        png = await api.client.get(job["images"][0]["url"], headers=api.headers(alice))
        means[version] = _mean_rgb(png.content)
    # Same seed and prompt, the other version's weights: version 2 draws less red.
    assert means[1][0] > means[2][0] + 20, means
    assert np.allclose(means[2][1:], means[1][1:], atol=25), means

    # Naming no version: the deployed one (2); naming no model: the default model's.
    r = await api.client.post(
        "/v1/generations", json={"prompt": PROMPT, "steps": 5}, headers=api.headers(alice, Prefer="wait=120")
    )
    assert r.status_code == 200 and r.json()["model"] == {"name": "sfumato-shapes", "version": "2"}, r.text


async def test_unknown_models_and_the_served_models_limits_are_422_naming_the_field(
    api_factory, versioned
) -> None:
    api = await _api(api_factory, versioned)
    alice = await api.user("alice")
    for body, field in (
        ({"prompt": PROMPT, "model": "nonesuch"}, "model"),
        ({"prompt": PROMPT, "model": "sfumato-shapes", "model_version": 9}, "model_version"),
        ({"prompt": PROMPT, "model_version": 1}, "model_version"),
        ({"prompt": PROMPT, "model": "sfumato-shapes", "model_version": 0}, "model_version"),
        # The schema allows 8..4096; this model serves 16..64 (its Triton config says so).
        ({"prompt": PROMPT, "width": 72}, "width"),
        ({"prompt": PROMPT, "height": 8, "model": "sfumato-shapes", "model_version": 1}, "height"),
    ):
        r = await api.client.post("/v1/generations", json=body, headers=api.headers(alice))
        body_out = assert_problem(r, 422, field)
        assert field in body_out["detail"], body_out
    r = await api.client.get("/v1/generations", headers=api.headers(alice))
    assert r.json()["items"] == []  # nothing was queued
    r = await api.client.post(
        "/v1/generations", json={"prompt": PROMPT, "width": 64}, headers=api.headers(alice)
    )
    assert r.status_code == 202, r.text


async def test_deploy_and_rollback_under_steady_traffic_fail_no_request(api_factory, versioned) -> None:
    """Four clients submit and wait without pause while an admin deploys 1, rolls back to 2,
    and rolls back to 1 again; every request succeeds, and after each switch the new default
    serves (the jobs record which version did)."""
    api = await _api(api_factory, versioned, workers=1, max_queued_jobs_per_user=1000)
    admin, alice = await api.user("root", role="admin"), await api.user("alice")
    served: list[tuple[int, str, int]] = []  # (HTTP status, job status, version)
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            r = await api.client.post(
                "/v1/generations",
                json={"prompt": PROMPT, "steps": 4},
                headers=api.headers(alice, Prefer="wait=120"),
            )
            job = r.json()
            served.append(
                (r.status_code, job.get("status", ""), int(job.get("model", {}).get("version") or 0))
            )

    async def until_served(version: int, after: int) -> None:
        deadline = time.monotonic() + 180
        while not any(v == version for _, _, v in served[after:]):
            assert time.monotonic() < deadline, f"version {version} never served after the deploy: {served}"
            await asyncio.sleep(0.05)

    clients = [asyncio.create_task(client()) for _ in range(4)]
    try:
        await until_served(2, 0)
        for path, version in (
            ("/v1/models/sfumato-shapes/versions/1/deploy", 1),
            ("/v1/models/sfumato-shapes/rollback", 2),
            ("/v1/models/sfumato-shapes/rollback", 1),
        ):
            r = await api.client.post(path, headers=api.headers(admin))
            assert r.status_code == 200 and r.json()["version"] == version, r.text
            # Jobs submitted from here on get the new version (the ones in flight keep theirs).
            mark = len(served)
            await until_served(version, mark + 4)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    failed = [s for s in served if s[:2] != (200, "succeeded")]
    assert not failed, f"{len(failed)} of {len(served)} requests failed: {failed[:5]}"
    assert {v for _, _, v in served} == {1, 2}
    r = await api.client.post("/v1/models/sfumato-shapes/versions/2/deploy", headers=api.headers(admin))
    assert r.status_code == 200, r.text


# On PostgreSQL only: what it adds is Triton's side (a new model's six Triton models loaded, a version
# unloaded and deleted); the registry's rows and routes run on both databases in the tests above.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_publish_a_new_model_deploy_it_and_delete_a_version(api_factory, versioned) -> None:
    """export_version -> publish_version (Triton loads it, the validation prompts run on it, the
    lineage is recorded) -> served beside the old model -> a second version deployed (the model
    becomes the default) -> the first deleted (unloaded, its folders gone) while the second
    serves -> the old default deployed again."""
    from sfumato.export.versions import export_version

    api = await _api(api_factory, versioned, workers=1)
    admin, alice = await api.user("root", role="admin"), await api.user("alice")
    services = api.app.state.services  # type: ignore[attr-defined]

    async def generate(body: dict) -> dict:
        r = await api.client.post(
            "/v1/generations",
            json={"prompt": PROMPT, "steps": 4, **body},
            headers=api.headers(alice, Prefer="wait=120"),
        )
        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
        return r.json()

    async def publish(**kwargs: object):
        exported = await asyncio.to_thread(
            export_version, versioned.tinted, repository=versioned.repository, model="shapes-pink"
        )
        async with services.sessions() as session:
            return exported, await registry.publish_version(
                session=session, triton=services.triton, model="shapes-pink", exported=exported, **kwargs
            )

    lineage = {
        "base_model": "sfumato-shapes",
        "base_version": 2,
        "dataset_id": "d1",
        "training_id": "t1",
        "parameters": {"method": "lora", "steps": 10, "validation_prompts": [PROMPT, "a blue square"]},
        "metrics": {"loss": 0.1},
    }
    exported, version = await publish(lineage=lineage, deploy=False)
    assert exported.new_model and exported.version == 1 and exported.pipeline_model == "shapes-pink__pipeline"
    assert (version.status, version.version, version.deployed) == ("ready", 1, False)
    assert [v["prompt"] for v in version.validation] == [PROMPT, "a blue square"]
    assert version.files == exported.files and version.lineage["training_id"] == "t1"

    r = await api.client.get("/v1/models", headers=api.headers(alice))
    models = {m["name"]: m for m in r.json()}
    assert set(models) == {"sfumato-shapes", "shapes-pink"}
    pink = models["shapes-pink"]
    assert (pink["default"], pink["deployed_version"], pink["limits"]["max_size"]) == (False, None, 64)
    assert pink["versions"][0]["lineage"]["parameters"]["method"] == "lora"
    # No deployed version yet: naming the model alone is a 422; naming its version serves.
    r = await api.client.post(
        "/v1/generations", json={"prompt": PROMPT, "model": "shapes-pink"}, headers=api.headers(alice)
    )
    assert_problem(r, 422, "model_version")
    assert (await generate({"model": "shapes-pink", "model_version": 1}))["model"]["version"] == "1"

    _, second = await publish(lineage={"base_model": "shapes-pink", "base_version": 1}, deploy=True)
    assert (second.version, second.deployed) == (2, True)
    assert (await generate({}))["model"] == {"name": "shapes-pink", "version": "2"}  # the default now
    r = await api.client.delete("/v1/models/shapes-pink/versions/2", headers=api.headers(admin))
    assert "deployed" in assert_problem(r, 409)["detail"]

    r = await api.client.delete("/v1/models/shapes-pink/versions/1", headers=api.headers(admin))
    assert r.status_code == 204, r.text
    assert models_on_disk(versioned.repository)["shapes-pink"] == [2]
    states = {(m.name, m.version): m.state for m in await services.triton.models()}
    assert states[("shapes-pink__pipeline", "2")] == "READY"
    assert states.get(("shapes-pink__pipeline", "1"), "gone") != "READY"
    assert (await generate({"model": "shapes-pink"}))["model"]["version"] == "2"  # still serves
    assert_problem(await api.client.get("/v1/models/shapes-pink/versions/1", headers=api.headers(alice)), 404)

    r = await api.client.post("/v1/models/sfumato-shapes/versions/2/deploy", headers=api.headers(admin))
    assert r.status_code == 200, r.text
    assert (await generate({}))["model"] == {"name": "sfumato-shapes", "version": "2"}

    # Leave the repository as the other tests expect it (a deployed version is never deleted
    # through the API: unload the model and remove its folders by hand).
    for component in ("pipeline_stream", "pipeline", "text_encoder", "unet", "vae_encoder", "vae_decoder"):
        await services.triton.unload(f"shapes-pink__{component}")
    for path in versioned.repository.glob("shapes-pink__*"):
        shutil.rmtree(path)
