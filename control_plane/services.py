"""The service's long-lived resources, built once per app (no import-time singletons)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from sfumato.control_plane.db import create_engine, session_factory
from sfumato.control_plane.edge_calls import InFlightCalls
from sfumato.control_plane.metrics import Metrics
from sfumato.control_plane.ratelimit import RateLimiter
from sfumato.control_plane.settings import Settings
from sfumato.control_plane.storage import ImageStore, LocalImageStore


@dataclass
class Services:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    store: ImageStore
    limiter: RateLimiter
    signing_key: str  # resolved once at start: the setting, or this installation's generated key
    metrics: Metrics = field(default_factory=Metrics)
    edge_calls: InFlightCalls = field(default_factory=InFlightCalls)  # gRPC calls through the edge

    @classmethod
    def build(cls, settings: Settings, *, metrics: Metrics | None = None) -> Services:
        engine = create_engine(settings.resolved_database_url)
        return cls(
            metrics=metrics or Metrics(),
            settings=settings,
            signing_key=settings.signing_key(),
            engine=engine,
            sessions=session_factory(engine),
            store=LocalImageStore(settings.resolved_image_dir),
            limiter=RateLimiter(settings.redis_url),
        )

    async def close(self) -> None:
        await self.engine.dispose()
        await self.limiter.close()
