"""The service's long-lived resources, built once per app (no import-time singletons)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from sfumato.control_plane.db import create_engine, session_factory
from sfumato.control_plane.edge_calls import InFlightCalls
from sfumato.control_plane.events import EventHub
from sfumato.control_plane.key_usage import KeyUsage
from sfumato.control_plane.metrics import Metrics
from sfumato.control_plane.ratelimit import RateLimiter
from sfumato.control_plane.recommender.snapshot import RecommenderCache
from sfumato.control_plane.settings import Settings
from sfumato.control_plane.storage import ObjectStore, open_store
from sfumato.control_plane.triton_gateway import TritonGateway


@dataclass
class Services:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]  # writing transactions
    read_sessions: async_sessionmaker[AsyncSession]  # read-only: never take SQLite's writer lock
    store: ObjectStore  # images, inputs, data sets, weights (local directory or S3)
    limiter: RateLimiter
    signing_key: str  # resolved once at start: the setting, or this installation's generated key
    triton: TritonGateway  # every Triton call of the control plane goes through it
    metrics: Metrics = field(default_factory=Metrics)
    edge_calls: InFlightCalls = field(default_factory=InFlightCalls)  # gRPC calls through the edge
    key_usage: KeyUsage = field(default_factory=KeyUsage)  # API keys' last use, written in batches
    events: EventHub | None = None  # the job-event channel (made by build; started by start)
    recommender: RecommenderCache = field(default_factory=RecommenderCache)  # the fitted recommender

    @classmethod
    def build(cls, settings: Settings, *, metrics: Metrics | None = None) -> Services:
        engine = create_engine(settings.resolved_database_url)
        metrics = metrics or Metrics()
        services = cls(
            settings=settings,
            signing_key=settings.signing_key(),
            engine=engine,
            sessions=session_factory(engine),
            read_sessions=session_factory(engine, read_only=True),
            store=open_store(settings),
            limiter=RateLimiter(settings.redis_url),
            triton=TritonGateway(settings, metrics),
            metrics=metrics,
        )
        services.events = EventHub(
            engine=engine,
            read_sessions=services.read_sessions,
            redis_url=settings.redis_url,
            poll_s=settings.event_poll_s,
            resync_s=settings.event_resync_s,
        )
        services.events.attach(services.sessions, services.read_sessions)
        return services

    async def start(self) -> None:
        """Start what runs in the background (the job-event hub's listener); idempotent."""
        if self.events is not None and not self.events.started:
            await self.events.start()

    async def close(self) -> None:
        if self.events is not None:
            await self.events.close()
        await self.triton.close()
        await self.engine.dispose()
        await self.limiter.close()
