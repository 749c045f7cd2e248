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
# A job can wait out a Triton outage (SFUMATO_MAX_OUTAGE_S, 10 minutes by default).
JOB_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)


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
        # Worker side: recorded where the events happen (worker.py, triton_gateway.py).
        self.job_duration = Histogram(
            "sfumato_job_duration_seconds",
            "Submission to final status, by model and final status",
            ["model", "status"],
            buckets=JOB_BUCKETS,
            registry=self.registry,
        )
        self.job_queue_wait = Histogram(
            "sfumato_job_queue_wait_seconds",
            "Submission (or retry) to the first claim by a worker",
            ["model"],
            buckets=JOB_BUCKETS,
            registry=self.registry,
        )
        self.job_retries = Counter(
            "sfumato_job_retries_total",
            "Attempts that failed transiently and were scheduled again, by gRPC status",
            ["reason"],
            registry=self.registry,
        )
        self.job_reclaims = Counter(
            "sfumato_job_reclaims_total",
            "Jobs claimed again after their worker's lease expired (the worker died or stalled)",
            registry=self.registry,
        )
        self.job_requeues = Counter(
            "sfumato_job_requeues_total",
            "Jobs handed back without spending an attempt: outage (Triton unavailable), shutdown",
            ["reason"],
            registry=self.registry,
        )
        self.jobs_in_flight = Gauge(
            "sfumato_jobs_in_flight", "Jobs this process's workers hold", registry=self.registry
        )
        self.worker_capacity = Gauge(
            "sfumato_worker_capacity",
            "Jobs this process's workers may hold at once (the pipeline's instance count, or set)",
            registry=self.registry,
        )
        self.pipeline_failures = Counter(
            "sfumato_pipeline_failures_total",
            "Failed pipeline calls by gRPC status, counted by the control plane",
            ["code"],
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
