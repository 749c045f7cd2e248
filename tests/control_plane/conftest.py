"""Control-plane fixtures: a fresh database per test on SQLite and on PostgreSQL, and an app.

PostgreSQL: one database migrated once per session serves as a template; every test gets a
``CREATE DATABASE ... TEMPLATE`` copy (fast) and drops it after. The server is the project's
(127.0.0.1:5432, trust auth; ``SFUMATO_TEST_POSTGRES`` overrides the admin URL).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
import pytest_asyncio

from sfumato.control_plane import accounts, migrate
from sfumato.control_plane.app import create_app
from sfumato.control_plane.settings import Settings

PG_ADMIN = os.environ.get("SFUMATO_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
SECRET = "test-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz"


def _pg_url(name: str) -> str:
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{name}"


async def _pg_admin(sql: str) -> None:
    connection = await asyncpg.connect(PG_ADMIN)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def _run(coro) -> None:  # type: ignore[no-untyped-def]
    """Run a coroutine to completion on a thread of its own (callers may be inside a loop)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, coro).result()


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    name = f"sfumato_tmpl_{secrets.token_hex(4)}"
    _run(_pg_admin(f"CREATE DATABASE {name}"))
    migrate.upgrade(_pg_url(name))
    yield name
    _run(_pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    migrate.upgrade(f"sqlite+aiosqlite:///{path}")
    return path


@pytest_asyncio.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A freshly migrated, empty database of each kind."""
    if request.param == "sqlite":
        path = tmp_path / "sfumato.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    template = request.getfixturevalue("pg_template")
    name = f"sfumato_t_{secrets.token_hex(6)}"
    await _pg_admin(f"CREATE DATABASE {name} TEMPLATE {template}")
    try:
        yield _pg_url(name)
    finally:
        await _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def make_settings(database_url: str, data_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "env": "test",
        "secret_key": SECRET,
        "database_url": database_url,
        "data_dir": data_dir,
        "workers": 0,
        "triton_url": "127.0.0.1:1",  # no Triton unless a test says so
        "rate_limit": "10000/minute",
        "submit_rate_limit": "10000/minute",
        "max_requests_in_flight": 10000,  # tests that fire hundreds of requests at once; the cap has its own
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@dataclass
class Api:
    """An app with its lifespan running, an HTTP client on it, and helpers to make principals."""

    app: object
    client: httpx.AsyncClient
    settings: Settings

    async def user(self, name: str, *, role: str = "member", password: str | None = None) -> dict[str, str]:
        services = self.app.state.services  # type: ignore[attr-defined]
        async with services.sessions() as session:
            user = await accounts.create_user(session=session, name=name, role=role, password=password)
            _, key = await accounts.create_key(session=session, user_id=user.id)
        return {"id": user.id, "key": key, "auth": f"Bearer {key}"}

    def headers(self, who: dict[str, str], **extra: str) -> dict[str, str]:
        return {"Authorization": who["auth"], **extra}


@pytest_asyncio.fixture
async def api_factory(database_url: str, tmp_path: Path):  # -> factory(**settings) -> Api
    """``await api_factory(**settings_overrides)`` starts an app on this test's database."""
    stack: list = []

    async def factory(**overrides: object) -> Api:
        settings = make_settings(database_url, tmp_path / f"data{len(stack)}", **overrides)
        app = create_app(settings)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sfumato.test")
        stack.append((lifespan, client))
        return Api(app=app, client=client, settings=settings)

    yield factory
    for lifespan, client in reversed(stack):
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


@pytest_asyncio.fixture
async def api(api_factory) -> Api:
    return await api_factory()


@pytest.fixture
def complete_job():  # -> async (api, job_id, count=1) -> list[bytes]
    """``await complete_job(api, job_id, count=1)`` finishes a queued job the way a worker does,
    without Triton: ``leases.claim`` as worker ``test-worker`` (the job must be the one a claim
    takes next), ``count`` solid-colour 32x32 PNGs put in the app's image store, then
    ``leases.complete``. Returns the PNG bytes, in index order."""
    import hashlib

    import numpy as np

    from sfumato.clients.png import encode_png
    from sfumato.control_plane import leases

    async def complete(api: Api, job_id: str, count: int = 1) -> list[bytes]:
        services = api.app.state.services  # type: ignore[attr-defined]
        async with services.sessions() as session:
            claimed = await leases.claim(session=session, worker_id="test-worker", lease_s=60)
        assert [job.id for job in claimed] == [job_id], "the job to complete must be the next one claimed"
        claimed = claimed[0]
        pngs, rows = [], []
        for index in range(count):
            png = encode_png(
                np.full((32, 32, 3), (40 * index, 60, 200), dtype=np.uint8), text={"i": str(index)}
            )
            key = f"generations/{job_id}/{index}.png"
            await services.store.put(key, png)
            pngs.append(png)
            rows.append(
                {
                    "index": index,
                    "storage_key": key,
                    "seed": int(claimed.params["seed"]) + index,
                    "width": 32,
                    "height": 32,
                    "sha256": hashlib.sha256(png).hexdigest(),
                }
            )
        async with services.sessions() as session:
            recorded = await leases.complete(
                session=session, job_id=job_id, worker_id="test-worker", images=rows, inference_s=0.25
            )
        assert recorded
        return pngs

    return complete


@dataclass
class S3Server:
    """A real S3 API server process (moto's server mode) on a free loopback port."""

    endpoint_url: str

    def bucket(self) -> str:
        """A fresh, empty bucket."""
        import boto3

        name = f"sfumato-{secrets.token_hex(6)}"
        boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1").create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """``moto_server`` started once per session (``moto[server]``: the S3 REST API over HTTP,
    presigned URLs and multipart uploads included); any credentials are accepted."""
    import subprocess
    import sys
    import time

    from sfumato.triton_server import free_port

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                if httpx.get(f"{url}/moto-api/", timeout=2).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start on {url} (exit code {process.poll()})")
            time.sleep(0.1)
        yield S3Server(endpoint_url=url)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def s3_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials for boto3's default chain (moto accepts any)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "sfumato-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sfumato-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
