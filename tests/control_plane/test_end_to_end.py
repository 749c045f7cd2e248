"""Through the whole stack: REST API -> jobs table -> in-process worker -> real Triton -> PNG;
``Prefer: wait``, the admin model routes (through the Triton gateway), and a retried job."""

from __future__ import annotations

import hashlib
import io
import time

import numpy as np
from PIL import Image as PILImage

from sfumato.shapes import judge

from .polling import finished, poll_job

PROMPT = "a red circle on a white background"


async def test_generate_and_download_through_triton(api_factory, triton) -> None:
    api = await api_factory(workers=1, triton_url=triton.grpc_url, poll_interval_s=0.05)
    alice = await api.user("alice")
    body = {"prompt": PROMPT, "num_images": 2, "steps": 25, "seed": 1234}
    r = await api.client.post("/v1/generations", json=body, headers=api.headers(alice, Prefer="wait=30"))
    assert r.status_code == 200, r.text
    assert r.headers["preference-applied"] == "wait=30"
    job = r.json()
    assert r.headers["location"] == f"/v1/generations/{job['id']}"
    assert (job["status"], job["attempts"], job["error"]) == ("succeeded", 1, None), job
    assert job["model"] == {"name": "pipeline", "version": "1"}
    assert job["timings"]["inference_s"] > 0 and job["progress"] == 1.0
    assert [img["index"] for img in job["images"]] == [0, 1]
    assert job["images"][0]["seed"] == 1234 and job["seeds"] == [img["seed"] for img in job["images"]]

    for image in job["images"]:
        r = await api.client.get(image["url"], headers=api.headers(alice))
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png"
        assert r.headers["etag"] == f'"{image["sha256"]}"'
        assert hashlib.sha256(r.content).hexdigest() == image["sha256"]
        with PILImage.open(io.BytesIO(r.content)) as png:
            assert png.format == "PNG"
            assert png.text["prompt"] == PROMPT
            assert png.text["seed"] == str(image["seed"])
            assert png.text["steps"] == "25"
            pixels = np.asarray(png.convert("RGB"))
        assert pixels.shape == (image["height"], image["width"], 3) == (32, 32, 3)
        verdict = judge(pixels)
        assert (verdict.colour, verdict.background) == ("red", "white"), verdict

        again = await api.client.get(
            image["url"], headers=api.headers(alice, **{"If-None-Match": r.headers["etag"]})
        )
        assert again.status_code == 304 and not again.content


async def test_prefer_wait_is_capped_at_the_maximum(api_factory, triton) -> None:
    api = await api_factory(workers=1, triton_url=triton.grpc_url, max_wait_s=20, poll_interval_s=0.05)
    alice = await api.user("alice")
    r = await api.client.post(
        "/v1/generations",
        json={"prompt": PROMPT, "steps": 10},
        headers=api.headers(alice, Prefer="respond-async, wait=3600"),
    )
    assert r.status_code == 200, r.text
    assert r.headers["preference-applied"] == "wait=20"
    assert r.json()["status"] == "succeeded"


async def test_prefer_wait_gives_up_at_the_cap(api_factory) -> None:
    """No worker runs: the request answers 202 once the capped wait is over, not after N s."""
    api = await api_factory(workers=0, max_wait_s=1)
    alice = await api.user("alice")
    started = time.monotonic()
    r = await api.client.post(
        "/v1/generations", json={"prompt": PROMPT}, headers=api.headers(alice, Prefer="wait=3600")
    )
    elapsed = time.monotonic() - started
    assert r.status_code == 202, r.text
    assert r.headers["preference-applied"] == "wait=1"
    assert r.json()["status"] == "queued"
    assert 1.0 <= elapsed < 30, f"waited {elapsed:.1f} s for a 1 s cap"


async def test_admins_control_tritons_models(api_factory, triton) -> None:
    api = await api_factory(triton_url=triton.grpc_url, triton_admin_key=triton.admin_key)
    admin, member = await api.user("root", role="admin"), await api.user("alice")
    assert (await api.client.get("/v1/triton/models", headers=api.headers(member))).status_code == 403
    r = await api.client.get("/v1/triton/models", headers=api.headers(admin))
    assert r.status_code == 200, r.text
    states = {m["name"]: m["state"] for m in r.json()}
    assert states == dict.fromkeys(
        ["pipeline", "pipeline_stream", "text_encoder", "unet", "vae_decoder", "vae_encoder"], "READY"
    )
    assert (
        await api.client.post("/v1/models/vae_encoder/unload", headers=api.headers(member))
    ).status_code == 403
    try:
        r = await api.client.post("/v1/models/vae_encoder/unload", headers=api.headers(admin))
        assert r.status_code == 200 and r.json()[0]["state"] == "UNAVAILABLE", r.text
    finally:
        r = await api.client.post("/v1/models/vae_encoder/load", headers=api.headers(admin))
    assert r.status_code == 200 and r.json() == [
        {"name": "vae_encoder", "version": "1", "state": "READY", "reason": ""}
    ], r.text
    r = await api.client.post("/v1/models/nonesuch/load", headers=api.headers(admin))
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"


async def test_a_retried_job_draws_the_images_a_first_run_would(api_factory, triton) -> None:
    api = await api_factory()  # no worker yet: the job waits, and is canceled
    alice = await api.user("alice")
    headers = api.headers(alice)
    r = await api.client.post(
        "/v1/generations", json={"prompt": PROMPT, "num_images": 2, "steps": 10}, headers=headers
    )
    job = r.json()
    assert (await api.client.post(f"/v1/generations/{job['id']}/cancel", headers=headers)).json()[
        "status"
    ] == "canceled"
    r = await api.client.post(f"/v1/generations/{job['id']}/retry", headers=headers)
    assert r.status_code == 202 and r.json()["status"] == "queued", r.text

    await api_factory(workers=1, triton_url=triton.grpc_url, poll_interval_s=0.05)
    retried = await poll_job(api.client, headers, job["id"], finished, timeout=60)
    assert (retried["status"], retried["attempts"]) == ("succeeded", 1), retried
    # A fresh job with the same parameters, the seed drawn at the first submission among them,
    # run alone like the retried one: the same PNGs, byte for byte.
    r = await api.client.post("/v1/generations", json=job["params"], headers=headers)
    fresh = await poll_job(api.client, headers, r.json()["id"], finished, timeout=60)
    assert fresh["status"] == "succeeded", fresh
    assert [img["sha256"] for img in retried["images"]] == [img["sha256"] for img in fresh["images"]]
    assert retried["seeds"] == fresh["seeds"]
