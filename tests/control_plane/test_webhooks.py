"""Webhooks end to end, on SQLite and PostgreSQL, against a real local HTTP receiver.

The receiver listens on 127.0.0.1, which the SSRF guard refuses: the app's settings list it in
``SFUMATO_WEBHOOK_ALLOWED_HOSTS``, the operator's allow-list (the mechanism, not a test bypass).
Signatures are verified with the ``standardwebhooks`` package. Time is a clock the test
advances (the dispatcher's ``clock``): retries and leases come due without sleeping.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest
import pytest_asyncio
from sqlalchemy import func, select
from standardwebhooks import Webhook, WebhookVerificationError

from sfumato.control_plane import leases, trainings, webhooks
from sfumato.control_plane.models import WebhookAttempt, WebhookDelivery, utcnow

from .conftest import Api
from .datasets_zip import shapes_zip
from .webhook_receiver import Answer, Receiver


class Clock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    def to(self, when: datetime) -> None:
        self.now = max(self.now, when)


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


@pytest_asyncio.fixture
async def hooks(api_factory) -> Api:  # the app, with the local receiver's host listed
    return await api_factory(webhook_allowed_hosts=["127.0.0.1"], webhook_timeout_s=5.0)


def dispatcher(api: Api, clock: Clock, name: str = "test-dispatcher") -> webhooks.Dispatcher:
    return webhooks.Dispatcher(api.app.state.services, name=name, clock=clock, rng=random.Random(7))  # type: ignore[attr-defined]


async def submit(api: Api, who: dict, url: str | None, **fields) -> dict:
    body = {"prompt": "a red circle on a white background", **fields}
    if url is not None:
        body["webhook"] = url
    r = await api.client.post("/v1/generations", json=body, headers=api.headers(who))
    assert r.status_code == 202, r.text
    return r.json()


async def event(
    api: Api, job_id: str, kind: str, data: dict, *, commit: bool = True, clock: Clock | None = None
) -> str | None:
    """A job event as ``events.publish`` makes it: the outbox row in the event's transaction
    (enqueued at ``clock``'s time when given: due at once for a dispatcher on that clock)."""
    async with api.app.state.services.sessions() as session:  # type: ignore[attr-defined]
        delivery_id = await webhooks.enqueue_job_event(
            session=session, job_id=job_id, kind=kind, data=data, now=clock() if clock else None
        )
        if commit:
            await session.commit()
        else:
            await session.rollback()
    return delivery_id


async def secret(api: Api, who: dict) -> str:
    r = await api.client.get("/v1/webhooks/secret", headers=api.headers(who))
    assert r.status_code == 200, r.text
    return r.json()["secret"]


async def delivery(api: Api, who: dict, delivery_id: str) -> dict:
    r = await api.client.get(f"/v1/webhooks/deliveries/{delivery_id}", headers=api.headers(who))
    assert r.status_code == 200, r.text
    return r.json()


def verify(secret_: str, request) -> dict:  # type: ignore[no-untyped-def]
    return Webhook(secret_).verify(request.body, request.headers)


# --------------------------------------------------------------------------- the happy path


async def test_a_completed_job_is_delivered_signed(hooks: Api, receiver: Receiver) -> None:
    alice = await hooks.user("alice")
    job = await submit(hooks, alice, receiver.url(), webhook_events_filter=["start", "completed"])
    key = await secret(hooks, alice)  # made with the first job that names a webhook
    assert job["webhook"] == receiver.url() and job["webhook_events_filter"] == ["start", "completed"]
    assert "webhook" not in job["params"]  # a job option, not a pipeline parameter

    assert await event(hooks, job["id"], "status", {**job, "status": "queued"}) is None  # not an event
    assert await event(hooks, job["id"], "progress", {"step": 1, "total": 25}) is None  # filtered out
    start = await event(hooks, job["id"], "status", {**job, "status": "running"})
    done = await event(hooks, job["id"], "completed", {**job, "status": "succeeded"})
    clock = Clock()
    assert await dispatcher(hooks, clock).deliver_due() == {start: "delivered", done: "delivered"}

    assert key.startswith("whsec_") and await secret(hooks, alice) == key
    by_id = {r.headers["webhook-id"]: r for r in receiver.requests}
    assert set(by_id) == {start, done}
    payload = verify(key, by_id[done])  # standardwebhooks: signature and timestamp
    assert payload["type"] == "generation.completed" and payload["data"]["status"] == "succeeded"
    assert payload["data"]["id"] == job["id"]
    assert verify(key, by_id[start])["type"] == "generation.start"
    request = by_id[done]
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"].startswith("Sfumato-Webhooks/")
    with pytest.raises(WebhookVerificationError):
        Webhook(webhooks.new_secret()).verify(request.body, request.headers)

    record = await delivery(hooks, alice, done)
    assert record["status"] == "delivered" and record["attempts"] == 1
    assert (
        record["attempt_log"][0]["outcome"] == "delivered" and record["attempt_log"][0]["status_code"] == 204
    )
    assert record["event_type"] == "generation.completed" and record["job_id"] == job["id"]


async def test_a_jobs_life_reaches_its_webhook_through_events_publish(
    hooks: Api, receiver: Receiver, complete_job
) -> None:
    """The real path: submission, a worker's claim and completion publish the job's events
    (``events.publish``), which put the deliveries in the outbox in their own transactions."""
    alice = await hooks.user("alice")
    job = await submit(hooks, alice, receiver.url())
    await complete_job(hooks, job["id"], count=2)
    clock = Clock()
    results = await dispatcher(hooks, clock).deliver_due()
    assert sorted(results.values()) == ["delivered", "delivered"]  # start, completed (queued: none)
    key = await secret(hooks, alice)
    payloads = [verify(key, r) for r in receiver.requests]
    by_type = {p["type"]: p["data"] for p in payloads}
    assert set(by_type) == {"generation.start", "generation.completed"}
    assert by_type["generation.start"]["status"] == "running"
    done = by_type["generation.completed"]
    assert done["status"] == "succeeded" and done["id"] == job["id"] and len(done["images"]) == 2
    assert done["webhook"] == receiver.url()
    r = await hooks.client.get(
        "/v1/webhooks/deliveries", params={"job_id": job["id"]}, headers=hooks.headers(alice)
    )
    assert {d["event_type"] for d in r.json()["items"]} == {"generation.start", "generation.completed"}


async def test_a_rolled_back_event_has_no_delivery(hooks: Api, receiver: Receiver) -> None:
    from sfumato.control_plane import events

    alice = await hooks.user("alice")
    job = await submit(hooks, alice, receiver.url())
    services = hooks.app.state.services  # type: ignore[attr-defined]
    async with services.sessions() as session:
        await events.publish(session=session, job_id=job["id"], kind="completed", data={"x": 1})
        await session.rollback()
    async with services.sessions() as session:
        await events.publish(session=session, job_id=job["id"], kind="completed", data={"x": 2})
        await session.commit()
    page = (await hooks.client.get("/v1/webhooks/deliveries", headers=hooks.headers(alice))).json()
    assert len(page["items"]) == 1
    await dispatcher(hooks, Clock()).deliver_due()
    assert [json.loads(r.body)["data"] for r in receiver.requests] == [{"x": 2}]


async def test_all_events_by_default_and_none_without_a_webhook(hooks: Api, receiver: Receiver) -> None:
    alice = await hooks.user("alice")
    job = await submit(hooks, alice, receiver.url())
    assert job["webhook_events_filter"] is None
    for kind, data in (("status", {"status": "running"}), ("progress", {"step": 5}), ("completed", {})):
        assert await event(hooks, job["id"], kind, data) is not None
    plain = await submit(hooks, alice, None)
    assert await event(hooks, plain["id"], "completed", {}) is None


async def test_the_outbox_row_lives_and_dies_with_the_events_transaction(
    hooks: Api, receiver: Receiver
) -> None:
    alice = await hooks.user("alice")
    job = await submit(hooks, alice, receiver.url())
    await event(hooks, job["id"], "completed", {"n": 1}, commit=False)  # rolled back: no delivery
    page = (await hooks.client.get("/v1/webhooks/deliveries", headers=hooks.headers(alice))).json()
    assert page["items"] == []
    kept = await event(hooks, job["id"], "completed", {"n": 2})
    page = (await hooks.client.get("/v1/webhooks/deliveries", headers=hooks.headers(alice))).json()
    assert [d["id"] for d in page["items"]] == [kept] and page["items"][0]["status"] == "pending"
    assert await dispatcher(hooks, Clock()).deliver_due() == {kept: "delivered"}
    assert json.loads(receiver.requests[0].body)["data"] == {"n": 2}


# --------------------------------------------------------------------------- retries


async def test_failures_are_retried_with_backoff_and_jitter_under_the_same_id(
    hooks: Api, receiver: Receiver
) -> None:
    alice = await hooks.user("alice")
    job = await submit(hooks, alice, receiver.url())
    msg = await event(hooks, job["id"], "completed", {"ok": True})
    receiver.answer(Answer(503, b"busy"), Answer(500), Answer(429))
    clock = Clock()
    worker = dispatcher(hooks, clock)
    base = hooks.settings.webhook_retry_base_s
    for attempt in (1, 2, 3):
        assert await worker.deliver_due() == {msg: "pending"}
        record = await delivery(hooks, alice, msg)
        due = datetime.fromisoformat(record["next_attempt_at"])
        delay = (due - clock.now).total_seconds()
        ceiling = base * 2 ** (attempt - 1)
        assert 0.5 * ceiling - 0.01 <= delay <= ceiling + 0.01, (attempt, delay)  # jitter: 50-100%
        clock.advance(delay - 0.5)
        assert await worker.deliver_due() == {}  # not due yet
        clock.to(due)
    assert await worker.deliver_due() == {msg: "delivered"}
    assert [r.headers["webhook-id"] for r in receiver.requests] == [msg] * 4
    key = await secret(hooks, alice)
    for request in receiver.requests:
        verify(key, request)  # every attempt signed (each with its own timestamp)
    record = await delivery(hooks, alice, msg)
    assert [(a["outcome"], a["status_code"]) for a in record["attempt_log"]] == [
        ("http_error", 503),
        ("http_error", 500),
        ("http_error", 429),
        ("delivered", 204),
    ]
    assert record["attempt_log"][0]["response_excerpt"] == "busy"


async def test_a_delivery_fails_after_the_last_attempt(api_factory, receiver: Receiver) -> None:
    api = await api_factory(webhook_allowed_hosts=["127.0.0.1"], webhook_max_attempts=3)
    alice = await api.user("alice")
    job = await submit(api, alice, receiver.url())
    msg = await event(api, job["id"], "completed", {})
    receiver.answer(*[Answer(500)] * 5)
    clock = Clock()
    worker = dispatcher(api, clock)
    statuses = []
    for _ in range(3):
        statuses.append((await worker.deliver_due())[msg])
        clock.advance(api.settings.webhook_retry_max_s)
    assert statuses == ["pending", "pending", "failed"]
    assert await worker.deliver_due() == {}
    record = await delivery(api, alice, msg)
    assert record["status"] == "failed" and record["attempts"] == 3 and "HTTP 500" in record["last_error"]


async def test_redirects_are_not_followed(hooks: Api, receiver: Receiver) -> None:
    alice = await hooks.user("alice")
    job = await submit(hooks, alice, receiver.url("/hook"))
    msg = await event(hooks, job["id"], "completed", {})
    receiver.answer(Answer(302, headers={"Location": receiver.url("/elsewhere")}))
    assert await dispatcher(hooks, Clock()).deliver_due() == {msg: "pending"}
    assert receiver.paths() == ["/hook"]  # /elsewhere never asked
    (attempt,) = (await delivery(hooks, alice, msg))["attempt_log"]
    assert attempt["outcome"] == "redirect" and attempt["status_code"] == 302
    assert "not followed" in attempt["error"]


async def test_the_answer_is_read_up_to_the_cap(api_factory, receiver: Receiver) -> None:
    api = await api_factory(webhook_allowed_hosts=["127.0.0.1"], webhook_max_response_bytes=1000)
    alice = await api.user("alice")
    job = await submit(api, alice, receiver.url())
    msg = await event(api, job["id"], "completed", {})
    receiver.answer(Answer(mode="flood"))  # 200 and a 64 MiB body
    assert await dispatcher(api, Clock()).deliver_due() == {msg: "delivered"}
    (attempt,) = (await delivery(api, alice, msg))["attempt_log"]
    assert attempt["status_code"] == 200 and "over 1000 bytes" in attempt["error"]
    assert len(attempt["response_excerpt"]) <= 512
    assert receiver.flood_bytes_sent < 64 * 2**20  # the connection was dropped, not read to the end


async def test_a_receiver_that_never_answers_times_out(api_factory, receiver: Receiver) -> None:
    api = await api_factory(webhook_allowed_hosts=["127.0.0.1"], webhook_timeout_s=0.5)
    alice = await api.user("alice")
    job = await submit(api, alice, receiver.url())
    msg = await event(api, job["id"], "completed", {})
    receiver.answer(Answer(mode="hang"))
    assert await dispatcher(api, Clock()).deliver_due() == {msg: "pending"}
    (attempt,) = (await delivery(api, alice, msg))["attempt_log"]
    assert attempt["outcome"] == "timeout"


# --------------------------------------------------------------------------- endpoints


async def test_an_endpoint_is_disabled_after_repeated_410(hooks: Api, receiver: Receiver) -> None:
    alice = await hooks.user("alice")
    job = await submit(hooks, alice, receiver.url())
    receiver.answer(Answer(410), Answer(410))
    clock = Clock()
    worker = dispatcher(hooks, clock)
    first = await event(hooks, job["id"], "status", {"status": "running"}, clock=clock)
    assert await worker.deliver_due() == {first: "failed"}  # 410: not retried
    (endpoint,) = (await hooks.client.get("/v1/webhooks/endpoints", headers=hooks.headers(alice))).json()
    assert not endpoint["disabled"]
    second = await event(hooks, job["id"], "completed", {}, clock=clock)
    assert await worker.deliver_due() == {second: "failed"}  # the second 410 in a row disables it
    (endpoint,) = (await hooks.client.get("/v1/webhooks/endpoints", headers=hooks.headers(alice))).json()
    assert endpoint["disabled"] and "410" in endpoint["disabled_reason"]

    third = await event(hooks, job["id"], "completed", {"again": True}, clock=clock)
    assert (await delivery(hooks, alice, third))["status"] == "skipped"
    clock.advance(3600)
    assert await worker.deliver_due() == {}
    assert len(receiver.requests) == 2

    r = await hooks.client.post(
        f"/v1/webhooks/endpoints/{endpoint['id']}/enable", headers=hooks.headers(alice)
    )
    assert r.status_code == 200 and not r.json()["disabled"]
    fourth = await event(hooks, job["id"], "completed", {"after": "enable"}, clock=clock)
    assert await worker.deliver_due() == {fourth: "delivered"}


async def test_an_endpoint_is_disabled_after_repeated_failures(api_factory, receiver: Receiver) -> None:
    api = await api_factory(webhook_allowed_hosts=["127.0.0.1"], webhook_disable_after_failures=3)
    alice = await api.user("alice")
    job = await submit(api, alice, receiver.url())
    receiver.answer(*[Answer(500)] * 10)
    clock = Clock()
    worker = dispatcher(api, clock)
    msg = await event(api, job["id"], "completed", {}, clock=clock)
    waiting = await event(api, job["id"], "progress", {"step": 3}, clock=clock)
    results = await worker.deliver_due()
    assert results == {msg: "pending", waiting: "pending"}  # two failures in a row
    clock.advance(3600)
    first_done = await worker.deliver_due()  # the third failure disables: everything pending skipped
    assert "skipped" in first_done.values()
    (endpoint,) = (await api.client.get("/v1/webhooks/endpoints", headers=api.headers(alice))).json()
    assert endpoint["disabled"] and "3 failed attempts in a row" in endpoint["disabled_reason"]
    for msg_id in (msg, waiting):
        assert (await delivery(api, alice, msg_id))["status"] == "skipped"
    clock.advance(3600)
    assert await worker.deliver_due() == {}


async def test_a_success_resets_the_failure_count(api_factory, receiver: Receiver) -> None:
    api = await api_factory(
        webhook_allowed_hosts=["127.0.0.1"], webhook_disable_after_failures=2, webhook_max_attempts=1
    )
    alice = await api.user("alice")
    job = await submit(api, alice, receiver.url())
    receiver.answer(Answer(500), Answer(204), Answer(500))
    clock = Clock()
    worker = dispatcher(api, clock)
    for _ in range(3):
        await event(api, job["id"], "progress", {}, clock=clock)
        await worker.deliver_due()
        clock.advance(3600)
    (endpoint,) = (await api.client.get("/v1/webhooks/endpoints", headers=api.headers(alice))).json()
    assert not endpoint["disabled"] and endpoint["consecutive_failures"] == 1


# --------------------------------------------------------------------------- secrets


async def test_rotation_sends_both_signatures_during_the_overlap(hooks: Api, receiver: Receiver) -> None:
    alice = await hooks.user("alice")
    r = await hooks.client.get("/v1/webhooks/secret", headers=hooks.headers(alice))
    assert r.status_code == 404  # none until rotated or a webhook job is submitted
    r = await hooks.client.post("/v1/webhooks/secret/rotate", headers=hooks.headers(alice))
    assert r.status_code == 200 and r.json()["previous_secret_expires_at"] is None  # the first one
    old = r.json()["secret"]
    job = await submit(hooks, alice, receiver.url())
    assert await secret(hooks, alice) == old  # submitting kept it
    r = await hooks.client.post("/v1/webhooks/secret/rotate", headers=hooks.headers(alice))
    new = r.json()["secret"]
    assert new != old and r.json()["previous_secret_expires_at"] is not None
    assert await secret(hooks, alice) == new

    clock = Clock()
    worker = dispatcher(hooks, clock)
    during = await event(hooks, job["id"], "completed", {"when": "during"}, clock=clock)
    await worker.deliver_due()
    request = receiver.requests[-1]
    assert request.headers["webhook-id"] == during
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    verify(old, request)  # receivers still on the old secret verify
    verify(new, request)  # and those already on the new one

    clock.advance(hooks.settings.webhook_secret_overlap_s + 1)
    after = await event(hooks, job["id"], "completed", {"when": "after"}, clock=clock)
    await worker.deliver_due()
    request = receiver.requests[-1]
    assert request.headers["webhook-id"] == after
    assert len(request.headers["webhook-signature"].split(" ")) == 1
    verify(new, request)
    with pytest.raises(WebhookVerificationError):
        verify(old, request)


async def test_signature_matches_the_specification_by_hand() -> None:
    """``v1,`` + base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}`` (the spec's own example)."""
    key = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = '{"test": 2432232314}'
    assert (
        webhooks.sign(secret=key, msg_id="msg_p5jXN8AQM9LWM0D4loKWxJek", timestamp=1614265330, body=body)
        == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


# --------------------------------------------------------------------------- crashes and leases


async def test_a_crash_between_send_and_record_resends_with_the_same_id(
    hooks: Api, receiver: Receiver
) -> None:
    alice = await hooks.user("alice")
    job = await submit(hooks, alice, receiver.url())
    msg = await event(hooks, job["id"], "completed", {})
    clock = Clock()
    crashed = dispatcher(hooks, clock, name="crashed")
    (claimed,) = await crashed.claim(10)
    # It sends, and dies before recording anything.
    sent = await webhooks.send(
        url=claimed.url, body=claimed.body, headers={"webhook-id": claimed.id}, settings=hooks.settings
    )
    assert sent.ok and len(receiver.requests) == 1

    other = dispatcher(hooks, clock, name="survivor")
    assert await other.deliver_due() == {}  # the lease still holds
    clock.advance(hooks.settings.webhook_lease_s + 1)
    assert await other.deliver_due() == {msg: "delivered"}
    assert [r.headers["webhook-id"] for r in receiver.requests] == [msg, msg]
    record = await delivery(hooks, alice, msg)
    assert [a["outcome"] for a in record["attempt_log"]] == [None, "delivered"]  # the lost attempt shows

    # The crashed dispatcher coming back cannot overwrite what the survivor recorded.
    services = hooks.app.state.services  # type: ignore[attr-defined]
    async with services.sessions() as session:
        late = await webhooks.record_attempt(
            session=session,
            settings=hooks.settings,
            delivery_id=msg,
            worker_id="crashed",
            attempt=claimed.attempt,
            outcome=webhooks.Outcome("http_error", status_code=500),
            now=clock(),
            rng=random.Random(0),
        )
    assert late is None and (await delivery(hooks, alice, msg))["status"] == "delivered"


async def test_concurrent_dispatchers_never_claim_the_same_delivery(api_factory, receiver: Receiver) -> None:
    hooks = await api_factory(webhook_allowed_hosts=["127.0.0.1"], webhook_max_in_flight_per_endpoint=100)
    alice = await hooks.user("alice")
    job = await submit(hooks, alice, receiver.url())
    ids = {await event(hooks, job["id"], "progress", {"step": i}) for i in range(30)}
    clock = Clock()
    workers = [dispatcher(hooks, clock, name=f"d{i}") for i in range(4)]
    claimed: list[str] = []
    for _ in range(30):  # rounds of concurrent claims until all are taken (a round may skip rows)
        claims = await asyncio.gather(*(w.claim(10) for w in workers))
        claimed += [c.id for batch in claims for c in batch]
        if len(claimed) >= 30:
            break
    assert len(claimed) == len(set(claimed)) == 30 and set(claimed) == ids  # each exactly once


async def test_one_endpoint_cannot_take_every_slot(hooks: Api, receiver: Receiver) -> None:
    """At most SFUMATO_WEBHOOK_MAX_IN_FLIGHT_PER_ENDPOINT attempts to one endpoint, counted over
    every dispatcher; another user's endpoint still gets a slot."""
    alice, bob = await hooks.user("alice"), await hooks.user("bob")
    slow = await submit(hooks, alice, receiver.url("/slow"))
    other = await submit(hooks, bob, receiver.url("/other"))
    for i in range(10):
        await event(hooks, slow["id"], "progress", {"step": i})
    bobs = await event(hooks, other["id"], "completed", {})
    clock = Clock()
    cap = hooks.settings.webhook_max_in_flight_per_endpoint
    first = await dispatcher(hooks, clock, name="d1").claim(16)
    assert len(first) == cap + 1 and bobs in {c.id for c in first}
    assert await dispatcher(hooks, clock, name="d2").claim(16) == []  # alice's endpoint is full
    clock.advance(hooks.settings.webhook_lease_s + 1)  # d1 died: its leases expire, slots free
    again = await dispatcher(hooks, clock, name="d3").claim(16)
    assert len([c for c in again if c.url.endswith("/slow")]) == cap


async def test_the_dispatcher_task_delivers_and_stops(hooks: Api, receiver: Receiver) -> None:
    alice = await hooks.user("alice")
    job = await submit(hooks, alice, receiver.url())
    msg = await event(hooks, job["id"], "completed", {})
    stop = asyncio.Event()
    task = asyncio.create_task(webhooks.run_dispatcher(hooks.app.state.services, stop=stop))  # type: ignore[attr-defined]
    try:
        async with asyncio.timeout(60):
            while not receiver.requests:
                await asyncio.sleep(0.02)
            while (await delivery(hooks, alice, msg))["status"] != "delivered":
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        async with asyncio.timeout(60):
            await task


async def test_stopping_hands_attempts_in_flight_back(hooks: Api, receiver: Receiver) -> None:
    alice = await hooks.user("alice")
    job = await submit(hooks, alice, receiver.url())
    msg = await event(hooks, job["id"], "completed", {})
    receiver.answer(Answer(mode="hang"))
    stop = asyncio.Event()
    task = asyncio.create_task(webhooks.run_dispatcher(hooks.app.state.services, stop=stop))  # type: ignore[attr-defined]
    async with asyncio.timeout(60):
        while not receiver.requests:  # the attempt is in flight, the receiver holding it
            await asyncio.sleep(0.02)
    stop.set()
    async with asyncio.timeout(60):
        await task
    record = await delivery(hooks, alice, msg)
    assert record["status"] == "pending" and [a["outcome"] for a in record["attempt_log"]] == ["interrupted"]
    assert await dispatcher(hooks, Clock()).deliver_due() == {msg: "delivered"}  # no lease to wait out
    assert [r.headers["webhook-id"] for r in receiver.requests] == [msg, msg]


async def test_finished_deliveries_are_purged(hooks: Api, receiver: Receiver) -> None:
    alice = await hooks.user("alice")
    job = await submit(hooks, alice, receiver.url())
    msg = await event(hooks, job["id"], "completed", {})
    pending = await event(hooks, job["id"], "progress", {})
    receiver.answer(Answer(204), Answer(500))
    await dispatcher(hooks, Clock()).deliver_due()
    services = hooks.app.state.services  # type: ignore[attr-defined]
    async with services.sessions() as session:
        assert await webhooks.purge_finished(session=session, before=utcnow() + timedelta(seconds=1)) == 1
        left = (await session.scalars(select(WebhookDelivery.id))).all()
        attempts = await session.scalar(select(func.count()).select_from(WebhookAttempt))
    assert left == [pending] and attempts == 1 and msg not in left


# --------------------------------------------------------------------------- the API


async def test_submission_refuses_what_the_operator_does_not_allow(hooks: Api) -> None:
    alice = await hooks.user("alice")
    for body, field in (
        ({"webhook": "https://10.0.0.1/h"}, "webhook"),
        ({"webhook": "http://hooks.example.com/h"}, "webhook"),
        ({"webhook": "https://169.254.169.254/latest"}, "webhook"),
        ({"webhook": "ftp://hooks.example.com/h"}, "webhook"),
        ({"webhook": "https://a:b@hooks.example.com/h"}, "webhook"),
        ({"webhook": "https://hooks.example.com/" + "x" * 2100}, "webhook"),
        ({"webhook_events_filter": ["completed"]}, "webhook_events_filter"),
        (
            {"webhook": "https://hooks.example.com/h", "webhook_events_filter": ["output"]},
            "webhook_events_filter",
        ),
        ({"webhook": "https://hooks.example.com/h", "webhook_events_filter": []}, "webhook_events_filter"),
    ):
        r = await hooks.client.post(
            "/v1/generations", json={"prompt": "a red circle", **body}, headers=hooks.headers(alice)
        )
        assert r.status_code == 422, (body, r.text)
        assert field in r.text, (body, r.text)
    job = await submit(
        hooks, alice, "https://hooks.example.com/h", webhook_events_filter=["completed", "start"]
    )
    assert job["webhook_events_filter"] == ["start", "completed"]


async def test_a_trainings_life_reaches_its_webhook(hooks: Api, receiver: Receiver) -> None:
    """A training carries a webhook as a generation does: the runner's claim, its progress reports
    and its completion (``leases.claim``, ``trainings.report``, ``trainings.complete``) become
    ``training.*`` deliveries; what the operator does not allow is a 422 naming the field."""
    tess = await hooks.user("tess", role="trainer")
    upload = await hooks.client.post(
        "/v1/datasets",
        headers=hooks.headers(tess),
        files={"file": ("d.zip", shapes_zip(4), "application/zip")},
    )
    assert upload.status_code == 201, upload.text
    body = {"dataset_id": upload.json()["id"], "steps": 3}
    for bad, field in (
        ({"webhook": "https://10.0.0.1/h"}, "webhook"),
        ({"webhook_events_filter": ["completed"]}, "webhook_events_filter"),
    ):
        r = await hooks.client.post("/v1/trainings", json={**body, **bad}, headers=hooks.headers(tess))
        assert r.status_code == 422 and field in r.text, (bad, r.text)

    r = await hooks.client.post(
        "/v1/trainings",
        json={**body, "webhook": receiver.url(), "webhook_events_filter": ["progress", "completed"]},
        headers=hooks.headers(tess),
    )
    assert r.status_code == 202, r.text
    training = r.json()
    assert training["webhook"] == receiver.url() and training["webhook_events_filter"] == [
        "progress",
        "completed",
    ]
    assert "webhook" not in training["params"]
    services = hooks.app.state.services  # type: ignore[attr-defined]
    async with services.sessions() as session:
        (claimed,) = await leases.claim(session=session, worker_id="runner", lease_s=30, queue="trainings")
    assert claimed.id == training["id"]
    for step in (1, 2, 3):
        async with services.sessions() as session:
            details = {"step": step, "total": 3, "loss": 0.5 / step, "eta_s": 3.0 - step}
            assert await trainings.report(
                session=session, training_id=claimed.id, details=details, progress=step / 3
            )
    async with services.sessions() as session:
        assert await trainings.complete(session=session, training_id=claimed.id, worker_id="runner")

    results = await dispatcher(hooks, Clock()).deliver_due()
    assert sorted(results.values()) == ["delivered"] * 4  # 3 progress + completed; start filtered out
    key = await secret(hooks, tess)
    payloads = [verify(key, request) for request in receiver.requests]
    assert [p["type"] for p in payloads if p["type"] == "training.progress"] == ["training.progress"] * 3
    assert sorted(p["data"]["step"] for p in payloads if p["type"] == "training.progress") == [1, 2, 3]
    (done,) = [p["data"] for p in payloads if p["type"] == "training.completed"]
    assert done["id"] == training["id"] and done["status"] == "succeeded" and done["method"] == "lora"
    r = await hooks.client.get(
        "/v1/webhooks/deliveries", params={"job_id": training["id"]}, headers=hooks.headers(tess)
    )
    assert (
        sorted(d["event_type"] for d in r.json()["items"])
        == ["training.completed"] + ["training.progress"] * 3
    )


async def test_deliveries_are_the_owners_alone(hooks: Api, receiver: Receiver) -> None:
    alice, bob = await hooks.user("alice"), await hooks.user("bob")
    job = await submit(hooks, alice, receiver.url())
    ids = [await event(hooks, job["id"], "progress", {"step": i}) for i in range(5)]
    worker = dispatcher(hooks, Clock())
    while await worker.deliver_due():  # (at most 4 in flight to one endpoint)
        pass

    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (
            await hooks.client.get("/v1/webhooks/deliveries", params=params, headers=hooks.headers(alice))
        ).json()
        seen += [d["id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 5
    r = await hooks.client.get(
        "/v1/webhooks/deliveries",
        params={"job_id": job["id"], "status": "delivered"},
        headers=hooks.headers(alice),
    )
    assert len(r.json()["items"]) == 5

    # Bob sees none of it: another user's delivery or endpoint is a 404.
    page = (await hooks.client.get("/v1/webhooks/deliveries", headers=hooks.headers(bob))).json()
    assert page["items"] == []
    r = await hooks.client.get(f"/v1/webhooks/deliveries/{ids[0]}", headers=hooks.headers(bob))
    assert r.status_code == 404
    (endpoint,) = (await hooks.client.get("/v1/webhooks/endpoints", headers=hooks.headers(alice))).json()
    assert (await hooks.client.get("/v1/webhooks/endpoints", headers=hooks.headers(bob))).json() == []
    r = await hooks.client.post(f"/v1/webhooks/endpoints/{endpoint['id']}/enable", headers=hooks.headers(bob))
    assert r.status_code == 404
    assert (await hooks.client.get("/v1/webhooks/secret", headers=hooks.headers(bob))).status_code == 404
    r = await hooks.client.post("/v1/webhooks/secret/rotate", headers=hooks.headers(bob))
    assert r.json()["secret"] != await secret(hooks, alice)  # each user has their own
    for path in ("/v1/webhooks/deliveries", "/v1/webhooks/secret", "/v1/webhooks/endpoints"):
        assert (await hooks.client.get(path)).status_code == 401
    r = await hooks.client.get(
        "/v1/webhooks/deliveries", params={"cursor": "nope"}, headers=hooks.headers(alice)
    )
    assert r.status_code == 400 and "cursor" in r.text
