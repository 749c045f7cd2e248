"""Prometheus metrics of one app instance (own registry: several apps in one process, as in
tests, never collide), and the scrape-time gauges read from the database.

The alerting rules over these are ``deploy/prometheus/alerts.yaml``.
"""

from __future__ import annotations

from datetime import datetime

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from sfumato.control_plane.models import JOB_STATUSES, Job, utcnow

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# The limits behind sfumato_rejections_total{limit}: the rate-limit policies (see ratelimit.py),
# each user's cap on unfinished jobs, the body and image size caps, and load shedding.
REJECTION_LIMITS = (
    "requests",
    "job_reads",
    "submit",
    "login",
    "login_address",
    "auth_failures",
    "queued_jobs",
    "body_size",
    "image_size",
    "load_shedding",
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Process (CPU, memory, file descriptors, start time), Python platform and GC metrics.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.http_duration = Histogram(
            "sfumato_http_request_duration_seconds",
            "HTTP request duration by route template and status",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.jobs = Gauge("sfumato_jobs", "Generation jobs by status", ["status"], registry=self.registry)
        self.queue_depth = Gauge("sfumato_queue_depth", "Jobs waiting to be claimed", registry=self.registry)
        self.oldest_queued_age = Gauge(
            "sfumato_oldest_queued_job_age_seconds",
            "Seconds since the oldest job still queued was submitted (0 with none queued)",
            registry=self.registry,
        )
        self.rejections = Counter(
            "sfumato_rejections_total",
            "Requests refused by a limit: rate-limit policies, queued-jobs cap, body and image "
            "size, load shedding",
            ["limit"],
            registry=self.registry,
        )
        for limit in REJECTION_LIMITS:
            self.rejections.labels(limit=limit)  # every series exists from the start, at 0
        self.in_flight = Gauge(
            "sfumato_http_requests_in_flight",
            "HTTP requests being handled (those that load shedding counts)",
            registry=self.registry,
        )
        self.jobs_canceled = Counter(
            "sfumato_jobs_canceled_total",
            "Cancellations asked for, by the job's state then: queued (canceled at once) or "
            "running (its worker stops it)",
            ["state"],
            registry=self.registry,
        )
        for state in ("queued", "running"):
            self.jobs_canceled.labels(state=state)
        self.triton_duration = Histogram(
            "sfumato_triton_call_duration_seconds",
            "Latency of pipeline calls to Triton",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.triton_errors = Counter(
            "sfumato_triton_call_errors_total",
            "Failed pipeline calls by gRPC status",
            ["code"],
            registry=self.registry,
        )
        self.workers_busy = Gauge("sfumato_workers_busy", "Workers running a job", registry=self.registry)
        self.jobs_finished = Counter(
            "sfumato_jobs_finished_total",
            "Jobs that reached a final status",
            ["status"],
            registry=self.registry,
        )
        self.triton_restarts = Counter(
            "sfumato_triton_restarts_total",
            "Restarts of tritonserver by `sfumato up`'s supervisor",
            registry=self.registry,
        )
        self.triton_up = Gauge(
            "sfumato_triton_up",
            "1 while the supervised tritonserver is running and was ready, else 0",
            registry=self.registry,
        )
        self.edge_requests = Counter(
            "sfumato_edge_requests_total",
            "gRPC calls the edge asked about, by outcome",
            ["outcome"],
            registry=self.registry,
        )


async def observe_jobs(*, session: AsyncSession, metrics: Metrics, now: datetime | None = None) -> None:
    """Set the job gauges from the database (at scrape time: they follow the table, whichever
    replica or worker changed it): jobs by status, queue depth, the oldest queued job's age."""
    rows = (await session.execute(select(Job.status, func.count()).group_by(Job.status))).all()
    oldest = await session.scalar(select(func.min(Job.created_at)).where(Job.status == "queued"))
    counts = dict.fromkeys(JOB_STATUSES, 0) | {status: n for status, n in rows}
    for status, n in counts.items():
        metrics.jobs.labels(status=status).set(n)
    metrics.queue_depth.set(counts["queued"])
    age = 0.0 if oldest is None else ((now or utcnow()) - oldest).total_seconds()
    metrics.oldest_queued_age.set(max(0.0, age))
