"""Rate limits with the ``limits`` library (moving windows): in memory by default, Redis when
``SFUMATO_REDIS_URL`` is set (shared by every replica).

The policies, each a ``SFUMATO_*`` setting in ``limits`` syntax and named as in the headers and
in ``sfumato_rejections_total{limit}``:

| policy | counted per | charged by |
| --- | --- | --- |
| ``requests`` | principal | every authenticated request but job reads |
| ``job_reads`` | principal | reading one job: ``GET`` of a generation, its images, its events |
| ``submit`` | principal | ``POST /v1/generations`` |
| ``login`` | user name and client address | ``POST /v1/auth/token`` |
| ``login_address`` | client address | ``POST /v1/auth/token`` |
| ``auth_failures`` | client address | each 401; once spent, 429 before any authentication |

Every response of a route that charged a policy carries the IETF fields of
draft-ietf-httpapi-ratelimit-headers-11, 429s included: ``RateLimit-Policy: "requests";q=120;w=60``
(the quota and its window in seconds) and ``RateLimit: "requests";r=117;t=42`` (what is left,
and the seconds until the oldest use in the window expires). The policies a request charged are
collected in a context variable that the app's middleware opens per request
(:func:`track`) and turns into headers (:func:`header_fields`).
"""

from __future__ import annotations

import math
import time
from contextvars import ContextVar, Token
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

from sfumato.control_plane.settings import Settings
from sfumato.errors import RateLimitedError

# Route templates whose GET is a job read (the routes of job events may arrive later).
JOB_READ_ROUTES = frozenset(
    {
        "/v1/generations/{job_id}",
        "/v1/generations/{job_id}/images/{index}",
        "/v1/generations/{job_id}/events",
        "/v1/generations/{job_id}/ws",
    }
)


@dataclass(frozen=True, slots=True)
class Usage:
    """One policy as it stands after a request charged it."""

    policy: str
    quota: int
    window_s: int
    remaining: int
    reset_s: int


_charged: ContextVar[list[Usage] | None] = ContextVar("sfumato_rate_limits_charged", default=None)


def track() -> tuple[list[Usage], Token]:
    """Start collecting the policies this request charges (the middleware calls it)."""
    usages: list[Usage] = []
    return usages, _charged.set(usages)


def untrack(token: Token) -> None:
    _charged.reset(token)


def header_fields(usages: list[Usage]) -> list[tuple[bytes, bytes]]:
    """``RateLimit-Policy`` and ``RateLimit`` (structured-field lists) for the charged policies."""
    if not usages:
        return []
    latest = {u.policy: u for u in usages}.values()  # a policy charged twice: its last state
    policy = ", ".join(f'"{u.policy}";q={u.quota};w={u.window_s}' for u in latest)
    state = ", ".join(f'"{u.policy}";r={u.remaining};t={u.reset_s}' for u in latest)
    return [(b"ratelimit-policy", policy.encode()), (b"ratelimit", state.encode())]


def request_budget(settings: Settings, *, method: str, route: str) -> tuple[str, str]:
    """``(policy, limit)`` that an authenticated request to ``route`` (a template) charges."""
    if method in ("GET", "HEAD") and route in JOB_READ_ROUTES:
        return "job_reads", settings.job_read_rate_limit
    return "requests", settings.rate_limit


class RateLimiter:
    def __init__(self, redis_url: str | None) -> None:
        uri = redis_url.replace("redis://", "async+redis://", 1) if redis_url else "async+memory://"
        self._storage = storage_from_string(uri)
        self._limiter = MovingWindowRateLimiter(self._storage)

    async def hit(self, limit: str, *, scope: str, principal: str) -> None:
        """Charge one use of policy ``scope`` for ``principal``; :class:`RateLimitedError` (with
        ``retry_after``) when the quota is spent."""
        item = parse(limit)
        allowed = await self._limiter.hit(item, scope, principal)
        usage = await self._usage(item, scope, principal)
        if not allowed:
            raise self._exceeded(limit, usage)

    async def check(self, limit: str, *, scope: str, principal: str) -> None:
        """:class:`RateLimitedError` when the quota is already spent; charges nothing."""
        item = parse(limit)
        if await self._limiter.test(item, scope, principal):
            return
        raise self._exceeded(limit, await self._usage(item, scope, principal))

    async def count(self, limit: str, *, scope: str, principal: str) -> None:
        """Charge one use without refusing this request (a failure, counted after the fact)."""
        item = parse(limit)
        await self._limiter.hit(item, scope, principal)
        await self._usage(item, scope, principal)

    async def _usage(self, item: RateLimitItem, scope: str, principal: str) -> Usage:
        stats = await self._limiter.get_window_stats(item, scope, principal)
        usage = Usage(
            policy=scope,
            quota=item.amount,
            window_s=item.get_expiry(),
            remaining=max(0, stats.remaining),
            reset_s=max(0, math.ceil(stats.reset_time - time.time())),
        )
        charged = _charged.get()
        if charged is not None:
            charged.append(usage)
        return usage

    @staticmethod
    def _exceeded(limit: str, usage: Usage) -> RateLimitedError:
        return RateLimitedError(
            f"rate limit {limit} exceeded for {usage.policy}",
            retry_after=max(1, usage.reset_s),
            limit=usage.policy,
        )

    async def close(self) -> None:
        reset = getattr(self._storage, "close", None)
        if reset is not None:
            result = reset()
            if hasattr(result, "__await__"):
                await result
