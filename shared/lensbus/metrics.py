"""Metrics every service has, and helpers for the ones each service defines.

Names follow Prometheus conventions: base units, ``_total`` for counters, ``_seconds``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

# Latency buckets from 0.5 ms to 10 s: fine at the low end, where per-stage times live.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.0,
    5.0,
    10.0,
)

BUILD_INFO = Info("lensbus_build", "lensbus version and service")
NATS_CONNECTED = Gauge("lensbus_nats_connected", "1 while connected to NATS")
NATS_RECONNECTS = Counter("lensbus_nats_reconnects_total", "Reconnections to NATS")
NATS_DISCONNECTS = Counter("lensbus_nats_disconnects_total", "Losses of the NATS connection")
NATS_ERRORS = Counter("lensbus_nats_errors_total", "Errors reported by the NATS client", ["kind"])
MESSAGES_REJECTED = Counter(
    "lensbus_messages_rejected_total", "Messages rejected as unreadable or invalid", ["reason"]
)
HEARTBEATS = Counter("lensbus_heartbeats_total", "Heartbeats published")


def latency_histogram(name: str, doc: str, labels: tuple[str, ...] = ()) -> Histogram:
    return Histogram(name, doc, list(labels), buckets=LATENCY_BUCKETS)
