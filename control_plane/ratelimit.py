"""Per-principal rate limits with the ``limits`` library: in memory by default, Redis when
``SFUMATO_REDIS_URL`` is set (shared by every replica)."""

from __future__ import annotations

import math
import time

from limits import parse
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

from sfumato.errors import RateLimitedError


class RateLimiter:
    def __init__(self, redis_url: str | None) -> None:
        uri = redis_url.replace("redis://", "async+redis://", 1) if redis_url else "async+memory://"
        self._storage = storage_from_string(uri)
        self._limiter = MovingWindowRateLimiter(self._storage)

    async def hit(self, limit: str, *, scope: str, principal: str) -> None:
        """Count one request; raise :class:`RateLimitedError` with ``retry_after`` when over."""
        item = parse(limit)
        if await self._limiter.hit(item, scope, principal):
            return
        stats = await self._limiter.get_window_stats(item, scope, principal)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        raise RateLimitedError(f"rate limit {limit} exceeded for {scope}", retry_after=retry_after)

    async def close(self) -> None:
        reset = getattr(self._storage, "close", None)
        if reset is not None:
            result = reset()
            if hasattr(result, "__await__"):
                await result
