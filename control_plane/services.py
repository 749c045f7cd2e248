"""The service's long-lived resources, built once per app (no import-time singletons)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from sfumato.control_plane.db import create_engine, session_factory
from sfumato.control_plane.edge_calls import InFlightCalls
from sfumato.control_plane.key_usage import KeyUsage
from sfumato.control_plane.metrics import Metrics
from sfumato.control_plane.ratelimit import RateLimiter
from sfumato.control_plane.settings import Settings
from sfumato.control_plane.storage import ObjectStore, open_store


@dataclass
class Services:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]  # writing transactions
    read_sessions: async_sessionmaker[AsyncSession]  # read-only: never take SQLite's writer lock
    store: ObjectStore  # images, inputs, data sets, weights (local directory or S3)
    limiter: RateLimiter
    signing_key: str  # resolved once at start: the setting, or this installation's generated key
    metrics: Metrics = field(default_factory=Metrics)
    edge_calls: InFlightCalls = field(default_factory=InFlightCalls)  # gRPC calls through the edge
    key_usage: KeyUsage = field(default_factory=KeyUsage)  # API keys' last use, written in batches

    @classmethod
    def build(cls, settings: Settings, *, metrics: Metrics | None = None) -> Services:
        engine = create_engine(settings.resolved_database_url)
        return cls(
            metrics=metrics or Metrics(),
            settings=settings,
            signing_key=settings.signing_key(),
            engine=engine,
            sessions=session_factory(engine),
            read_sessions=session_factory(engine, read_only=True),
            store=open_store(settings),
            limiter=RateLimiter(settings.redis_url),
        )

    async def close(self) -> None:
        await self.engine.dispose()
        await self.limiter.close()
