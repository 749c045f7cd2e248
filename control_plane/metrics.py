"""Prometheus metrics of one app instance (own registry: several apps in one process, as in
tests, never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http_duration = Histogram(
            "sfumato_http_request_duration_seconds",
            "HTTP request duration by route template and status",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.jobs = Gauge("sfumato_jobs", "Generation jobs by status", ["status"], registry=self.registry)
        self.queue_depth = Gauge("sfumato_queue_depth", "Jobs waiting to be claimed", registry=self.registry)
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
