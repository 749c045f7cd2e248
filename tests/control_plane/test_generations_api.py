"""``/v1/generations`` over HTTP, on SQLite and on PostgreSQL: submission and its validation,
limits (per-user queue cap, rate limit, body size), img2img / inpainting uploads, reads, listing
with cursors, cancel, delete, image download with ETags, ``Prefer: wait`` and idempotency keys.

No Triton here: a job is finished through ``leases.claim`` / ``leases.complete`` (the
``complete_job`` fixture), the same calls a worker makes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import time
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import func, select

from sfumato.control_plane import jobs, leases
from sfumato.control_plane.models import IdempotencyRecord, Job
from sfumato.serving.request import MAX_SEED

from .problems import assert_problem

PROMPT = "a red circle on a white background"


def encoded(array: np.ndarray, *, fmt: str = "PNG") -> str:
    """A ``uint8`` array (``[H, W, 3]`` RGB or ``[H, W]`` grey) as a base64 image file."""
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


async def count_jobs(api: Any) -> int:
    async with api.app.state.services.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(Job)) or 0)


async def submit(api: Any, who: dict[str, str], body: dict[str, Any] | None = None, **headers: str) -> Any:
    return await api.client.post(
        "/v1/generations",
        json={"prompt": PROMPT} if body is None else body,
        headers=api.headers(who, **headers),
    )


# --------------------------------------------------------------------------- submission


async def test_submit_answers_202_with_location_and_a_fixed_seed(api) -> None:
    alice = await api.user("alice")
    r = await submit(api, alice, {"prompt": PROMPT, "num_images": 2, "steps": 10, "scheduler": "euler"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/generations/{job['id']}"
    assert "idempotent-replayed" not in r.headers and "preference-applied" not in r.headers
    assert job["status"] == "queued" and job["progress"] == 0.0 and job["attempts"] == 0
    assert job["images"] == [] and job["seeds"] == [] and job["error"] is None
    assert job["model"]["name"] == "pipeline"
    assert job["timings"] == {"queued_s": None, "inference_s": None, "total_s": None}
    params = job["params"]
    assert params["prompt"] == PROMPT and params["num_images"] == 2 and params["steps"] == 10
    assert params["scheduler"] == "euler"
    # No seed asked for: one is drawn now, so a retried job draws the same images.
    assert isinstance(params["seed"], int) and 0 <= params["seed"] <= MAX_SEED

    again = (await api.client.get(r.headers["location"], headers=api.headers(alice))).json()
    assert again["params"]["seed"] == params["seed"] and again["id"] == job["id"]
    other = (await submit(api, alice)).json()
    assert other["params"]["seed"] != params["seed"]  # drawn per job (a 1 in 2**63 flake)
    fixed = (await submit(api, alice, {"prompt": PROMPT, "seed": 7})).json()
    assert fixed["params"]["seed"] == 7
    assert await count_jobs(api) == 3


async def test_invalid_submissions_are_422_problems_naming_the_field(api_factory) -> None:
    api = await api_factory(max_image_bytes=8192)
    alice = await api.user("alice")
    image = encoded(picture(32, 32))
    cases: list[tuple[dict[str, Any], str]] = [
        ({"prompt": "   "}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({}, "prompt"),
        ({"prompt": PROMPT, "width": 36}, "width"),
        ({"prompt": PROMPT, "height": 4}, "height"),
        ({"prompt": PROMPT, "steps": 0}, "steps"),
        ({"prompt": PROMPT, "num_images": 9}, "num_images"),
        ({"prompt": PROMPT, "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": PROMPT, "seed": -1}, "seed"),
        ({"prompt": PROMPT, "colour": "red"}, "colour"),
        ({"prompt": PROMPT, "scheduler": "bogus"}, "scheduler"),
        ({"prompt": PROMPT, "strength": 0.5}, "strength"),
        ({"prompt": PROMPT, "image": image, "strength": 0}, "strength"),
        ({"prompt": PROMPT, "mask": encoded(np.zeros((32, 32), np.uint8))}, "mask"),
        ({"prompt": PROMPT, "image": "not base64!"}, "image"),
        ({"prompt": PROMPT, "image": base64.b64encode(b"just some bytes").decode()}, "image"),
        ({"prompt": PROMPT, "image": encoded(picture(32, 32), fmt="GIF")}, "image"),
        ({"prompt": PROMPT, "image": encoded(picture(32, 36))}, "image"),
        ({"prompt": PROMPT, "image": image, "width": 64}, "width"),
        ({"prompt": PROMPT, "image": image, "mask": encoded(np.zeros((32, 40), np.uint8))}, "mask"),
        ({"prompt": PROMPT, "image": image, "mask": "%%%"}, "mask"),
    ]
    for body, field in cases:
        r = await submit(api, alice, body)
        problem = assert_problem(r, 422, field)
        assert field in problem["detail"], problem
        assert problem["instance"] == "/v1/generations"

    r = await api.client.post(
        "/v1/generations",
        content=b'{"prompt": ',
        headers=api.headers(alice, **{"Content-Type": "application/json"}),
    )
    assert_problem(r, 422)
    # A decoded image over max_image_bytes: 413, whatever the body size cap.
    r = await submit(api, alice, {"prompt": PROMPT, "image": encoded(picture(64, 64))})
    assert_problem(r, 413)
    # Nothing invalid was recorded, nothing stored.
    assert await count_jobs(api) == 0
    assert not any(api.app.state.services.store.root.rglob("*.png"))


async def test_img2img_and_inpainting_inputs_are_stored_and_the_job_queued(api) -> None:
    alice = await api.user("alice")
    source = picture(32, 48, seed=1)
    mask = np.zeros((32, 48), np.uint8)
    mask[8:24, 8:40] = 255
    body = {"prompt": PROMPT, "image": encoded(source), "mask": encoded(mask), "strength": 0.6}
    r = await submit(api, alice, body)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued"
    assert job["params"]["image"] is True and job["params"]["mask"] is True
    assert job["params"]["strength"] == 0.6
    assert not any(k.endswith("_key") for k in job["params"]), job["params"]  # no storage paths leak
    assert "iVBOR" not in r.text  # the uploads are not echoed back

    store = api.app.state.services.store
    async with api.app.state.services.sessions() as session:
        row = await session.get(Job, job["id"])
        keys = {name: row.params[f"{name}_key"] for name in ("image", "mask")}
    with PILImage.open(io.BytesIO(await store.get(keys["image"]))) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(img), source)
    with PILImage.open(io.BytesIO(await store.get(keys["mask"]))) as img:
        assert img.format == "PNG" and img.mode == "L"
        np.testing.assert_array_equal(np.asarray(img), mask)

    # A JPEG source works too (img2img without a mask); it is stored as PNG.
    r = await submit(api, alice, {"prompt": PROMPT, "image": encoded(source, fmt="JPEG"), "width": 48})
    assert r.status_code == 202, r.text
    assert r.json()["params"]["image"] is True and "mask" not in r.json()["params"]

    # Deleting the job removes its inputs from the store.
    r = await api.client.delete(f"/v1/generations/{job['id']}", headers=api.headers(alice))
    assert r.status_code == 204
    assert not await store.exists(keys["image"]) and not await store.exists(keys["mask"])


async def test_prefer_wait_without_a_worker_answers_202_after_the_wait(api_factory) -> None:
    api = await api_factory(max_wait_s=1)
    alice = await api.user("alice")
    started = time.monotonic()
    r = await submit(api, alice, Prefer="wait=1")
    elapsed = time.monotonic() - started
    assert r.status_code == 202, r.text
    assert r.headers["preference-applied"] == "wait=1"
    assert r.json()["status"] == "queued" and r.headers["location"].endswith(r.json()["id"])
    assert 0.9 <= elapsed < 5, elapsed
    # A longer wait than max_wait_s is cut to it, and says so.
    started = time.monotonic()
    r = await submit(api, alice, Prefer="respond-async, wait=30")
    assert r.status_code == 202 and r.headers["preference-applied"] == "wait=1"
    assert time.monotonic() - started < 5


async def test_prefer_wait_answers_200_when_the_job_finishes_in_time(api, complete_job) -> None:
    alice = await api.user("alice")

    async def finish_when_queued() -> list[bytes]:
        for _ in range(200):
            async with api.app.state.services.sessions() as session:
                queued = await session.scalar(select(Job.id).where(Job.status == "queued"))
            if queued is not None:
                return await complete_job(api, queued)
            await asyncio.sleep(0.02)
        raise AssertionError("the job never appeared")

    worker = asyncio.create_task(finish_when_queued())
    r = await submit(api, alice, Prefer="wait=10")
    pngs = await worker
    assert r.status_code == 200, r.text
    assert r.headers["preference-applied"] == "wait=10"
    job = r.json()
    assert job["status"] == "succeeded" and len(job["images"]) == 1
    assert job["images"][0]["sha256"] == hashlib.sha256(pngs[0]).hexdigest()

    # With `Accept: image/png`, the answer is the first image itself.
    worker = asyncio.create_task(finish_when_queued())
    r = await submit(api, alice, {"prompt": PROMPT, "seed": 3}, Prefer="wait=10", Accept="image/png")
    pngs = await worker
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == pngs[0] and r.headers["etag"] == f'"{hashlib.sha256(pngs[0]).hexdigest()}"'
    assert r.headers["location"].startswith("/v1/generations/")


async def test_unfinished_jobs_per_user_are_capped_with_429(api_factory) -> None:
    api = await api_factory(max_queued_jobs_per_user=2)
    alice, bob = await api.user("alice"), await api.user("bob")
    first = (await submit(api, alice)).json()
    assert (await submit(api, alice)).status_code == 202
    r = await submit(api, alice)
    problem = assert_problem(r, 429)
    assert int(r.headers["retry-after"]) > 0 and "2" in problem["detail"]
    assert (await submit(api, bob)).status_code == 202  # per user
    # A finished job no longer counts.
    r = await api.client.post(f"/v1/generations/{first['id']}/cancel", headers=api.headers(alice))
    assert r.status_code == 200
    assert (await submit(api, alice)).status_code == 202
    assert await count_jobs(api) == 4


async def test_concurrent_submissions_never_overshoot_the_queue_cap(api_factory) -> None:
    # Twelve submissions at once against a cap of 3: without the lock on the owner's row,
    # PostgreSQL lets several of them count "2 unfinished" and insert (READ COMMITTED).
    api = await api_factory(max_queued_jobs_per_user=3)
    alice = await api.user("alice")
    answers = await asyncio.gather(*(submit(api, alice) for _ in range(12)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [202] * 3 + [429] * 9, [r.text for r in answers if r.status_code not in (202, 429)]
    assert await count_jobs(api) == 3


async def test_rate_limits_answer_429_with_retry_after(api_factory) -> None:
    api = await api_factory(submit_rate_limit="3/minute", rate_limit="8/minute")
    alice, bob = await api.user("alice"), await api.user("bob")
    for _ in range(3):
        assert (await submit(api, alice)).status_code == 202
    r = await submit(api, alice)
    body = assert_problem(r, 429)
    assert 1 <= int(r.headers["retry-after"]) <= 60 and "3/minute" in body["detail"]
    assert await count_jobs(api) == 3
    assert (await submit(api, bob)).status_code == 202  # per principal

    # Every authenticated request counts against rate_limit: alice has made 4 of 8.
    for _ in range(4):
        assert (await api.client.get("/v1/generations", headers=api.headers(alice))).status_code == 200
    r = await api.client.get("/v1/generations", headers=api.headers(alice))
    assert_problem(r, 429)
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert (await api.client.get("/v1/generations", headers=api.headers(bob))).status_code == 200


async def test_body_size_cap_answers_413_with_or_without_content_length(api_factory) -> None:
    api = await api_factory(max_body_bytes=2000)
    alice = await api.user("alice")
    big = {"prompt": "x" * 1900, "negative_prompt": "y" * 200}
    r = await submit(api, alice, big)
    assert int(r.request.headers["content-length"]) > 2000
    assert_problem(r, 413)
    assert r.headers["x-request-id"]

    async def chunks():  # no Content-Length: Transfer-Encoding: chunked
        yield b'{"prompt": "'
        for _ in range(30):
            yield b"z" * 100
        yield b'"}'

    headers = api.headers(alice, **{"Content-Type": "application/json"})
    r = await api.client.post("/v1/generations", content=chunks(), headers=headers)
    assert "content-length" not in r.request.headers
    assert_problem(r, 413)
    # Also before authentication, and a streamed body under the cap still works.
    r = await api.client.post(
        "/v1/generations", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert_problem(r, 413)

    async def small():
        yield b'{"prompt": "'
        yield PROMPT.encode()
        yield b'"}'

    r = await api.client.post("/v1/generations", content=small(), headers=headers)
    assert r.status_code == 202, r.text
    assert await count_jobs(api) == 1


# --------------------------------------------------------------------------- reads


async def test_get_and_list_newest_first_with_cursor_pages(api_factory) -> None:
    api = await api_factory(max_queued_jobs_per_user=100)
    alice, bob = await api.user("alice"), await api.user("bob")
    ids = [(await submit(api, alice, {"prompt": f"{PROMPT} {i}"})).json()["id"] for i in range(25)]
    await submit(api, bob)

    r = await api.client.get(f"/v1/generations/{ids[3]}", headers=api.headers(alice))
    assert r.status_code == 200 and r.json()["params"]["prompt"] == f"{PROMPT} 3"

    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 10} | ({"cursor": cursor} if cursor else {})
        r = await api.client.get("/v1/generations", params=params, headers=api.headers(alice))
        assert r.status_code == 200, r.text
        page = r.json()
        pages.append([item["id"] for item in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert len(pages) < 5, "pagination does not end"
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [i for p in pages for i in p] == ids[::-1]  # newest first, no overlap, nothing missed

    r = await api.client.get("/v1/generations", params={"limit": 25}, headers=api.headers(alice))
    assert len(r.json()["items"]) == 25 and r.json()["next_cursor"] is None
    r = await api.client.get("/v1/generations", headers=api.headers(alice))
    assert len(r.json()["items"]) == 20  # the default limit
    r = await api.client.get("/v1/generations", headers=api.headers(bob))
    assert len(r.json()["items"]) == 1 and r.json()["items"][0]["id"] not in ids


async def test_list_filters_by_status_and_rejects_bad_parameters(api) -> None:
    alice = await api.user("alice")
    ids = [(await submit(api, alice)).json()["id"] for _ in range(4)]
    for job_id in ids[1:3]:
        r = await api.client.post(f"/v1/generations/{job_id}/cancel", headers=api.headers(alice))
        assert r.status_code == 200
    get = api.client.get
    r = await get("/v1/generations", params={"status": "canceled"}, headers=api.headers(alice))
    assert {i["id"] for i in r.json()["items"]} == set(ids[1:3])
    assert all(i["status"] == "canceled" for i in r.json()["items"])
    r = await get("/v1/generations", params={"status": "queued"}, headers=api.headers(alice))
    assert [i["id"] for i in r.json()["items"]] == [ids[3], ids[0]]
    r = await get("/v1/generations", params={"status": "succeeded"}, headers=api.headers(alice))
    assert r.json() == {"items": [], "next_cursor": None}
    # A cursor with a status filter pages within the filter.
    r = await get("/v1/generations", params={"status": "queued", "limit": 1}, headers=api.headers(alice))
    cursor = r.json()["next_cursor"]
    assert [i["id"] for i in r.json()["items"]] == [ids[3]] and cursor
    r = await get(
        "/v1/generations",
        params={"status": "queued", "limit": 1, "cursor": cursor},
        headers=api.headers(alice),
    )
    assert [i["id"] for i in r.json()["items"]] == [ids[0]] and r.json()["next_cursor"] is None

    for params, field in [
        ({"limit": 101}, "limit"),
        ({"limit": 0}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"status": "done"}, "status"),
        ({"cursor": "x" * 201}, "cursor"),
    ]:
        assert_problem(await get("/v1/generations", params=params, headers=api.headers(alice)), 422, field)
    # A cursor of the right length that does not parse is a 400 naming it (tests/control_plane/
    # test_hostile_input.py feeds random ones).
    for cursor in ("not-a-cursor", base64.urlsafe_b64encode(b"yesterday|abc").decode()):
        r = await get("/v1/generations", params={"cursor": cursor}, headers=api.headers(alice))
        assert_problem(r, 400, "cursor")


# --------------------------------------------------------------------------- cancel / delete / images


async def test_cancel_and_delete(api) -> None:
    alice = await api.user("alice")
    job = (await submit(api, alice)).json()
    url = f"/v1/generations/{job['id']}"
    r = await api.client.post(f"{url}/cancel", headers=api.headers(alice))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "canceled" and r.json()["finished_at"] is not None
    assert r.json()["timings"]["total_s"] is not None
    assert (await api.client.get(url, headers=api.headers(alice))).json()["status"] == "canceled"
    assert_problem(await api.client.post(f"{url}/cancel", headers=api.headers(alice)), 409)
    # A canceled job is never claimed.
    async with api.app.state.services.sessions() as session:
        assert await leases.claim(session=session, worker_id="w", lease_s=30) == []

    assert_problem(await api.client.get(f"{url}/images/0", headers=api.headers(alice)), 404)
    r = await api.client.delete(url, headers=api.headers(alice))
    assert r.status_code == 204 and r.content == b""
    for method, path in [
        ("GET", url),
        ("DELETE", url),
        ("POST", f"{url}/cancel"),
        ("GET", f"{url}/images/0"),
    ]:
        assert_problem(await api.client.request(method, path, headers=api.headers(alice)), 404)
    assert await count_jobs(api) == 0
    assert_problem(await api.client.get("/v1/generations/nope", headers=api.headers(alice)), 404)


async def test_cancel_of_a_running_job_is_flagged_for_its_worker(api) -> None:
    alice = await api.user("alice")
    job = (await submit(api, alice)).json()
    async with api.app.state.services.sessions() as session:
        claimed = await leases.claim(session=session, worker_id="w", lease_s=30)
    assert [c.id for c in claimed] == [job["id"]]
    r = await api.client.post(f"/v1/generations/{job['id']}/cancel", headers=api.headers(alice))
    assert r.status_code == 200 and r.json()["status"] == "running"
    async with api.app.state.services.sessions() as session:
        verdicts = await leases.heartbeat(session=session, worker_id="w", job_ids=[job["id"]], lease_s=30)
    assert verdicts == {job["id"]: "cancel"}


async def test_retry_queues_a_failed_or_canceled_job_again_as_new(api_factory, complete_job) -> None:
    api = await api_factory(max_queued_jobs_per_user=3)
    alice, bob = await api.user("alice"), await api.user("bob")
    sessions = api.app.state.services.sessions
    failed = (await submit(api, alice, {"prompt": PROMPT, "num_images": 2})).json()
    async with sessions() as session:  # a worker takes it and it fails
        [claimed] = await leases.claim(session=session, worker_id="w", lease_s=30)
    async with sessions() as session:
        assert await leases.finish(
            session=session, job_id=claimed.id, worker_id="w", status="failed", error="Triton said no"
        )
    before = (await api.client.get(f"/v1/generations/{failed['id']}", headers=api.headers(alice))).json()
    assert (before["status"], before["attempts"], before["error"]) == ("failed", 1, "Triton said no")

    # Another user's job is not found; a missing one neither.
    assert_problem(
        await api.client.post(f"/v1/generations/{failed['id']}/retry", headers=api.headers(bob)), 404
    )
    assert_problem(await api.client.post("/v1/generations/nope/retry", headers=api.headers(alice)), 404)

    r = await api.client.post(f"/v1/generations/{failed['id']}/retry", headers=api.headers(alice))
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/generations/{failed['id']}"
    job = r.json()
    assert (job["status"], job["attempts"], job["error"], job["progress"]) == ("queued", 0, None, 0.0)
    assert job["started_at"] is None and job["finished_at"] is None
    assert job["timings"] == {"queued_s": None, "inference_s": None, "total_s": None}
    assert job["params"] == before["params"]  # the seed among them: the same images as a first run
    assert job["created_at"] == before["created_at"]
    async with sessions() as session:  # claimable again, as a first claim
        [again] = await leases.claim(session=session, worker_id="w2", lease_s=30)
    assert (again.id, again.attempts, again.reclaimed) == (failed["id"], 1, False)
    assert again.queue_wait_s is not None  # counted from the retry, not from the first submission

    # Running, queued or succeeded: 409.
    assert_problem(
        await api.client.post(f"/v1/generations/{failed['id']}/retry", headers=api.headers(alice)), 409
    )
    queued = (await submit(api, alice)).json()
    assert_problem(
        await api.client.post(f"/v1/generations/{queued['id']}/retry", headers=api.headers(alice)), 409
    )
    await complete_job(api, queued["id"])
    assert_problem(
        await api.client.post(f"/v1/generations/{queued['id']}/retry", headers=api.headers(alice)), 409
    )

    # Canceled: retried too, and it counts against the unfinished-jobs cap.
    canceled = (await submit(api, alice)).json()
    assert (
        await api.client.post(f"/v1/generations/{canceled['id']}/cancel", headers=api.headers(alice))
    ).json()["status"] == "canceled"
    await submit(api, alice)
    last = (await submit(api, alice)).json()  # alice now has 3 unfinished jobs: the cap
    body = assert_problem(
        await api.client.post(f"/v1/generations/{canceled['id']}/retry", headers=api.headers(alice)), 429
    )
    assert "unfinished" in body["detail"]
    async with sessions() as session:
        job_row = await session.get(Job, canceled["id"])
        assert job_row is not None and job_row.status == "canceled"  # left as it was
    # Once a slot frees, the canceled job goes back to the queue.
    r = await api.client.post(f"/v1/generations/{last['id']}/cancel", headers=api.headers(alice))
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    r = await api.client.post(f"/v1/generations/{canceled['id']}/retry", headers=api.headers(alice))
    assert r.status_code == 202 and r.json()["status"] == "queued", r.text


async def test_image_download_with_etag_and_304(api, complete_job) -> None:
    alice = await api.user("alice")
    job = (await submit(api, alice, {"prompt": PROMPT, "num_images": 2, "seed": 11})).json()
    url = f"/v1/generations/{job['id']}"
    pngs = await complete_job(api, job["id"], count=2)

    done = (await api.client.get(url, headers=api.headers(alice))).json()
    assert done["status"] == "succeeded" and done["progress"] == 1.0 and done["attempts"] == 1
    assert done["seeds"] == [11, 12]
    assert [i["url"] for i in done["images"]] == [f"{url}/images/0", f"{url}/images/1"]
    assert done["timings"]["inference_s"] == 0.25 and done["timings"]["total_s"] >= 0

    for index, png in enumerate(pngs):
        r = await api.client.get(f"{url}/images/{index}", headers=api.headers(alice))
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content == png
        etag = f'"{hashlib.sha256(png).hexdigest()}"'
        assert r.headers["etag"] == etag == f'"{done["images"][index]["sha256"]}"'
        assert "private" in r.headers["cache-control"] and "max-age" in r.headers["cache-control"]

    etag = f'"{hashlib.sha256(pngs[0]).hexdigest()}"'
    for validator in (etag, f'"other", {etag}', f"W/{etag}", "*"):
        r = await api.client.get(
            f"{url}/images/0", headers=api.headers(alice, **{"If-None-Match": validator})
        )
        assert r.status_code == 304, validator
        assert r.content == b"" and r.headers["etag"] == etag and "cache-control" in r.headers
    r = await api.client.get(f"{url}/images/0", headers=api.headers(alice, **{"If-None-Match": '"other"'}))
    assert r.status_code == 200 and r.content == pngs[0]

    assert_problem(await api.client.get(f"{url}/images/2", headers=api.headers(alice)), 404)
    assert_problem(await api.client.get(f"{url}/images/-1", headers=api.headers(alice)), 422, "index")
    assert_problem(await api.client.post(f"{url}/cancel", headers=api.headers(alice)), 409)

    # Deleting the job deletes its images from the store.
    store = api.app.state.services.store
    assert await store.exists(f"generations/{job['id']}/0.png")
    assert (await api.client.delete(url, headers=api.headers(alice))).status_code == 204
    assert not await store.exists(f"generations/{job['id']}/0.png")
    assert not await store.exists(f"generations/{job['id']}/1.png")


# --------------------------------------------------------------------------- idempotency


async def test_idempotency_key_replays_the_same_job(api_factory) -> None:
    api = await api_factory(max_queued_jobs_per_user=2)
    alice, bob = await api.user("alice"), await api.user("bob")
    body = {"prompt": PROMPT, "steps": 12}
    first = await submit(api, alice, body, **{"Idempotency-Key": "order-1"})
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    # A replay with the same key and body: the same job (seed included), no second row.
    replay = await submit(api, alice, {"steps": 12, "prompt": PROMPT}, **{"Idempotency-Key": "order-1"})
    assert replay.status_code in (200, 202), replay.text
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["id"] == first.json()["id"]
    assert replay.json()["params"]["seed"] == first.json()["params"]["seed"]
    assert replay.headers["location"] == first.headers["location"]
    assert await count_jobs(api) == 1
    # Same key, different body: 422 naming the header.
    r = await submit(api, alice, {"prompt": PROMPT, "steps": 13}, **{"Idempotency-Key": "order-1"})
    assert_problem(r, 422, "Idempotency-Key")
    # Keys are per principal: bob's "order-1" is his own job.
    r = await submit(api, bob, body, **{"Idempotency-Key": "order-1"})
    assert r.status_code == 202 and "idempotent-replayed" not in r.headers
    assert r.json()["id"] != first.json()["id"]
    assert (await api.client.get(r.headers["location"], headers=api.headers(alice))).status_code == 404
    # At the queue cap a replay is still answered; a new submission is not.
    assert (await submit(api, alice)).status_code == 202
    r = await submit(api, alice, body, **{"Idempotency-Key": "order-1"})
    assert r.status_code in (200, 202) and r.json()["id"] == first.json()["id"]
    assert_problem(await submit(api, alice, body, **{"Idempotency-Key": "order-2"}), 429)
    # The key's length is bounded.
    assert_problem(await submit(api, alice, body, **{"Idempotency-Key": "k" * 256}), 422, "Idempotency-Key")
    # Deleting the job spends its key: until it expires, the key answers 409 and makes no job.
    assert (await api.client.delete(first.headers["location"], headers=api.headers(alice))).status_code == 204
    assert await count_jobs(api) == 2
    for replay_body in (body, {"prompt": PROMPT}):
        r = await submit(api, alice, replay_body, **{"Idempotency-Key": "order-1"})
        body_of_409 = assert_problem(r, 409) if replay_body is body else assert_problem(r, 422)
        assert "Idempotency-Key" in body_of_409["detail"]
    assert await count_jobs(api) == 2
    async with api.app.state.services.sessions() as session:
        record = await session.get(IdempotencyRecord, (alice["id"], "order-1"))
    assert record is not None and record.job_id is None
    # Bob's key of the same name is untouched; another key of alice's still makes a job.
    r = await submit(api, bob, body, **{"Idempotency-Key": "order-1"})
    assert r.headers["idempotent-replayed"] == "true"
    r = await submit(api, alice, body, **{"Idempotency-Key": "order-3"})
    assert r.status_code == 202 and await count_jobs(api) == 3


async def test_concurrent_submissions_with_one_idempotency_key_make_one_job(api) -> None:
    alice = await api.user("alice")
    body = {"prompt": PROMPT, "image": encoded(picture(32, 32))}
    answers = await asyncio.gather(
        *(submit(api, alice, body, **{"Idempotency-Key": "race"}) for _ in range(6))
    )
    assert all(r.status_code in (200, 202) for r in answers), [r.text for r in answers]
    assert len({r.json()["id"] for r in answers}) == 1
    assert sum("idempotent-replayed" not in r.headers for r in answers) == 1
    assert await count_jobs(api) == 1
    # The losers' uploads were removed: only the winner's input is in the store.
    root = api.app.state.services.store.root
    assert [p.relative_to(root).parts[1] for p in root.rglob("*.png")] == [answers[0].json()["id"]]


async def test_an_expired_idempotency_key_makes_a_new_job(api_factory) -> None:
    api = await api_factory(idempotency_ttl_s=1)
    alice = await api.user("alice")
    first = await submit(api, alice, **{"Idempotency-Key": "k"})
    assert first.status_code == 202
    await asyncio.sleep(1.1)
    second = await submit(api, alice, **{"Idempotency-Key": "k"})
    assert second.status_code == 202 and "idempotent-replayed" not in second.headers
    assert second.json()["id"] != first.json()["id"]
    assert await count_jobs(api) == 2
    # The key now points at the new job.
    third = await submit(api, alice, **{"Idempotency-Key": "k"})
    assert third.headers["idempotent-replayed"] == "true" and third.json()["id"] == second.json()["id"]
    async with api.app.state.services.sessions() as session:
        records = (await session.scalars(select(IdempotencyRecord))).all()
    assert [(r.key, r.job_id) for r in records] == [("k", second.json()["id"])]


async def test_expired_idempotency_keys_are_purged_in_batches(api_factory) -> None:
    api = await api_factory(idempotency_ttl_s=3600)
    alice, bob = await api.user("alice"), await api.user("bob")
    for i in range(5):
        assert (await submit(api, alice, **{"Idempotency-Key": f"old-{i}"})).status_code == 202
    assert (await submit(api, bob, **{"Idempotency-Key": "fresh"})).status_code == 202
    async with api.app.state.services.sessions() as session:
        # Age alice's keys past their TTL; bob's stays valid.
        records = (await session.scalars(select(IdempotencyRecord))).all()
        for record in records:
            if record.key.startswith("old-"):
                record.expires_at = record.created_at
        await session.commit()
        assert await jobs.purge_expired_idempotency(session=session, batch=2) == 5
        left = (await session.scalars(select(IdempotencyRecord))).all()
        assert [(r.principal, r.key) for r in left] == [(bob["id"], "fresh")]
        assert await jobs.purge_expired_idempotency(session=session) == 0
    # The jobs themselves stay; only the keys went. A reused old key makes a new job.
    assert await count_jobs(api) == 6
    r = await submit(api, alice, **{"Idempotency-Key": "old-0"})
    assert r.status_code == 202 and "idempotent-replayed" not in r.headers
    assert await count_jobs(api) == 7
