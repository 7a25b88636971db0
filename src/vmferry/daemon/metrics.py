"""Prometheus metrics of one daemon app: ``GET /metrics`` on every listener.

One :class:`Metrics` per app, with its own registry (never the process-wide
default one), so several daemons in one test process do not share figures.
Counters and histograms are fed as things happen (API calls, job waits,
migration steps through :mod:`vmferry.daemon.observe`); domains and QEMU
processes are counted when scraped. docs/observability.md lists every name.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vmferry.daemon.access import route_template
from vmferry.domain.state import DomainState
from vmferry.jobs import AsyncJob

# Seconds. Steps go from milliseconds (Begin) to minutes (a Perform of a big guest).
PHASE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Downtime: the figure a migration is judged by, fine-grained around 10-500 ms.
DOWNTIME_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10)
WAIT_BUCKETS = (0.0001, 0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60)
API_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

#: Long-lived streams: their duration is how long the client listened, not latency.
STREAMING_ROUTES = frozenset({"/v1/events", "/v1/session"})
#: The label of a path that is no route (never the raw path: a client could invent millions).
OTHER = "other"


class Metrics:
    """The registry of one app and every metric in it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.migrations = Counter(
            "vmferry_migrations",
            "Migrations that ended on this host, by side, mode and result",
            ["side", "mode", "result"],
            registry=r,
        )
        self.phase_seconds = Histogram(
            "vmferry_migration_phase_seconds",
            "Duration of each migration step on this host (begin, prepare, perform, finish, "
            "confirm)",
            ["side", "phase"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.bytes = Counter(
            "vmferry_migration_bytes",
            "Bytes of guest memory moved by completed migrations",
            ["side"],
            registry=r,
        )
        self.downtime = Histogram(
            "vmferry_migration_downtime_seconds",
            "Downtime of completed migrations: QEMU's own (qemu) and source stopped to "
            "destination running (guest)",
            ["side", "kind"],
            buckets=DOWNTIME_BUCKETS,
            registry=r,
        )
        self.job_wait = Histogram(
            "vmferry_job_wait_seconds",
            "How long API calls waited for a domain's job (0 when it was free)",
            ["job"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.api = Histogram(
            "vmferry_api_request_duration_seconds",
            "API latency by method, route template and HTTP status (streams excluded)",
            ["method", "route", "status"],
            buckets=API_BUCKETS,
            registry=r,
        )
        self.domains: Callable[[], Iterator[Any]] | None = None
        r.register(_DomainCollector(self))

    def job_waited(self, job: str, seconds: float) -> None:
        self.job_wait.labels(job).observe(max(0.0, seconds))

    def render(self) -> bytes:
        """The text exposition format (what Prometheus scrapes)."""
        return generate_latest(self.registry)


class _DomainCollector(Collector):
    """Domains by state, QEMU processes and running migrations, counted at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        by_state = GaugeMetricFamily(
            "vmferry_domains", "Domains of this host by state", labels=["state"]
        )
        qemu = GaugeMetricFamily(
            "vmferry_qemu_processes", "QEMU processes this daemon runs (one per active domain)"
        )
        active = GaugeMetricFamily(
            "vmferry_migrations_active", "Migrations in progress on this host", labels=["side"]
        )
        counts = {str(state): 0 for state in DomainState}
        processes = 0
        sides = {"source": 0, "destination": 0}
        for dom in self._metrics.domains() if self._metrics.domains is not None else ():
            counts[str(dom.state)] = counts.get(str(dom.state), 0) + 1
            processes += dom.process is not None
            if dom.job.async_job is AsyncJob.MIGRATION_OUT:
                sides["source"] += 1
            elif dom.job.async_job is AsyncJob.MIGRATION_IN:
                sides["destination"] += 1
        for state, n in sorted(counts.items()):
            by_state.add_metric([state], n)
        qemu.add_metric([], processes)
        for side, n in sides.items():
            active.add_metric([side], n)
        yield by_state
        yield qemu
        yield active

    def describe(self) -> Iterator[Metric]:
        return iter(())


class ApiMetricsMiddleware:
    """Times every HTTP request, labelled by its route template (``/v1/domains/{name}``)."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_template(scope["method"], scope["path"])
        if route in STREAMING_ROUTES:
            await self.app(scope, receive, send)
            return
        # An unknown route's method is the client's invention too.
        method = scope["method"] if route is not None else OTHER
        status = 0

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.api.labels(method, route or OTHER, str(status or 500)).observe(
                time.perf_counter() - started
            )


def add_metrics_route(app: FastAPI, metrics: Metrics) -> None:
    """``GET /metrics``: the figures of *metrics* in Prometheus' text format."""

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics (text format)")
    async def metrics_route() -> Response:
        return Response(content=metrics.render(), media_type=CONTENT_TYPE_LATEST)


def time_requests(app: FastAPI, metrics: Metrics) -> None:
    """Time every request of *app*; call last, so refused requests are timed too."""
    app.add_middleware(ApiMetricsMiddleware, metrics=metrics)
