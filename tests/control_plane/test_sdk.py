"""The Python SDK (``sfumato.clients``) against the real server: ``sfumato serve`` in a
subprocess over real HTTP, on SQLite and on PostgreSQL, with a real worker and a real Triton
where images are made. Nothing is mocked: the 429s come from a low submission rate limit, the
503s from load shedding (one request in flight at most), the read timeouts from a server
holding ``Prefer: wait``, the connection errors from a port nobody listens on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from sfumato import errors
from sfumato.clients import AsyncClient, Client, GenerationError, GenerationTimeout, Progress, RetryPolicy
from sfumato.clients.rest import generation_body
from sfumato.shapes import judge
from sfumato.triton_server import free_port

from .conftest import _pg_admin, _pg_url, _run
from .served import BIN, Served, served

PROMPT = "a red circle on a white background"
FAST = RetryPolicy(attempts=40, backoff_s=0.05, max_backoff_s=0.5)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def new_database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[], str]]:
    """``new_database()``: a freshly migrated database of each kind (one per server: a worker
    claims every queued job of its database)."""
    made: list[str] = []

    def new() -> str:
        if request.param == "sqlite":
            path = tmp_path_factory.mktemp("sdk-db") / "sfumato.db"
            shutil.copy(request.getfixturevalue("sqlite_template"), path)
            return f"sqlite+aiosqlite:///{path}"
        template = request.getfixturevalue("pg_template")
        name = f"sfumato_sdk_{secrets.token_hex(6)}"
        _run(_pg_admin(f"CREATE DATABASE {name} TEMPLATE {template}"))
        made.append(name)
        return _pg_url(name)

    yield new
    for name in made:
        _run(_pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(scope="module")
def idle(new_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The API with no worker: jobs stay queued (cancel, pages, errors, idempotency)."""
    with served(new_database(), tmp_path_factory.mktemp("sdk-idle")) as server:
        yield server


@pytest.fixture(scope="module")
def live(
    new_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory, triton
) -> Iterator[Served]:
    """The API with one in-process worker calling the session's real Triton."""
    with served(
        new_database(),
        tmp_path_factory.mktemp("sdk-live"),
        SFUMATO_WORKERS="1",
        SFUMATO_TRITON_URL=triton.grpc_url,
        SFUMATO_POLL_INTERVAL_S="0.05",
        SFUMATO_PROGRESS_WRITE_INTERVAL_S="0",
    ) as server:
        yield server


def member(server: Served, name: str | None = None) -> Client:
    """A fresh member of ``server`` and a client with its own API key."""
    with Client(server.url, api_key=server.key) as admin:
        user = admin.create_user(name or f"u{secrets.token_hex(4)}")
        key = admin.create_user_key(user.id).key
    return Client(server.url, api_key=key, retry=FAST)


def retries(caplog: pytest.LogCaptureFixture, what: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sfumato.clients" and what in r.getMessage()]


# --------------------------------------------------------------------------- generating


def test_generate_returns_the_images_and_reports_progress(live: Served) -> None:
    seen: list[Progress] = []
    with member(live) as client:
        images = client.generate(
            PROMPT, num_images=2, steps=10, seed=1234, preview_every=2, on_progress=seen.append
        )
        assert len(images) == 2
        for image in images:
            assert (image.format, image.size) == ("PNG", (32, 32))
            assert image.info["prompt"] == PROMPT and image.info["steps"] == "10"
            verdict = judge(np.asarray(image.convert("RGB")))
            assert (verdict.colour, verdict.background) == ("red", "white"), verdict
        assert images[0].info["seed"] == "1234"
        assert seen and seen[-1].status == "succeeded" and seen[-1].progress == 1.0
        assert len({p.generation_id for p in seen}) == 1
        assert [p.progress for p in seen] == sorted(p.progress for p in seen)
        steps = [p for p in seen if p.step is not None]  # the worker streams: step by step
        assert all(p.total == 10 and 1 <= p.step <= 10 for p in steps), seen
        # A longer job: the worker writes its progress as it goes (every step here), with the
        # previews of the steps that carry one.
        seen.clear()
        client.generate(PROMPT, num_images=2, steps=60, preview_every=1, on_progress=seen.append)
        steps = [p for p in seen if p.step is not None]
        assert steps and all(p.total == 60 and 1 <= p.step < 60 for p in steps), seen
        previews = [p.preview for p in steps if p.preview_png is not None]
        assert previews and all(p.size == (64, 32) for p in previews)  # two images side by side
        # Without a callback: one submission with Prefer: wait, answered when done.
        again = client.generate(PROMPT, num_images=2, steps=10, seed=1234)
        assert [np.asarray(a).tolist() for a in again] == [np.asarray(b).tolist() for b in images]


def test_img2img_and_inpainting_inputs(live: Served, tmp_path: Path) -> None:
    with member(live) as client:
        (source,) = client.generate(PROMPT, steps=10, seed=5)
        path = tmp_path / "source.png"
        source.save(path)
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[8:24, 8:24] = 255
        for image, mask_input in ((source, None), (path, None), (np.asarray(source.convert("RGB")), mask)):
            (out,) = client.generate(
                "a blue square on a yellow background", image=image, mask=mask_input, steps=10, strength=0.9
            )
            assert out.size == (32, 32)
        latest = next(client.generations())
        assert latest.params["image"] is True and latest.params["mask"] is True
        assert latest.params["strength"] == 0.9


async def test_async_client_generates_and_pages(live: Served) -> None:
    with member(live) as sync:
        key = sync._api_key
    seen: list[Progress] = []

    async def on_progress(progress: Progress) -> None:  # a coroutine callback is awaited
        seen.append(progress)

    async with AsyncClient(live.url, api_key=key, retry=FAST) as client:
        first, second = await asyncio.gather(
            client.generate(PROMPT, steps=8, seed=1, on_progress=on_progress),
            client.generate("a green triangle on a black background", steps=8, seed=2),
        )
        assert first[0].info["seed"] == "1" and second[0].info["seed"] == "2"
        assert seen[-1].status == "succeeded"
        ids = [g.id async for g in client.generations(page_size=1)]
        assert len(ids) == 2
        page = await client.generations_page(limit=1)
        assert page.next_cursor and [g.id for g in page.items] == ids[:1]


def test_admins_read_tritons_models(live: Served) -> None:
    with Client(live.url, api_key=live.key) as admin:
        states = {m["name"]: m["state"] for m in admin.triton_models()}
        assert states["pipeline"] == "READY"
        assert any(u.name == "tester" and u.role == "admin" for u in admin.users())
    with member(live) as client:
        with pytest.raises(errors.PermissionDeniedError):
            client.triton_models()
        # The registry is every user's to read: what may be asked of each model.
        for model in client.models():
            assert model.triton_model and (model.limits is None or "max_steps" in model.limits)


def test_the_cli_generates_through_the_rest_api(live: Served, tmp_path: Path) -> None:
    with member(live) as client:
        key = client._api_key
    env = {**os.environ, "SFUMATO_API_KEY": key}
    out = tmp_path / "out.png"
    done = subprocess.run(
        [
            *(BIN / "sfumato", "generate", PROMPT, "--api", live.url, "-o", str(out)),
            *("--num-images", "2", "--steps", "10", "--seed", "77"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        str(tmp_path / "out-0.png"),
        "seed=77",
        str(tmp_path / "out-1.png"),
        "seed=78",
    ]
    with Image.open(tmp_path / "out-1.png") as png:
        assert png.text["prompt"] == PROMPT and png.text["seed"] == "78"
    # A bad key: the problem's message and the error's exit code, no traceback.
    done = subprocess.run(
        [BIN / "sfumato", "generate", PROMPT, "--api", live.url, "--key", "sfm_nope", "-o", str(out)],
        env={k: v for k, v in os.environ.items() if k != "SFUMATO_API_KEY"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == errors.AuthenticationError.exit_code, done.stderr
    assert "Traceback" not in done.stderr and "key" in done.stderr.lower()


# --------------------------------------------------------------------------- jobs and pages


def test_cancel_delete_and_other_users(idle: Served) -> None:
    with member(idle) as alice, member(idle) as bob:
        job = alice.submit(PROMPT, steps=10)
        assert job.status == "queued"
        with pytest.raises(errors.NotFoundError):  # another user's job does not exist for bob
            bob.cancel(job.id)
        with pytest.raises(errors.NotFoundError):
            bob.generation(job.id)
        assert list(bob.generations()) == []
        assert alice.cancel(job.id).status == "canceled"
        with pytest.raises(errors.ConflictError) as info:
            alice.cancel(job.id)
        assert info.value.status == 409 and info.value.problem["status"] == 409
        assert alice.retry_generation(job.id).status == "queued"
        alice.delete(job.id)
        with pytest.raises(errors.NotFoundError):
            alice.generation(job.id)
        with pytest.raises(errors.NotFoundError):
            bob.delete(alice.submit(PROMPT).id)


def test_wait_follows_the_event_stream(idle: Served) -> None:
    """``wait`` reads the generation's Server-Sent Events: the job as it stands, then its end
    (here: canceled by another thread), each reported once."""
    with member(idle) as client:
        job = client.submit(PROMPT, steps=10)
        seen: list[Progress] = []
        done: list[object] = []
        follower = threading.Thread(
            target=lambda: done.append(client.wait(job.id, timeout=120, on_progress=seen.append))
        )
        follower.start()
        deadline = time.monotonic() + 120
        while not seen:  # the stream is open: its first event (the job as it stands) arrived
            assert time.monotonic() < deadline and follower.is_alive()
            time.sleep(0.02)
        client.cancel(job.id)
        follower.join(timeout=120)
        assert [d.status for d in done] == ["canceled"]  # type: ignore[attr-defined]
        assert [(p.generation_id, p.status) for p in seen] == [(job.id, "queued"), (job.id, "canceled")]
        # A finished job's stream ends at once with its final state.
        assert client.wait(job.id, timeout=60).status == "canceled"


class CuttingProxy:
    """A TCP proxy on a free loopback port in front of ``target``; :meth:`cut` closes every
    connection through it (a dropped network path, for real: the client sees the socket close)."""

    def __init__(self, target: str) -> None:
        self.target = ("127.0.0.1", int(target.rsplit(":", 1)[1]))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self.lock:
            for connection in self.connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
                connection.close()
            self.connections.clear()

    def close(self) -> None:
        self.cut()
        self.listener.close()


def test_a_dropped_event_stream_resumes_where_it_stopped(
    idle: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection under the stream is cut: the client reopens it with ``Last-Event-ID`` and
    gets what it missed, nothing twice."""
    caplog.set_level(logging.INFO, logger="sfumato.clients")
    proxy = CuttingProxy(idle.url)
    with member(idle) as direct:
        key = direct._api_key
        job = direct.submit(PROMPT)
        seen: list[Progress] = []
        done: list[object] = []
        via = Client(proxy.url, api_key=key, retry=FAST)
        follower = threading.Thread(target=lambda: done.append(via.wait(job.id, on_progress=seen.append)))
        try:
            follower.start()
            deadline = time.monotonic() + 120
            while not seen:
                assert time.monotonic() < deadline and follower.is_alive()
                time.sleep(0.02)
            proxy.cut()
            while not retries(caplog, "reconnecting to the events"):
                assert time.monotonic() < deadline and follower.is_alive()
                time.sleep(0.02)
            direct.cancel(job.id)
            follower.join(timeout=120)
        finally:
            via.close()
            proxy.close()
        assert [d.status for d in done] == ["canceled"]  # type: ignore[attr-defined]
        assert [p.status for p in seen] == ["queued", "canceled"]


def test_a_canceled_generation_raises_and_a_canceled_task_cancels_its_job(idle: Served) -> None:
    with member(idle) as client:
        key = client._api_key
        raised: list[BaseException] = []

        def generate() -> None:
            try:
                client.generate(PROMPT, timeout=120, on_progress=lambda p: None)
            except BaseException as exc:
                raised.append(exc)

        waiter = threading.Thread(target=generate)
        waiter.start()
        deadline = time.monotonic() + 120
        while not (jobs := list(client.generations())):
            assert time.monotonic() < deadline and waiter.is_alive()
            time.sleep(0.02)
        client.cancel(jobs[0].id)
        waiter.join(timeout=120)
        assert [type(e) for e in raised] == [GenerationError], raised
        assert raised[0].generation.status == "canceled"  # type: ignore[attr-defined]

    async def cancel_the_task() -> str:
        async with AsyncClient(idle.url, api_key=key, retry=FAST) as aio:
            following: list[Progress] = []  # the task follows the job's events: it was submitted
            task = asyncio.create_task(
                aio.generate("a blue square", timeout=120, on_progress=following.append)
            )
            deadline = time.monotonic() + 120
            while not following:
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return (await aio.generation(following[0].generation_id)).status

    assert asyncio.run(cancel_the_task()) == "canceled"


def test_generate_times_out_and_the_job_goes_on(idle: Served) -> None:
    with member(idle) as client:
        with pytest.raises(GenerationTimeout) as info:
            client.generate(PROMPT, steps=10, timeout=1)
        job = info.value.generation
        assert job is not None and client.generation(job.id).status == "queued"
        assert isinstance(info.value, GenerationError) and isinstance(info.value, errors.SfumatoError)


def test_pages_follow_the_cursor(idle: Served) -> None:
    with member(idle) as client:
        made = [client.submit(PROMPT, seed=i).id for i in range(5)]
        assert [g.id for g in client.generations(page_size=2)] == made[::-1]
        assert [g.id for g in client.generations(status="queued", page_size=100)] == made[::-1]
        client.cancel(made[0])
        assert [g.id for g in client.generations(status="canceled")] == [made[0]]
        first = client.generations_page(limit=2)
        second = client.generations_page(limit=2, cursor=first.next_cursor)
        assert [g.id for g in first.items + second.items] == made[::-1][:4]

        async def pages() -> list[str]:
            async with AsyncClient(idle.url, api_key=client._api_key) as aio:
                return [g.id async for g in aio.generations(page_size=3)]

        assert asyncio.run(pages()) == made[::-1]


def test_errors_are_the_servers_typed_problems(idle: Served) -> None:
    with member(idle) as client:
        with pytest.raises(errors.UsageError) as info:  # checked here, against the API's schema
            client.submit(PROMPT, width=36)
        assert info.value.field == "width" and "multiple of 8" in str(info.value)
        with pytest.raises(errors.UsageError) as info:  # the server's 422, for a body sent as it is
            client.request("POST", "/v1/generations", json={"prompt": PROMPT, "steps": 0})
        assert (info.value.status, info.value.field) == (422, "steps")
        with pytest.raises(errors.BadRequestError) as info:
            client.generations_page(cursor="not-a-cursor")
        assert (info.value.status, info.value.field) == (400, "cursor")
        with pytest.raises(errors.PermissionDeniedError):
            client.users()
        with pytest.raises(errors.NotFoundError) as info:
            client.generation("nonesuch")
        assert info.value.problem["title"] == "Not found" and "nonesuch" in str(info.value)
    with Client(idle.url, api_key="sfm_nope_nope") as stranger, pytest.raises(errors.AuthenticationError):
        stranger.submit(PROMPT)


def test_login_with_a_password(idle: Served) -> None:
    name, password = f"p{secrets.token_hex(4)}", secrets.token_urlsafe(12)
    with Client(idle.url, api_key=idle.key) as admin:
        admin.create_user(name, password=password)
    with Client(idle.url, api_key="") as client:
        with pytest.raises(errors.AuthenticationError):
            client.login(name, "wrong password")
        token = client.login(name, password)
        assert token.token_type == "bearer" and token.expires_in > 0
        job = client.submit(PROMPT)
        assert [g.id for g in client.generations()] == [job.id]
        key = client.create_key("laptop")
        assert [k.id for k in client.keys()] == [key.id]  # noqa: SIM118 (a method, not a dict)
        # Near its expiry the token is renewed with the same credentials before the next call.
        paths: list[str] = []
        client._http.event_hooks["request"].append(lambda request: paths.append(request.url.path))
        client._token_expires = time.monotonic() - 1
        assert client.generation(job.id).id == job.id
        assert paths == ["/v1/auth/token", f"/v1/generations/{job.id}"]
        assert client._token_expires > time.monotonic() + 60
    with Client(idle.url, api_key=key.key) as by_key:
        assert by_key.generation(job.id).id == job.id
        by_key.revoke_key(key.id)
        with pytest.raises(errors.AuthenticationError):
            by_key.generation(job.id)


# --------------------------------------------------------------------------- retries


def test_a_retried_submission_makes_one_job(idle: Served, caplog: pytest.LogCaptureFixture) -> None:
    """The server holds the submission (``Prefer: wait``, no worker) longer than the client's read
    timeout: the client retries with the same ``Idempotency-Key`` until the job is final (canceled
    by another client meanwhile), and the server answers the replay with the one job it made."""
    caplog.set_level(logging.INFO, logger="sfumato.clients")
    with member(idle) as client:
        body = generation_body(PROMPT, steps=10)
        answer: dict[str, object] = {}

        def submit() -> None:
            try:
                answer["response"] = client.request(
                    "POST",
                    "/v1/generations",
                    json=body,
                    headers={"Idempotency-Key": "one-job-please", "Prefer": "wait=30"},
                    timeout=httpx.Timeout(30, read=1.0),
                )
            except Exception as exc:  # reported below
                answer["error"] = exc

        thread = threading.Thread(target=submit)
        thread.start()
        deadline = time.monotonic() + 120
        while not (jobs := list(client.generations())):
            assert time.monotonic() < deadline and thread.is_alive(), answer
            time.sleep(0.05)
        while not retries(caplog, "ReadTimeout"):  # the first try timed out: now end the job
            assert time.monotonic() < deadline and thread.is_alive(), answer
            time.sleep(0.05)
        client.cancel(jobs[0].id)
        thread.join(timeout=120)
        response = answer.get("response")
        assert isinstance(response, httpx.Response), answer
        assert response.headers["idempotent-replayed"] == "true"
        assert response.json()["id"] == jobs[0].id and response.json()["status"] == "canceled"
        assert [g.id for g in client.generations()] == [jobs[0].id]


def test_rate_limited_submissions_are_retried(
    new_database: Callable[[], str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sfumato.clients")
    limited = served(new_database(), tmp_path / "limited", SFUMATO_SUBMIT_RATE_LIMIT="1/second")
    with limited as server, member(server) as client:
        made = [client.submit(PROMPT, seed=i).id for i in range(3)]
        assert len(retries(caplog, "429")) >= 1
        # Each retry carried its submission's key: three submissions, three jobs.
        assert sorted(g.id for g in client.generations()) == sorted(made)
        impatient = Client(server.url, api_key=client._api_key, retry=RetryPolicy(attempts=1))
        with impatient, pytest.raises(errors.RateLimitedError) as info:
            for _ in range(5):
                impatient.submit(PROMPT)
        assert info.value.status == 429 and info.value.retry_after >= 1


def test_load_shedding_503s_are_retried(
    new_database: Callable[[], str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One request in flight at most: while a submission waits (``Prefer: wait=10``), every
    other request is shed with 503 + ``Retry-After``; the client waits and gets through."""
    caplog.set_level(logging.INFO, logger="sfumato.clients")
    shedding = served(new_database(), tmp_path / "shedding", SFUMATO_MAX_REQUESTS_IN_FLIGHT="1")
    with shedding as server, member(server) as client:
        held: list[httpx.Response] = []

        def hold() -> None:  # a submission the server holds for 10 s: the one request in flight
            headers = {**client._auth_headers(), "Prefer": "wait=10"}
            while True:  # shed itself while a probe below is in flight: again
                held.append(
                    httpx.post(
                        f"{server.url}/v1/generations", json={"prompt": PROMPT}, headers=headers, timeout=120
                    )
                )
                if held[-1].status_code != 503:
                    return

        holder = threading.Thread(target=hold)
        holder.start()
        deadline = time.monotonic() + 120
        while httpx.get(f"{server.url}/v1/generations", headers=client._auth_headers()).status_code != 503:
            assert time.monotonic() < deadline and holder.is_alive(), [r.text for r in held]
            time.sleep(0.1)
        impatient = Client(server.url, api_key=client._api_key, retry=RetryPolicy(attempts=1))
        with impatient, pytest.raises(errors.ServiceUnavailableError) as info:
            impatient.generations_page()
        assert info.value.status == 503 and "overloaded" in str(info.value)
        page = client.generations_page()  # retried until the holder is done
        assert len(retries(caplog, "503")) >= 1
        holder.join(timeout=120)
        assert held[-1].status_code == 202, held[-1].text
        assert [g.status for g in page.items] == ["queued"]


def test_connection_errors_are_retried_then_raised(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sfumato.clients")
    url = f"http://127.0.0.1:{free_port()}"
    policy = RetryPolicy(attempts=3, backoff_s=0.01)
    with Client(url, api_key="sfm_x", retry=policy) as client, pytest.raises(errors.ServiceUnavailableError):
        client.submit(PROMPT)
    assert len(retries(caplog, "ConnectError")) == 2


def test_importing_the_sdk_pulls_in_no_server_code() -> None:
    """A client install has httpx, pydantic and Pillow, not the control plane's FastAPI/SQLAlchemy."""
    server_side = (
        "fastapi starlette uvicorn sqlalchemy alembic asyncpg aiosqlite pydantic_settings jwt argon2 "
        "limits redis prometheus_client boto3 tritonclient onnxruntime tokenizers torch"
    )
    code = (
        "import sys; from sfumato.clients import Client, AsyncClient; Client, AsyncClient; "
        f"print(sorted(m for m in {server_side.split()!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
