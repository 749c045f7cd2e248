"""Limits under attack and load, on SQLite and on PostgreSQL: login throttling per (user name,
client address) and per address (an attacker cannot lock a user out from elsewhere), failed
authentication limited per address on every route, the job-read budget (polling a job at 2 Hz
is fine), the IETF ``RateLimit-Policy`` / ``RateLimit`` fields on every rate-limited response,
429s included, and load shedding (503 + ``Retry-After`` at once beyond the in-flight cap, health
and metrics exempt)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from sqlalchemy import select

from sfumato.control_plane.models import Job

from .problems import assert_problem

PROMPT = "a red circle on a white background"
PASSWORD = "correct horse battery"


@asynccontextmanager
async def client_at(api: Any, address: str) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on the app whose requests come from ``address`` (as uvicorn would report it)."""
    transport = httpx.ASGITransport(app=api.app, client=(address, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://sfumato.test") as client:
        yield client


def rate_limits(response: httpx.Response) -> dict[str, dict[str, int]]:
    """``{policy: {"q", "w", "r", "t"}}`` from the RateLimit-Policy and RateLimit fields."""
    policies: dict[str, dict[str, int]] = {}
    for field in ("ratelimit-policy", "ratelimit"):
        for item in filter(None, (part.strip() for part in response.headers.get(field, "").split(","))):
            match = re.fullmatch(r'"([a-z_]+)"((?:;[a-z]+=\d+)+)', item)
            assert match, f"{field}: {item!r} is not a structured-field item with integer parameters"
            params = dict(p.split("=") for p in match.group(2).strip(";").split(";"))
            policies.setdefault(match.group(1), {}).update({k: int(v) for k, v in params.items()})
    return policies


async def token(client: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    return await client.post("/v1/auth/token", json={"username": username, "password": password})


# --------------------------------------------------------------------------- login throttling


async def test_an_attacker_cannot_lock_a_user_out_from_another_address(api_factory) -> None:
    api = await api_factory(
        login_rate_limit="5/minute",
        login_address_rate_limit="8/minute",
        auth_failure_rate_limit="1000/minute",
    )
    await api.user("alice", password=PASSWORD)
    await api.user("bob", password=PASSWORD)
    async with client_at(api, "203.0.113.66") as attacker, client_at(api, "198.51.100.7") as alice:
        for _ in range(5):
            assert_problem(await token(attacker, "alice", "guess"), 401)
        # The attacker's address has spent alice's login budget, even with the right password ...
        r = await token(attacker, "alice", PASSWORD)
        assert_problem(r, 429)
        assert rate_limits(r)["login"]["r"] == 0 and int(r.headers["retry-after"]) >= 1
        # ... and trying other names runs into the per-address budget (8 attempts in all).
        assert_problem(await token(attacker, "bob", "guess"), 401)
        assert_problem(await token(attacker, "carol", "guess"), 401)
        r = await token(attacker, "bob", PASSWORD)
        assert_problem(r, 429)
        assert rate_limits(r)["login_address"]["r"] == 0
        # The real user, from her own address, logs in at once; so does bob.
        r = await token(alice, "alice", PASSWORD)
        assert r.status_code == 200, r.text
        assert rate_limits(r)["login"] == {"q": 5, "w": 60, "r": 4, "t": rate_limits(r)["login"]["t"]}
        assert (await token(alice, "bob", PASSWORD)).status_code == 200
        access = r.json()["access_token"]
        assert (await alice.get("/v1/keys", headers={"Authorization": f"Bearer {access}"})).status_code == 200


async def test_failed_authentication_is_limited_per_client_address(api_factory) -> None:
    api = await api_factory(auth_failure_rate_limit="6/minute")
    alice = await api.user("alice", password=PASSWORD)
    wrong_key = f"sfm_{'z' * 12}_{'A' * 43}"
    async with client_at(api, "203.0.113.66") as attacker, client_at(api, "198.51.100.7") as other:
        attempts = [
            {"Authorization": f"Bearer {wrong_key}"},
            {"Authorization": "Bearer not-a-token"},
            {},  # no credentials at all
        ]
        for i in range(5):
            r = await attacker.get("/v1/generations", headers=attempts[i % 3])
            assert_problem(r, 401)
            assert rate_limits(r)["auth_failures"]["r"] == 5 - i
        assert_problem(await token(attacker, "alice", "guess"), 401)  # a failed login counts too
        for route in ("/v1/generations", "/v1/keys", "/v1/generations/abc"):
            r = await attacker.get(route, headers={"Authorization": f"Bearer {wrong_key}"})
            assert_problem(r, 429)
            assert int(r.headers["retry-after"]) >= 1 and rate_limits(r)["auth_failures"]["r"] == 0
        # Once the address has spent its failures, even valid credentials from it wait.
        assert_problem(await attacker.get("/v1/generations", headers=api.headers(alice)), 429)
        assert_problem(await token(attacker, "alice", PASSWORD), 429)
        # Another address is not affected.
        assert (await other.get("/v1/generations", headers=api.headers(alice))).status_code == 200
        assert (await token(other, "alice", PASSWORD)).status_code == 200
    values = api.app.state.services.metrics.registry
    assert values.get_sample_value("sfumato_rejections_total", {"limit": "auth_failures"}) == 5


# --------------------------------------------------------------------------- budgets and headers


async def test_rate_limit_fields_on_every_rate_limited_response(api_factory, complete_job) -> None:
    api = await api_factory(
        rate_limit="4/minute", submit_rate_limit="2/minute", job_read_rate_limit="100/minute"
    )
    alice = await api.user("alice")
    r = await api.client.get("/v1/generations", headers=api.headers(alice))
    limits = rate_limits(r)
    assert set(limits) == {"requests"}
    assert limits["requests"]["q"] == 4 and limits["requests"]["w"] == 60 and limits["requests"]["r"] == 3
    assert 1 <= limits["requests"]["t"] <= 60
    r = await api.client.post("/v1/generations", json={"prompt": PROMPT}, headers=api.headers(alice))
    assert r.status_code == 202
    limits = rate_limits(r)
    assert limits["requests"]["r"] == 2 and limits["submit"] == {
        "q": 2,
        "w": 60,
        "r": 1,
        "t": limits["submit"]["t"],
    }
    job_url = r.headers["location"]
    await complete_job(api, r.json()["id"])
    image_url = (await api.client.get(job_url, headers=api.headers(alice))).json()["images"][0]["url"]
    for path in (job_url, image_url):
        r = await api.client.get(path, headers=api.headers(alice))
        assert r.status_code == 200
        assert set(rate_limits(r)) == {"job_reads"} and rate_limits(r)["job_reads"]["q"] == 100
    # The 429 carries the fields too, with nothing left, and Retry-After agrees with them.
    for _ in range(2):  # requests 3 and 4 of 4 (job reads did not count)
        assert (await api.client.get("/v1/keys", headers=api.headers(alice))).status_code == 200
    r = await api.client.get("/v1/keys", headers=api.headers(alice))
    assert r.status_code == 429
    limits = rate_limits(r)
    assert limits["requests"]["r"] == 0 and limits["requests"]["t"] == int(r.headers["retry-after"])
    # Routes without a rate limit carry none.
    for path in ("/healthz", "/metrics"):
        assert "ratelimit" not in (await api.client.get(path)).headers


async def test_polling_a_job_has_its_own_budget(api_factory) -> None:
    api = await api_factory(rate_limit="5/minute")  # the default job-read budget: 1200/minute
    alice = await api.user("alice")
    job = (
        await api.client.post("/v1/generations", json={"prompt": PROMPT}, headers=api.headers(alice))
    ).json()
    # A minute of polling at 2 Hz: 120 reads, none refused, none counted against rate_limit.
    for _ in range(120):
        r = await api.client.get(f"/v1/generations/{job['id']}", headers=api.headers(alice))
        assert r.status_code == 200, r.text
    assert rate_limits(r)["job_reads"]["r"] == 1200 - 120
    for _ in range(4):  # the POST above was 1 of rate_limit's 5
        assert (await api.client.get("/v1/generations", headers=api.headers(alice))).status_code == 200
    assert_problem(await api.client.get("/v1/generations", headers=api.headers(alice)), 429)


# --------------------------------------------------------------------------- load shedding


async def test_beyond_the_in_flight_cap_the_api_sheds_load_at_once(api_factory, complete_job) -> None:
    api = await api_factory(max_requests_in_flight=2)
    alice = await api.user("alice")
    registry = api.app.state.services.metrics.registry

    def in_flight() -> float:
        return registry.get_sample_value("sfumato_http_requests_in_flight") or 0.0

    # Two submissions that wait for their job (no worker runs): two requests in flight.
    waiting = [
        asyncio.create_task(
            api.client.post(
                "/v1/generations",
                json={"prompt": f"{PROMPT} {i}"},
                headers=api.headers(alice, Prefer="wait=60"),
            )
        )
        for i in range(2)
    ]

    async def queued() -> list[str]:  # in the order a worker claims them
        async with api.app.state.services.sessions() as session:
            return list(
                (await session.scalars(select(Job.id).order_by(Job.available_at, Job.created_at))).all()
            )

    deadline = time.monotonic() + 60
    while in_flight() < 2 or len(await queued()) < 2:  # both in flight and past their job's creation
        assert time.monotonic() < deadline, "the waiting submissions never got in flight"
        await asyncio.sleep(0.02)
    for method, path in (("GET", "/v1/generations"), ("POST", "/v1/generations"), ("GET", "/v1/keys")):
        r = await api.client.request(method, path, json={"prompt": PROMPT}, headers=api.headers(alice))
        body = assert_problem(r, 503)
        assert r.headers["retry-after"] == "1" and r.headers["x-request-id"], r.headers
        assert "overloaded" in body["detail"]
    # Unauthenticated requests are shed before anything else is looked at.
    assert_problem(await api.client.get("/v1/generations"), 503)
    # Probes and the scrape are never shed.
    assert (await api.client.get("/healthz")).status_code == 200
    metrics = await api.client.get("/metrics")
    assert metrics.status_code == 200
    assert registry.get_sample_value("sfumato_rejections_total", {"limit": "load_shedding"}) == 4
    assert not any(task.done() for task in waiting)

    # The waits end (the jobs finish): the API takes requests again.
    for job_id in await queued():
        await complete_job(api, job_id)
    answers = await asyncio.gather(*waiting)
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    assert in_flight() == 0
    assert (await api.client.get("/v1/generations", headers=api.headers(alice))).status_code == 200
