"""Webhooks: a job's events, POSTed to the URL its request named, signed and SSRF-safe.

A generation (or training) may carry ``webhook`` and ``webhook_events_filter`` (``start``,
``progress``, ``completed``; :data:`sfumato.serving.contract.JOB_OPTIONS`). Deliveries follow
the Standard Webhooks specification (https://www.standardwebhooks.com):

* headers ``webhook-id`` (the delivery's id, the same on every attempt: receivers deduplicate on
  it), ``webhook-timestamp`` (Unix seconds of the attempt) and ``webhook-signature``: ``v1,`` +
  base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}`` under the user's secret ``whsec_...``; after
  :func:`rotate_secret` the old secret signs too (space-separated) for
  ``SFUMATO_WEBHOOK_SECRET_OVERLAP_S``, so receivers can switch without losing a delivery;
* body ``{"type": "generation.completed", "timestamp": ..., "data": {...}}``, ``data`` being the
  event's (for ``start`` and ``completed`` the generation resource).

**Durable outbox.** :func:`enqueue_job_event` writes a :class:`~models.WebhookDelivery` row in
the caller's transaction: the one that records the event (``events.publish``), so an event that
is committed has its delivery, and one rolled back has none. A :class:`Dispatcher` (a task beside
the workers) claims due rows under a lease (PostgreSQL ``FOR UPDATE SKIP LOCKED``; SQLite
serialises writers), sends them outside any transaction, and records the outcome. A dispatcher
that dies between sending and recording leaves the lease to expire: the row is sent again with
the same ``webhook-id`` (at-least-once). Failures are retried with exponential backoff and
jitter up to ``SFUMATO_WEBHOOK_MAX_ATTEMPTS``; a ``410 Gone`` ends the delivery; an endpoint that
answers 410 ``SFUMATO_WEBHOOK_DISABLE_AFTER_GONE`` times in a row, or fails
``SFUMATO_WEBHOOK_DISABLE_AFTER_FAILURES`` attempts in a row, is disabled (its pending
deliveries are skipped) until its owner enables it again.

**SSRF.** Only https, except to hosts the operator lists (``SFUMATO_WEBHOOK_ALLOWED_HOSTS``).
The host is resolved once per attempt; every address it resolves to must be public (not
loopback, private, link-local, multicast, reserved, unspecified, shared, documentation, or a
cloud metadata address; IPv4 and IPv6, with IPv4 embedded in IPv6 — mapped, 6to4, Teredo, NAT64
— unwrapped, and IPv4 written in the legacy forms ``2130706433``, ``0x7f.1``, ``0177.0.0.1``,
``127.1`` read as the resolver would); then the connection goes to that address (pinned: no
second lookup a DNS rebinding could answer differently), with TLS still verified against the
URL's host name. Redirects are never followed, each attempt has short timeouts, and at most
``SFUMATO_WEBHOOK_MAX_RESPONSE_BYTES`` of an answer is read. Listed hosts skip the address check
(an operator's in-cluster receiver), which is also how the test suite reaches its local receiver.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import ipaddress
import json
import logging
import random
import re
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpcore
import httpx
import standardwebhooks
from sqlalchemy import and_, delete, func, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import lazyload

from sfumato import __version__
from sfumato.control_plane import pagination
from sfumato.control_plane.models import (
    Job,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookSecret,
    new_id,
    utcnow,
)
from sfumato.control_plane.settings import Settings
from sfumato.errors import NotFoundError, UsageError
from sfumato.serving.contract import WEBHOOK_EVENTS, WEBHOOK_URL_MAX_LENGTH

if TYPE_CHECKING:  # (auth -> services -> events -> webhooks: a cycle at run time)
    from sfumato.control_plane.auth import Principal

log = logging.getLogger("sfumato.webhooks")

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
DELIVERY_STATUSES = ("pending", "delivered", "failed", "skipped")
USER_AGENT = f"Sfumato-Webhooks/{__version__}"
Clock = Callable[[], datetime]
#: ``(host, port) -> addresses``: the one DNS lookup of an attempt (tests inject a stub).
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# --------------------------------------------------------------------------- signing


def new_secret() -> str:
    """A fresh ``whsec_`` secret: 32 random bytes, base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def sign(*, secret: str, msg_id: str, timestamp: int, body: str) -> str:
    """One Standard Webhooks signature: ``v1,`` + base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}``."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return standardwebhooks.Webhook(secret).sign(msg_id=msg_id, timestamp=moment, data=body)


def signature_header(*, secrets: Sequence[str], msg_id: str, timestamp: int, body: str) -> str:
    """``webhook-signature``: one signature per secret in force, space-separated (rotation)."""
    return " ".join(sign(secret=s, msg_id=msg_id, timestamp=timestamp, body=body) for s in secrets)


def _insert(session: AsyncSession, table: Any) -> Any:
    """``INSERT`` of this dialect (for ``ON CONFLICT DO NOTHING``: safe when two transactions race)."""
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)


def _is_postgresql(session: AsyncSession) -> bool:
    return session.bind is not None and session.bind.dialect.name == "postgresql"


async def ensure_secret(*, session: AsyncSession, user_id: str) -> None:
    """Give the user a secret if they have none (in the caller's transaction; race-safe)."""
    await session.execute(
        _insert(session, WebhookSecret)
        .values(user_id=user_id, secret=new_secret(), created_at=utcnow())
        .on_conflict_do_nothing(index_elements=["user_id"])
    )


def secrets_in_force(record: WebhookSecret, now: datetime) -> list[str]:
    """The secrets that sign a delivery now: the current one, and the previous during the overlap."""
    out = [record.secret]
    if record.previous_secret and record.previous_expires_at and record.previous_expires_at > now:
        out.append(record.previous_secret)
    return out


async def read_secret(*, session: AsyncSession, principal: Principal) -> WebhookSecret:
    """The caller's secret (404 until they have one: rotating or submitting a webhook makes it)."""
    try:
        record = await session.get(WebhookSecret, principal.user_id)
    finally:
        await session.commit()
    if record is None:
        raise NotFoundError(
            "no webhook secret yet: POST /v1/webhooks/secret/rotate makes one (so does the first "
            "job submitted with a webhook)"
        )
    return record


async def rotate_secret(
    *, session: AsyncSession, settings: Settings, principal: Principal, now: datetime | None = None
) -> WebhookSecret:
    """A new current secret; the one it replaces keeps signing too for the overlap period (a
    rotation during an overlap drops the oldest). The first call makes the first secret."""
    now = now or utcnow()
    record = await session.get(WebhookSecret, principal.user_id, with_for_update=True, populate_existing=True)
    if record is None:  # the first secret: nothing to overlap with
        await ensure_secret(session=session, user_id=principal.user_id)
        record = await session.get(WebhookSecret, principal.user_id, populate_existing=True)
        assert record is not None
    else:
        record.previous_secret = record.secret
        record.previous_expires_at = now + timedelta(seconds=settings.webhook_secret_overlap_s)
        record.secret = new_secret()
        record.rotated_at = now
    await session.commit()
    return record


# --------------------------------------------------------------------------- the target URL


class Refused(Exception):
    """The target may not be contacted (SSRF guard); the message says why, without the address."""


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    scheme: str
    host: str  # lower case, IDNA (punycode), no brackets, no trailing dot
    port: int
    listed: bool  # in SFUMATO_WEBHOOK_ALLOWED_HOSTS: http allowed, addresses not checked


def check_url_syntax(url: str) -> str:
    """The URL if it can be a webhook (absolute http(s), a host, no credentials, no fragment);
    :class:`UsageError` naming ``webhook`` otherwise. What the operator allows is
    :func:`check_target`'s."""
    if len(url) > WEBHOOK_URL_MAX_LENGTH:
        raise UsageError(f"webhook: longer than {WEBHOOK_URL_MAX_LENGTH} characters", field="webhook")
    if any(ch.isspace() or ord(ch) < 0x20 for ch in url):
        raise UsageError("webhook: contains whitespace or control characters", field="webhook")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise UsageError(f"webhook: not a URL ({exc})", field="webhook") from None
    if parsed.scheme not in ("http", "https"):
        raise UsageError("webhook: must be an https:// URL", field="webhook")
    if not parsed.host:
        raise UsageError("webhook: has no host", field="webhook")
    if parsed.userinfo:
        raise UsageError("webhook: must not carry credentials (user:password@)", field="webhook")
    if parsed.fragment:
        raise UsageError("webhook: must not have a #fragment", field="webhook")
    return url


def parse_target(url: str, *, allowed_hosts: Sequence[str]) -> Target:
    check_url_syntax(url)
    parsed = httpx.URL(url)
    host = parsed.raw_host.decode("ascii").lower().rstrip(".")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return Target(url=url, scheme=parsed.scheme, host=host, port=port, listed=host in allowed_hosts)


_LEGACY_IPV4 = re.compile(r"^(?:0x[0-9a-f]+|[0-9]+)(?:\.(?:0x[0-9a-f]+|[0-9]+))*$", re.IGNORECASE)


def literal_address(host: str) -> IPAddress | None:
    """The address ``host`` is written as, or ``None`` for a name. Besides the standard forms,
    the legacy IPv4 forms that ``inet_aton`` (and so many resolvers and clients) read as an
    address: a 32-bit number (``2130706433``), hex or octal parts (``0x7f.0.0.1``,
    ``0177.0.0.1``) and short forms (``127.1``)."""
    host = host.strip("[]").rstrip(".")
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host)
    if _LEGACY_IPV4.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            raise Refused("the host is neither a name nor a valid address") from None
    return None


#: Cloud instance-metadata services (most are link-local or private anyway; listed by name so
#: that no future change of the generic checks lets one through).
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.123",  # AWS time sync
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud (classic)
    )
)
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries: mapped, 6to4, Teredo (client), NAT64, compatible."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if any(address in net for net in _NAT64) or (
        int(address) >> 32 == 0 and int(address) > 1
    ):  # NAT64, ::a.b.c.d
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refusal(address: IPAddress) -> str | None:
    """Why a webhook may not connect to ``address`` (a short class name), or ``None``: public."""
    address = ipaddress.ip_address(str(address).split("%")[0])  # an IPv6 zone says nothing more
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            inner = refusal(embedded)
            if inner is not None:
                return f"{inner} (embedded in IPv6)"
    for flag, name in (
        ("is_unspecified", "the unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_reserved", "a reserved address"),
        ("is_private", "a private address"),
        ("is_site_local", "a site-local address"),
    ):
        if getattr(address, flag, False):
            return name
    if not address.is_global:
        return "not a globally routable address"
    return None


def check_target(url: str, settings: Settings) -> Target:
    """At submission: what the operator allows (:class:`UsageError` naming ``webhook``). Names
    are resolved only when sending (the answer that matters is that one); address literals and
    ``localhost`` names are refused at once."""
    try:
        target = parse_target(url, allowed_hosts=settings.webhook_allowed_hosts)
        _check_static(target)
    except Refused as exc:
        raise UsageError(f"webhook: {exc}", field="webhook") from None
    return target


def _check_static(target: Target) -> None:
    if target.listed:
        return
    if target.scheme != "https":
        raise Refused(
            "must be https (http only for hosts the operator lists in SFUMATO_WEBHOOK_ALLOWED_HOSTS)"
        )
    if target.host == "localhost" or target.host.endswith(".localhost"):
        raise Refused("the host is a loopback name")
    literal = literal_address(target.host)
    if literal is not None:
        why = refusal(literal)
        if why is not None:
            raise Refused(f"the host is {why}")


async def system_resolver(host: str, port: int) -> list[str]:
    """The system's resolver (``getaddrinfo``), off the event loop."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def pin_address(target: Target, *, resolver: Resolver) -> IPAddress:
    """Resolve ``target`` once and choose the address to connect to; :class:`Refused` if it (or
    any address the name resolves to) is not public, unless the host is listed."""
    _check_static(target)
    literal = literal_address(target.host)
    if literal is not None:
        return literal
    try:
        answers = await resolver(target.host, target.port)
    except OSError as exc:
        raise Refused(f"the host does not resolve ({exc.__class__.__name__})") from None
    addresses = []
    for answer in answers:
        try:
            addresses.append(ipaddress.ip_address(str(answer).split("%")[0]))
        except ValueError:
            raise Refused("the resolver answered something that is not an address") from None
    if not addresses:
        raise Refused("the host resolves to no address")
    if not target.listed:
        for address in addresses:
            why = refusal(address)
            if why is not None:  # one bad answer spoils the name: never pick "the good one"
                raise Refused(f"the host resolves to {why}")
    return addresses[0]


# --------------------------------------------------------------------------- sending one attempt


@functools.lru_cache(maxsize=1)
def _default_ssl_context() -> ssl.SSLContext:
    """The system's CA bundle (certifi's, as httpx uses), loaded once, on first use: loading it
    takes tens of milliseconds, longer than a whole delivery on a LAN."""
    return httpcore.default_ssl_context()


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting to the pinned address whatever host it is asked
    for (TLS still gets the URL's host name, for SNI and certificate verification)."""

    def __init__(self, address: IPAddress) -> None:
        self._address = str(address)
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(  # type: ignore[override]
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        return await self._backend.connect_tcp(
            self._address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("webhooks do not use unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to. ``outcome``: delivered, gone (410), http_error, redirect (not
    followed), timeout, connection_error, refused (SSRF guard or settings)."""

    outcome: str
    status_code: int | None = None
    error: str | None = None
    address: str | None = None
    excerpt: str | None = None
    duration_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome == "delivered"

    @property
    def final(self) -> bool:
        """Not worth retrying: the receiver said it is gone, or the guard refuses the target."""
        return self.outcome in ("gone", "refused")

    def summary(self) -> str:
        if self.status_code is not None:
            return f"{self.outcome}: HTTP {self.status_code}" + (f" ({self.error})" if self.error else "")
        return f"{self.outcome}: {self.error}" if self.error else self.outcome


def _classify(status: int) -> str:
    if 200 <= status < 300:
        return "delivered"
    if status == 410:
        return "gone"
    if 300 <= status < 400:
        return "redirect"
    return "http_error"


async def send(
    *,
    url: str,
    body: str,
    headers: dict[str, str],
    settings: Settings,
    resolver: Resolver = system_resolver,
    ssl_context: ssl.SSLContext | None = None,
) -> Outcome:
    """One POST of ``body`` to ``url`` through the SSRF guard: resolved once, pinned, no
    redirects, bounded in time (``webhook_timeout_s`` all in) and in the bytes read."""
    started = time.perf_counter()
    address: IPAddress | None = None

    def done(outcome: str, **kwargs: Any) -> Outcome:
        return Outcome(
            outcome,
            address=str(address) if address is not None else None,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
            **kwargs,
        )

    try:
        target = parse_target(url, allowed_hosts=settings.webhook_allowed_hosts)
    except (UsageError, Refused) as exc:
        return done("refused", error=str(exc).removeprefix("webhook: "))
    total = settings.webhook_timeout_s
    timeouts = {
        "connect": min(settings.webhook_connect_timeout_s, total),
        "read": total,
        "write": total,
        "pool": total,
    }
    cap = settings.webhook_max_response_bytes
    try:
        async with asyncio.timeout(total):
            address = await pin_address(target, resolver=resolver)
            pool = httpcore.AsyncConnectionPool(
                ssl_context=ssl_context or _default_ssl_context(),
                network_backend=_PinnedBackend(address),
                max_connections=1,
                retries=0,
                http1=True,
                http2=False,
            )
            async with (
                pool,
                pool.stream(
                    "POST",
                    url,
                    headers={"content-type": "application/json", "user-agent": USER_AGENT, **headers},
                    content=body.encode(),
                    extensions={"timeout": timeouts},
                ) as response,
            ):
                received = bytearray()
                truncated = False
                async for chunk in response.aiter_stream():  # type: ignore[union-attr]
                    received += chunk
                    if len(received) > cap:  # enough: drop the connection, keep the status
                        truncated = True
                        del received[cap:]
                        break
                excerpt = received[:512].decode("utf-8", "replace") or None
                status = response.status
                error = f"answer over {cap} bytes, cut" if truncated else None
                if 300 <= status < 400:
                    error = "redirects are not followed"
                return done(_classify(status), status_code=status, excerpt=excerpt, error=error)
    except Refused as exc:
        return done("refused", error=str(exc))
    except (TimeoutError, httpcore.TimeoutException):
        return done("timeout", error=f"no answer within {total:g} s")
    except (httpcore.NetworkError, httpcore.ProtocolError, OSError, ssl.SSLError) as exc:
        return done("connection_error", error=f"{exc.__class__.__name__}: {exc}"[:300])


# --------------------------------------------------------------------------- enqueue (the outbox)


def event_category(kind: str, data: dict[str, Any]) -> str | None:
    """The ``webhook_events_filter`` name of a job event of ``events.publish``, or ``None`` if no
    webhook carries it: a ``status`` event to ``running`` is ``start``; ``progress`` and
    ``completed`` are themselves."""
    if kind == "progress":
        return "progress"
    if kind == "completed":
        return "completed"
    if kind == "status" and isinstance(data, dict) and data.get("status") == "running":
        return "start"
    return None  # other status changes (queued; final ones come as ``completed``)


def _resource(job_row: Any) -> str:
    """``generation`` or ``training`` (trainings are jobs with ``queue == "trainings"``)."""
    queue = getattr(job_row, "queue", None)
    return "training" if queue == "trainings" else "generation"


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


async def ensure_endpoint(*, session: AsyncSession, owner_id: str, url: str) -> WebhookEndpoint:
    """The owner's endpoint row for ``url`` (made if new; race-safe)."""
    digest = hashlib.sha256(url.encode()).hexdigest()
    await session.execute(
        _insert(session, WebhookEndpoint)
        .values(
            id=new_id(),
            owner_id=owner_id,
            url=url,
            url_hash=digest,
            consecutive_failures=0,
            consecutive_gone=0,
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["owner_id", "url_hash"])
    )
    endpoint = await session.scalar(
        select(WebhookEndpoint).where(
            WebhookEndpoint.owner_id == owner_id, WebhookEndpoint.url_hash == digest
        )
    )
    assert endpoint is not None
    return endpoint


async def enqueue(
    *,
    session: AsyncSession,
    owner_id: str,
    job_id: str,
    url: str,
    event_type: str,
    data: dict[str, Any],
    now: datetime | None = None,
) -> str:
    """Add one delivery to the outbox in the caller's transaction (not committed here); its id,
    the ``webhook-id``. To an endpoint that is disabled it is recorded as ``skipped``."""
    endpoint = (await _endpoints(session, {(owner_id, url)}))[(owner_id, url)]
    delivery = _delivery(
        owner_id=owner_id,
        job_id=job_id,
        endpoint=endpoint,
        event_type=event_type,
        data=data,
        now=now or utcnow(),
    )
    session.add(delivery)
    return delivery.id


async def enqueue_job_event(
    *, session: AsyncSession, job_id: str, kind: str, data: dict[str, Any], now: datetime | None = None
) -> str | None:
    """:func:`enqueue_job_events` of one event; its delivery id, or ``None``."""
    ids = await enqueue_job_events(session=session, events=[(job_id, kind, data)], now=now)
    return ids[0]


async def enqueue_job_events(
    *,
    session: AsyncSession,
    events: Sequence[tuple[str, str, dict[str, Any]]],
    now: datetime | None = None,
) -> list[str | None]:
    """The outbox side of ``events.publish`` / ``publish_many``: each ``(job_id, kind, data)``
    whose job has a webhook that takes it becomes a delivery in the caller's transaction. One
    statement for any number of events (none when no event is a webhook event: a new job's
    ``queued``), two more only for a URL seen for the first time. The delivery ids, in order
    (``None``: no delivery)."""
    now = now or utcnow()
    categories = [event_category(kind, data) for _, kind, data in events]
    out: list[str | None] = [None] * len(events)
    wanted_ids = {job_id for (job_id, _, _), category in zip(events, categories, strict=True) if category}
    if not wanted_ids:
        return out
    columns = [Job.id, Job.owner_id, Job.webhook, Job.webhook_events]
    queue = getattr(Job, "queue", None)  # trainings share the jobs table (a queue column)
    if queue is not None:
        columns.append(queue.label("queue"))
    jobs = {
        row.id: row
        for row in (
            await session.execute(select(*columns).where(Job.id.in_(wanted_ids), Job.webhook.is_not(None)))
        ).all()
    }
    if not jobs:
        return out
    endpoints = await _endpoints(session, {(row.owner_id, row.webhook) for row in jobs.values()})
    deliveries = []
    for index, ((job_id, _, data), category) in enumerate(zip(events, categories, strict=True)):
        row = jobs.get(job_id)
        if row is None or category is None or category not in (row.webhook_events or WEBHOOK_EVENTS):
            continue
        endpoint = endpoints[(row.owner_id, row.webhook)]
        delivery = _delivery(
            owner_id=row.owner_id,
            job_id=job_id,
            endpoint=endpoint,
            event_type=f"{_resource(row)}.{category}",
            data=data,
            now=now,
        )
        deliveries.append(delivery)
        out[index] = delivery.id
    session.add_all(deliveries)
    return out


async def _endpoints(session: AsyncSession, pairs: set[tuple[str, str]]) -> dict[tuple[str, str], Any]:
    """``(owner_id, url) -> endpoint`` for every pair, made where new (with the owner's secret)."""
    hashes = {hashlib.sha256(url.encode()).hexdigest(): (owner, url) for owner, url in pairs}
    rows = (
        await session.execute(
            select(WebhookEndpoint).where(
                WebhookEndpoint.url_hash.in_(hashes),
                WebhookEndpoint.owner_id.in_({owner for owner, _ in pairs}),
            )
        )
    ).scalars()
    found = {(row.owner_id, row.url): row for row in rows if (row.owner_id, row.url) in pairs}
    for owner, url in pairs - set(found):  # a new URL (the user's first webhook: a new secret too)
        await ensure_secret(session=session, user_id=owner)
        found[(owner, url)] = await ensure_endpoint(session=session, owner_id=owner, url=url)
    return found


def _delivery(
    *, owner_id: str, job_id: str, endpoint: Any, event_type: str, data: dict[str, Any], now: datetime
) -> WebhookDelivery:
    body = json.dumps(
        {"type": event_type, "timestamp": _json_default(now), "data": data},
        separators=(",", ":"),
        default=_json_default,
    )
    skipped = endpoint.disabled_at is not None
    return WebhookDelivery(
        id=f"msg_{new_id()}",
        owner_id=owner_id,
        endpoint_id=endpoint.id,
        job_id=job_id,
        event_type=event_type,
        body=body,
        status="skipped" if skipped else "pending",
        attempts=0,
        next_attempt_at=now,
        created_at=now,
        finished_at=now if skipped else None,
        last_error=f"endpoint disabled: {endpoint.disabled_reason}" if skipped else None,
    )


# --------------------------------------------------------------------------- claim and record


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery a dispatcher holds for one attempt."""

    id: str
    url: str
    body: str
    attempt: int
    secrets: tuple[str, ...]


async def claim_due(
    *,
    session: AsyncSession,
    worker_id: str,
    now: datetime,
    lease_s: float,
    limit: int,
    per_endpoint: int | None = None,
) -> list[Claimed]:
    """Claim up to ``limit`` due deliveries (pending, due, lease free or expired): each gets a
    lease and a new attempt row (outcome NULL until recorded). No endpoint gets more than
    ``per_endpoint`` attempts in flight, counting every dispatcher's (one slow or dead receiver
    cannot take every slot). Deliveries whose endpoint is disabled are skipped on the way."""
    due = (
        select(WebhookDelivery.id, WebhookDelivery.endpoint_id)
        .where(
            WebhookDelivery.status == "pending",
            WebhookDelivery.next_attempt_at <= now,
            or_(WebhookDelivery.lease_expires_at.is_(None), WebhookDelivery.lease_expires_at <= now),
        )
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit * 4 if per_endpoint else limit)
    )
    candidates = list((await session.execute(due)).all())
    if per_endpoint and candidates:
        busy = dict(
            (
                await session.execute(
                    select(WebhookDelivery.endpoint_id, func.count())
                    .where(
                        WebhookDelivery.endpoint_id.in_({c.endpoint_id for c in candidates}),
                        WebhookDelivery.status == "pending",
                        WebhookDelivery.lease_expires_at > now,
                    )
                    .group_by(WebhookDelivery.endpoint_id)
                )
            ).all()
        )
        chosen = []
        for candidate in candidates:
            if busy.get(candidate.endpoint_id, 0) < per_endpoint:
                busy[candidate.endpoint_id] = busy.get(candidate.endpoint_id, 0) + 1
                chosen.append(candidate)
        candidates = chosen
    ids = [c.id for c in candidates[:limit]]
    if ids and _is_postgresql(session):
        # Lock the chosen rows alone (still due, not taken meanwhile); rows another dispatcher
        # holds are skipped, not waited for. SQLite needs none: BEGIN IMMEDIATE serialises claims.
        ids = list(
            (
                await session.scalars(
                    select(WebhookDelivery.id)
                    .where(
                        WebhookDelivery.id.in_(ids),
                        WebhookDelivery.status == "pending",
                        or_(
                            WebhookDelivery.lease_expires_at.is_(None),
                            WebhookDelivery.lease_expires_at <= now,
                        ),
                    )
                    .with_for_update(skip_locked=True)
                )
            ).all()
        )
    if not ids:
        await session.commit()
        return []
    rows = (
        (
            await session.scalars(
                select(WebhookDelivery)
                .where(WebhookDelivery.id.in_(ids))
                .options(lazyload(WebhookDelivery.attempt_log))
            )
        )
        .unique()
        .all()
    )
    owners = {row.owner_id for row in rows}
    keys = {
        record.user_id: record
        for record in (await session.scalars(select(WebhookSecret).where(WebhookSecret.user_id.in_(owners))))
    }
    claimed = []
    for row in sorted(rows, key=lambda r: r.next_attempt_at):
        endpoint = row.endpoint
        if endpoint.disabled_at is not None:
            row.status, row.finished_at = "skipped", now
            row.last_error = f"endpoint disabled: {endpoint.disabled_reason}"
            continue
        if row.lease_owner is not None:  # its dispatcher died between sending and recording
            log.warning("webhook %s: lease of %s expired; sending it again", row.id, row.lease_owner)
        row.attempts += 1
        row.lease_owner = worker_id
        row.lease_expires_at = now + timedelta(seconds=lease_s)
        session.add(WebhookAttempt(delivery_id=row.id, number=row.attempts, started_at=now))
        record = keys.get(row.owner_id)
        claimed.append(
            Claimed(
                id=row.id,
                url=endpoint.url,
                body=row.body,
                attempt=row.attempts,
                secrets=tuple(secrets_in_force(record, now)) if record else (),
            )
        )
    await session.commit()
    return claimed


def retry_delay(attempt: int, settings: Settings, rng: random.Random) -> float:
    """Exponential backoff with jitter: ``base * 2**(attempt-1)``, capped, times 0.5..1."""
    ceiling = min(settings.webhook_retry_max_s, settings.webhook_retry_base_s * 2 ** (attempt - 1))
    return ceiling * (0.5 + 0.5 * rng.random())


async def record_attempt(
    *,
    session: AsyncSession,
    settings: Settings,
    delivery_id: str,
    worker_id: str,
    attempt: int,
    outcome: Outcome,
    now: datetime,
    rng: random.Random,
) -> str | None:
    """Record an attempt's outcome, schedule the retry or end the delivery, and keep the
    endpoint's health; the delivery's new status, or ``None`` if this dispatcher no longer held
    it (the attempt row is filled in all the same)."""
    try:
        return await _record_one(
            session=session,
            settings=settings,
            delivery_id=delivery_id,
            worker_id=worker_id,
            attempt=attempt,
            outcome=outcome,
            now=now,
            rng=rng,
        )
    finally:
        await session.commit()


async def record_attempts(
    *,
    session: AsyncSession,
    settings: Settings,
    worker_id: str,
    attempts: Sequence[tuple[Claimed, Outcome]],
    now: datetime,
    rng: random.Random,
) -> list[str | None]:
    """:func:`record_attempt` for many attempts in one transaction: a dispatcher records what its
    concurrent attempts came to together. Successes take three statements whatever their number
    (attempt rows, deliveries, endpoints); failures go one by one (they touch endpoint health)."""
    try:
        statuses: dict[int, str | None] = {}
        delivered = [(i, c, o) for i, (c, o) in enumerate(attempts) if o.ok]
        if delivered:
            await session.execute(
                update(WebhookAttempt),
                [
                    {
                        "delivery_id": c.id,
                        "number": c.attempt,
                        "outcome": o.outcome,
                        "status_code": o.status_code,
                        "error": o.error,
                        "address": o.address,
                        "response_excerpt": o.excerpt,
                        "duration_ms": o.duration_ms,
                    }
                    for _, c, o in delivered
                ],
            )
            ours = (
                await session.execute(
                    update(WebhookDelivery)
                    .where(
                        tuple_(WebhookDelivery.id, WebhookDelivery.attempts).in_(
                            [(c.id, c.attempt) for _, c, _ in delivered]
                        ),
                        WebhookDelivery.lease_owner == worker_id,
                    )
                    .values(
                        status="delivered",
                        finished_at=now,
                        last_error=None,
                        lease_owner=None,
                        lease_expires_at=None,
                    )
                    .returning(WebhookDelivery.id, WebhookDelivery.endpoint_id)
                    .execution_options(synchronize_session=False)
                )
            ).all()
            recorded = {row.id for row in ours}
            if ours:
                await _reset_endpoints(session, {row.endpoint_id for row in ours}, now)
            for i, c, _ in delivered:
                statuses[i] = "delivered" if c.id in recorded else None
        for i, (claimed, outcome) in enumerate(attempts):
            if not outcome.ok:
                statuses[i] = await _record_one(
                    session=session,
                    settings=settings,
                    delivery_id=claimed.id,
                    worker_id=worker_id,
                    attempt=claimed.attempt,
                    outcome=outcome,
                    now=now,
                    rng=rng,
                )
        return [statuses[i] for i in range(len(attempts))]
    finally:
        await session.commit()


async def _reset_endpoints(session: AsyncSession, endpoint_ids: set[str], now: datetime) -> None:
    """After successes: failure counts back to 0. The rows are touched only when there is
    something to reset (or a last success a minute old to refresh), so that concurrent deliveries
    to one endpoint do not queue on its row."""
    await session.execute(
        update(WebhookEndpoint)
        .where(
            WebhookEndpoint.id.in_(endpoint_ids),
            or_(
                WebhookEndpoint.consecutive_failures != 0,
                WebhookEndpoint.consecutive_gone != 0,
                WebhookEndpoint.last_success_at.is_(None),
                WebhookEndpoint.last_success_at < now - timedelta(seconds=60),
            ),
        )
        .values(consecutive_failures=0, consecutive_gone=0, last_success_at=now)
        .execution_options(synchronize_session=False)
    )


async def _record_one(
    *,
    session: AsyncSession,
    settings: Settings,
    delivery_id: str,
    worker_id: str,
    attempt: int,
    outcome: Outcome,
    now: datetime,
    rng: random.Random,
) -> str | None:
    """:func:`record_attempt`, left uncommitted."""
    await session.execute(
        update(WebhookAttempt)
        .where(WebhookAttempt.delivery_id == delivery_id, WebhookAttempt.number == attempt)
        .values(
            outcome=outcome.outcome,
            status_code=outcome.status_code,
            error=outcome.error,
            address=outcome.address,
            response_excerpt=outcome.excerpt,
            duration_ms=outcome.duration_ms,
        )
    )
    ours = (
        WebhookDelivery.id == delivery_id,
        WebhookDelivery.lease_owner == worker_id,
        WebhookDelivery.attempts == attempt,
    )
    released = {"lease_owner": None, "lease_expires_at": None}
    if outcome.ok:
        endpoint_id = await session.scalar(
            update(WebhookDelivery)
            .where(*ours)
            .values(status="delivered", finished_at=now, last_error=None, **released)
            .returning(WebhookDelivery.endpoint_id)
        )
        if endpoint_id is not None:
            await _reset_endpoints(session, {endpoint_id}, now)
        return None if endpoint_id is None else "delivered"

    final = outcome.final or attempt >= settings.webhook_max_attempts
    values: dict[str, Any] = {"last_error": outcome.summary(), **released}
    if final:
        values.update(status="failed", finished_at=now)
    else:
        values["next_attempt_at"] = now + timedelta(seconds=retry_delay(attempt, settings, rng))
    endpoint_id = await session.scalar(
        update(WebhookDelivery).where(*ours).values(**values).returning(WebhookDelivery.endpoint_id)
    )
    if endpoint_id is None:  # no longer ours: another dispatcher took it over
        return None
    status = "failed" if final else "pending"
    gone = outcome.outcome == "gone"
    counts = (
        await session.execute(
            update(WebhookEndpoint)
            .where(WebhookEndpoint.id == endpoint_id)
            .values(
                consecutive_failures=WebhookEndpoint.consecutive_failures + 1,
                consecutive_gone=(WebhookEndpoint.consecutive_gone + 1) if gone else 0,
            )
            .returning(
                WebhookEndpoint.consecutive_failures,
                WebhookEndpoint.consecutive_gone,
                WebhookEndpoint.disabled_at,
                WebhookEndpoint.disabled_reason,
            )
        )
    ).one()
    reason = counts.disabled_reason if counts.disabled_at is not None else None
    if reason is None and counts.consecutive_gone >= settings.webhook_disable_after_gone:
        reason = f"answered 410 Gone {counts.consecutive_gone} times in a row"
        await _disable(session, endpoint_id=endpoint_id, reason=reason, now=now)
    elif reason is None and counts.consecutive_failures >= settings.webhook_disable_after_failures:
        reason = f"{counts.consecutive_failures} failed attempts in a row (last: {outcome.summary()})"
        await _disable(session, endpoint_id=endpoint_id, reason=reason, now=now)
    if reason is not None and status == "pending":  # disabled, now or by another attempt
        await session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending")
            .values(status="skipped", finished_at=now, last_error=f"endpoint disabled: {reason}")
        )
        status = "skipped"
    return status


async def _disable(session: AsyncSession, *, endpoint_id: str, reason: str, now: datetime) -> None:
    result = await session.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.disabled_at.is_(None))
        .values(disabled_at=now, disabled_reason=reason)
    )
    if result.rowcount:
        log.warning("webhook endpoint %s disabled: %s", endpoint_id, reason)
    await session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.endpoint_id == endpoint_id,
            WebhookDelivery.status == "pending",
            WebhookDelivery.lease_owner.is_(None),
        )
        .values(status="skipped", finished_at=now, last_error=f"endpoint disabled: {reason}")
        .execution_options(synchronize_session=False)
    )


async def release(
    *, session: AsyncSession, delivery_id: str, worker_id: str, attempt: int, now: datetime
) -> None:
    """Shutdown in the middle of an attempt: hand the delivery back, due now (it may have
    arrived: the receiver deduplicates on the webhook-id)."""
    await session.execute(
        update(WebhookAttempt)
        .where(WebhookAttempt.delivery_id == delivery_id, WebhookAttempt.number == attempt)
        .values(outcome="interrupted", error="the dispatcher stopped during the attempt")
    )
    await session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.lease_owner == worker_id)
        .values(lease_owner=None, lease_expires_at=None, next_attempt_at=now)
    )
    await session.commit()


async def purge_finished(*, session: AsyncSession, before: datetime, batch: int = 1000) -> int:
    """Delete deliveries that ended before ``before`` (their attempts go with them)."""
    total = 0
    while True:
        doomed = (
            select(WebhookDelivery.id)
            .where(WebhookDelivery.status != "pending", WebhookDelivery.finished_at < before)
            .limit(batch)
        )
        result = await session.execute(
            delete(WebhookDelivery)
            .where(WebhookDelivery.id.in_(doomed))
            .execution_options(synchronize_session=False)
        )
        await session.commit()
        total += result.rowcount or 0
        if (result.rowcount or 0) < batch:
            return total


# --------------------------------------------------------------------------- the dispatcher


class Dispatcher:
    """Claims due deliveries and attempts them, up to ``webhook_concurrency`` at once.

    ``clock`` decides what is due and when to retry (tests advance it: no sleeping);
    ``resolver`` is the DNS lookup (tests inject a stub); ``rng`` draws the jitter.
    """

    def __init__(
        self,
        services: Any,
        *,
        name: str | None = None,
        clock: Clock = utcnow,
        resolver: Resolver = system_resolver,
        rng: random.Random | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.services = services
        self.settings: Settings = services.settings
        self.id = name or f"webhooks:{socket.gethostname()[-40:]}:{id(self):x}"[:64]
        self.clock = clock
        self.resolver = resolver
        self.rng = rng or random.Random()
        self.ssl_context = ssl_context
        self._wakeup = asyncio.Event()

    async def _db(self, operation: Callable[..., Awaitable[Any]], /, **kwargs: Any) -> Any:
        from sfumato.control_plane.worker import run_to_completion

        async def run() -> Any:
            async with self.services.sessions() as session:
                return await operation(session=session, **kwargs)

        return await run_to_completion(run())

    async def claim(self, limit: int) -> list[Claimed]:
        return await self._db(
            claim_due,
            worker_id=self.id,
            now=self.clock(),
            lease_s=self.settings.webhook_lease_s,
            limit=limit,
            per_endpoint=self.settings.webhook_max_in_flight_per_endpoint,
        )

    async def send_claimed(self, claimed: Claimed) -> Outcome:
        """Send one claimed delivery (signed now, with the secrets in force at its claim). If
        cancelled meanwhile, the delivery is handed back, due at once."""
        timestamp = int(time.time())
        headers = {
            "webhook-id": claimed.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature_header(
                secrets=claimed.secrets, msg_id=claimed.id, timestamp=timestamp, body=claimed.body
            ),
        }
        try:
            return await send(
                url=claimed.url,
                body=claimed.body,
                headers=headers,
                settings=self.settings,
                resolver=self.resolver,
                ssl_context=self.ssl_context,
            )
        except asyncio.CancelledError:
            await self._db(
                release, delivery_id=claimed.id, worker_id=self.id, attempt=claimed.attempt, now=self.clock()
            )
            raise

    async def record(self, results: Sequence[tuple[Claimed, Outcome]]) -> list[str | None]:
        """Record what attempts came to, all in one transaction; their deliveries' new statuses."""
        statuses = await self._db(
            record_attempts,
            settings=self.settings,
            worker_id=self.id,
            attempts=results,
            now=self.clock(),
            rng=self.rng,
        )
        for claimed, outcome in results:
            level = logging.INFO if outcome.ok else logging.WARNING
            log.log(level, "webhook %s attempt %d: %s", claimed.id, claimed.attempt, outcome.summary())
        return statuses

    async def attempt(self, claimed: Claimed) -> str | None:
        """Send one claimed delivery and record what came of it; the delivery's new status."""
        outcome = await self.send_claimed(claimed)
        return (await self.record([(claimed, outcome)]))[0]

    async def deliver_due(self) -> dict[str, str | None]:
        """One round: claim what is due, send it all, record it; ``{delivery id: new status}``."""
        claimed = await self.claim(self.settings.webhook_concurrency)
        if not claimed:
            return {}
        outcomes = await asyncio.gather(*(self.send_claimed(c) for c in claimed))
        statuses = await self.record(list(zip(claimed, outcomes, strict=True)))
        return {c.id: status for c, status in zip(claimed, statuses, strict=True)}

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set (or cancelled): claim into free slots, send concurrently,
        and record outcomes in batches (one transaction for all that finished meanwhile). On the
        way out, sends in flight are handed back and what was sent is recorded."""
        in_flight: set[asyncio.Task] = set()
        outcomes: asyncio.Queue[tuple[Claimed, Outcome] | None] = asyncio.Queue()
        recorder = asyncio.create_task(self._recorder(outcomes), name=f"{self.id} recorder")
        relay = asyncio.create_task(self._wake_on(stop))
        try:
            while not stop.is_set():
                free = self.settings.webhook_concurrency - len(in_flight)
                claimed: list[Claimed] = []
                if free > 0:
                    try:
                        claimed = await self.claim(free)
                    except Exception:
                        log.exception("claiming webhook deliveries failed; retrying")
                for item in claimed:
                    task = asyncio.create_task(self._send_into(item, outcomes), name=f"webhook {item.id}")
                    in_flight.add(task)
                    task.add_done_callback(self._finished(in_flight))
                if len(claimed) < free or free <= 0:
                    await self._wait(self.settings.webhook_poll_s)
        finally:
            relay.cancel()
            for task in in_flight:
                task.cancel()
            await asyncio.wait([relay, *in_flight])
            outcomes.put_nowait(None)  # the recorder records what is queued, then ends
            await recorder

    async def _send_into(self, claimed: Claimed, outcomes: asyncio.Queue) -> None:
        try:
            outcome = await self.send_claimed(claimed)
        except Exception:  # a bug: logged; the delivery is sent again once its lease expires
            log.exception("webhook %s: sending failed unexpectedly; sent again after its lease", claimed.id)
            return
        outcomes.put_nowait((claimed, outcome))

    async def _recorder(self, outcomes: asyncio.Queue) -> None:
        while True:
            first = await outcomes.get()
            batch = [] if first is None else [first]
            last = first is None
            while not outcomes.empty():
                item = outcomes.get_nowait()
                if item is None:
                    last = True
                else:
                    batch.append(item)
            if batch:
                try:
                    await self.record(batch)
                except Exception:
                    log.exception(
                        "recording %d webhook attempts failed; they are sent again after their leases",
                        len(batch),
                    )
            if last:
                return

    def _finished(self, in_flight: set[asyncio.Task]) -> Callable[[asyncio.Task], None]:
        def done(task: asyncio.Task) -> None:
            in_flight.discard(task)
            self._wakeup.set()

        return done

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wakeup.set()

    async def _wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wakeup.wait()
        self._wakeup.clear()


async def run_dispatcher(services: Any, *, stop: asyncio.Event) -> None:
    """The workers' webhook task (``run_workers``): a :class:`Dispatcher` until ``stop``."""
    await Dispatcher(services).run(stop)


# --------------------------------------------------------------------------- reads for the API


@dataclass(frozen=True, slots=True)
class DeliveryPage:
    items: list[WebhookDelivery]
    next_cursor: str | None


async def list_deliveries(
    *,
    session: AsyncSession,
    principal: Principal,
    limit: int,
    cursor: str | None = None,
    job_id: str | None = None,
    status: str | None = None,
) -> DeliveryPage:
    """The caller's deliveries with their attempts, newest first (keyset on created_at, id)."""
    query = select(WebhookDelivery).where(WebhookDelivery.owner_id == principal.user_id)
    if job_id is not None:
        query = query.where(WebhookDelivery.job_id == job_id)
    if status is not None:
        query = query.where(WebhookDelivery.status == status)
    if cursor is not None:
        after = pagination.decode_cursor(cursor)
        query = query.where(
            or_(
                WebhookDelivery.created_at < after.created_at,
                and_(WebhookDelivery.created_at == after.created_at, WebhookDelivery.id < after.id),
            )
        )
    query = query.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc()).limit(limit + 1)
    try:
        rows = list((await session.scalars(query)).unique().all())
    finally:
        await session.commit()
    more = len(rows) > limit
    items = rows[:limit]
    last = items[-1] if more and items else None
    return DeliveryPage(
        items=items, next_cursor=pagination.encode_cursor(last.created_at, last.id) if last else None
    )


async def read_delivery(*, session: AsyncSession, principal: Principal, delivery_id: str) -> WebhookDelivery:
    try:
        delivery = await session.get(WebhookDelivery, delivery_id)
    finally:
        await session.commit()
    if delivery is None or delivery.owner_id != principal.user_id:
        raise NotFoundError(f"no webhook delivery {delivery_id}")
    return delivery


async def list_endpoints(*, session: AsyncSession, principal: Principal) -> list[WebhookEndpoint]:
    try:
        rows = await session.scalars(
            select(WebhookEndpoint)
            .where(WebhookEndpoint.owner_id == principal.user_id)
            .order_by(WebhookEndpoint.created_at.desc(), WebhookEndpoint.id)
            .limit(1000)
        )
        return list(rows.all())
    finally:
        await session.commit()


async def enable_endpoint(
    *, session: AsyncSession, principal: Principal, endpoint_id: str
) -> WebhookEndpoint:
    """Enable a disabled endpoint again (failure counts reset). Skipped deliveries stay skipped."""
    endpoint = await session.get(WebhookEndpoint, endpoint_id, populate_existing=True)
    if endpoint is None or endpoint.owner_id != principal.user_id:
        await session.rollback()
        raise NotFoundError(f"no webhook endpoint {endpoint_id}")
    endpoint.disabled_at = None
    endpoint.disabled_reason = None
    endpoint.consecutive_failures = 0
    endpoint.consecutive_gone = 0
    await session.commit()
    return endpoint
