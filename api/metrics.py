"""Prometheus metrics: job counts and phase durations read from the database, HTTP latency.

Job metrics come from the database at scrape time (it owns job state), so every API replica
reports the same, correct numbers and nothing is lost when a process restarts.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Iterable
from datetime import datetime, timedelta

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hawada.lifecycle import JOB_STATES, TERMINAL_STATES
from hawada.store.db import session_scope
from hawada.store.jobs import count_by_status
from hawada.store.models import Job, JobEvent

PHASE_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Label values come from fixed sets so no client can grow the series count: any other method
# is "other", any path outside the routes is "unmatched".
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class JobsCollector(Collector):
    """`hawada_jobs{state}`: how many jobs are in each state right now."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url

    def collect(self) -> Iterable[Metric]:
        with session_scope(self._url) as session:
            counts = count_by_status(session)
        gauge = GaugeMetricFamily("hawada_jobs", "Jobs by state", labels=["state"])
        for state in JOB_STATES:
            gauge.add_metric([state], counts.get(state, 0))
        yield gauge


class PhaseDurationCollector(Collector):
    """`hawada_phase_duration_seconds{phase}`: how long each phase of finished jobs took.

    A phase lasts from its `phase` event to the next one (the last to `finished_at`). Finished
    jobs never change, so each scrape reads only jobs finished since the previous one; a slack
    window re-reads the last minute so a job committed late (slow worker, clock skew) still
    counts, and the ids seen in that window keep it from counting twice.
    """

    SLACK = timedelta(seconds=120)

    def __init__(self, database_url: str, chunk: int = 500) -> None:
        self._url = database_url
        self._chunk = chunk
        self._lock = threading.Lock()
        self._watermark: datetime | None = None
        self._recent: dict[str, datetime] = {}  # ids counted with finished_at in the window
        self._buckets: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}

    def _observe(self, phase: str, seconds: float) -> None:
        counts = self._buckets.setdefault(phase, [0] * (len(PHASE_BUCKETS) + 1))
        counts[bisect_left(PHASE_BUCKETS, seconds)] += 1
        self._sums[phase] = self._sums.get(phase, 0.0) + seconds

    def _catch_up(self) -> None:
        with session_scope(self._url) as session:
            query = select(Job.id, Job.finished_at).where(
                Job.status.in_(TERMINAL_STATES), Job.finished_at.is_not(None)
            )
            if self._watermark is not None:
                query = query.where(Job.finished_at >= self._watermark - self.SLACK)
            finished = {
                r.id: r.finished_at for r in session.execute(query) if r.id not in self._recent
            }
            ids = list(finished)
            for i in range(0, len(ids), self._chunk):
                self._count_phases(session, {k: finished[k] for k in ids[i : i + self._chunk]})
        if finished:
            newest = max(finished.values())
            self._watermark = max(self._watermark or newest, newest)
            self._recent.update(finished)
        if self._watermark is not None:
            horizon = self._watermark - self.SLACK
            self._recent = {k: v for k, v in self._recent.items() if v >= horizon}

    def _count_phases(self, session: Session, finished: dict[str, datetime]) -> None:
        events = session.execute(
            select(JobEvent.job_id, JobEvent.created_at, JobEvent.data)
            .where(JobEvent.job_id.in_(list(finished)), JobEvent.kind == "phase")
            .order_by(JobEvent.job_id, JobEvent.seq)
        )
        spans: dict[str, list[tuple[str, datetime]]] = {}
        for job_id, created_at, data in events:
            phase = data.get("phase") if isinstance(data, dict) else None
            if phase:
                spans.setdefault(job_id, []).append((str(phase), created_at))
        for job_id, phases in spans.items():
            ends = [start for _, start in phases[1:]] + [finished[job_id]]
            for (phase, start), end in zip(phases, ends, strict=True):
                self._observe(phase, max(0.0, (end - start).total_seconds()))

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            self._catch_up()
            family = HistogramMetricFamily(
                "hawada_phase_duration_seconds", "Duration of job phases", labels=["phase"]
            )
            for phase, counts in sorted(self._buckets.items()):
                cumulative, running = [], 0
                for bound, count in zip((*map(str, PHASE_BUCKETS), "+Inf"), counts, strict=True):
                    running += count
                    cumulative.append((bound, running))
                family.add_metric([phase], cumulative, self._sums[phase])
        yield family


class HttpMetricsMiddleware:
    """Observes request duration by method, route template (not raw path) and status."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            self.histogram.labels(method, template, str(status)).observe(
                time.perf_counter() - start
            )


class _RegistryCollector(Collector):
    """Everything another registry collects (the public metrics inside the operator's view)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        return self._registry.collect()


def make_registry(database_url: str) -> tuple[CollectorRegistry, CollectorRegistry, Histogram]:
    """(operator registry, public registry, HTTP histogram), one set per app.

    The public registry holds only this process's HTTP metrics; the operator registry adds the
    job counts and phase durations read from the database (data about every tenant's jobs).
    """
    public = CollectorRegistry()
    http = Histogram(
        "hawada_http_request_duration_seconds",
        "HTTP request duration",
        ["method", "route", "status"],
        buckets=HTTP_BUCKETS,
        registry=public,
    )
    registry = CollectorRegistry()
    registry.register(JobsCollector(database_url))
    registry.register(PhaseDurationCollector(database_url))
    registry.register(_RegistryCollector(public))
    return registry, public, http
