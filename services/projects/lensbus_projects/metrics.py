"""Projects-service metrics (served on the service's /metrics). Labels stay low-cardinality:
project, state, reason, outcome; a project's own metrics add their name (the project's
author chose a handful of names, not one per camera or value)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lensbus.metrics import latency_histogram
from lensbus.projects.control import MetricSample

HANDLED = Counter(
    "lensbus_project_results_handled_total",
    "Results a project's handler returned from",
    ["project"],
)
HANDLER_ERRORS = Counter(
    "lensbus_project_handler_errors_total", "Handler calls that raised", ["project"]
)
DROPPED = Counter(
    "lensbus_project_results_dropped_total",
    "Results dropped from a project's mailbox: its handler was behind",
    ["project"],
)
RESTARTS = Counter(
    "lensbus_project_restarts_total",
    "Project processes killed or lost and started again (reason: hang, silent, exit, memory)",
    ["project", "reason"],
)
STATE = Gauge(
    "lensbus_project_state",
    "1 for the state each project is in (starting, running, failed, stopped)",
    ["project", "state"],
)
STARTS = Counter(
    "lensbus_project_starts_total",
    "Project versions started (outcome: ready, failed) and swaps done (swapped)",
    ["project", "outcome"],
)
START_SECONDS = latency_histogram(
    "lensbus_project_start_seconds", "From spawning a project's process to its ready", ("project",)
)
SWAP_GAP_SECONDS = latency_histogram(
    "lensbus_project_swap_seconds",
    "From 'stop' sent to the old version to 'go' sent to the new one",
    ("project",),
)
FETCHES = Counter(
    "lensbus_project_fetches_total",
    "Project versions and models fetched (outcome: ok, missing, unavailable, sha256, unpack)",
    ["outcome"],
)
RECORDS_REJECTED = Counter(
    "lensbus_project_records_rejected_total",
    "Deployment records or control lines refused (reason: invalid_record, bad_line)",
    ["reason"],
)
AUTH = Counter(
    "lensbus_project_auth_total",
    "Auth-callout decisions on project users (outcome: allowed, refused, invalid, error)",
    ["outcome"],
)
REPORTS = Counter(
    "lensbus_project_reports_total", "Project reports written (outcome: ok, failed)", ["outcome"]
)


class ProjectMetrics(Collector):
    """The projects' own metrics (``ctx.counter``, ``ctx.gauge``) as their hosts last beat
    them: counters as ``lensbus_project_counter_total{project,name}``, gauges as
    ``lensbus_project_gauge{project,name}``. A stopped project's samples go with it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # /metrics is served from another thread
        self._samples: dict[str, list[MetricSample]] = {}

    def update(self, project: str, samples: list[MetricSample]) -> None:
        with self._lock:
            self._samples[project] = list(samples)

    def forget(self, project: str) -> None:
        with self._lock:
            self._samples.pop(project, None)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        counters = CounterMetricFamily(
            "lensbus_project_counter",
            "A project's own counters (ctx.counter), as its process last reported them",
            labels=["project", "name"],
        )
        gauges = GaugeMetricFamily(
            "lensbus_project_gauge",
            "A project's own gauges (ctx.gauge), as its process last reported them",
            labels=["project", "name"],
        )
        with self._lock:
            items = [(p, list(s)) for p, s in self._samples.items()]
        for project, samples in items:
            for s in samples:
                family = counters if s.kind == "counter" else gauges
                family.add_metric([project, s.name], float(s.value))
        yield counters
        yield gauges


PROJECT_METRICS = ProjectMetrics()
REGISTRY.register(PROJECT_METRICS)


def set_state(project: str, state: str | None) -> None:
    """The state gauge of ``project``: 1 for ``state``, 0 for the others (None: all 0)."""
    for s in ("starting", "running", "failed", "stopped"):
        STATE.labels(project, s).set(1 if s == state else 0)
