"""The control protocol between the projects service (the supervisor) and a project's process
(the host, ``python -m lensbus.projects.host``).

One JSON object per line. The supervisor writes to the host's stdin; the host writes to its
original stdout (the host moves ``sys.stdout`` and fd 1 onto stderr before user code runs, so
a ``print`` in a handler goes to the log, never into the protocol). stderr is the log.

host -> supervisor:

    {"t": "ready"}                              on_start returned, subscriptions made; results
                                                are held (not handled) until "go"
    {"t": "beat", "busy_s": 0.12 | null,        every BEAT_S from a thread of its own: how long
     "handled": n, "errors": n, "dropped": n,   the handler call in progress has run (null:
     "last": {"cam1": seq}, "metrics": [...]}   idle), counters, last handled seq per camera,
                                                the project's own metrics (MetricSample)
    {"t": "failed", "reason": "..."}            the start failed (import, on_start raised); exits
    {"t": "stopped", "last": {"cam1": seq}}     after "stop": the last seq handled per camera;
                                                then on_stop runs and the process exits
    {"t": "output", "subject": "...",           only with LENSBUS_PROJECT_ECHO=1 (``lensbus
     "data": "<base64>"}                        project run``): each message the project sent

supervisor -> host:

    {"t": "go", "after": {"cam1": seq} | null}  handle results: of each camera in "after" only
                                                those with a greater seq (a swap's handover), of
                                                the others every one held or arriving
    {"t": "stop"}                               finish the call in hand, handle nothing more,
                                                answer "stopped", run on_stop, exit
    {"t": "cameras", "cameras": [...] | "*"}    the cameras to handle changed (a camera added
                                                to or removed from its groups)

A swap: the new version's host starts beside the old one and answers "ready" (holding every
result since it subscribed); the supervisor sends the old one "stop", takes its "stopped" and
sends the new one "go" with that "last": each result is handled by exactly one of them.

The supervisor kills (SIGKILL) and restarts a host whose beats stop for ``deadline_s`` or whose
``busy_s`` passes ``deadline_s`` (a hung handler); RLIMIT_DATA (``limits.memory_mb``) bounds
its memory.

The host's environment (set by the supervisor, or by ``lensbus project run``):

    LENSBUS_PROJECT_DIR        the unpacked project folder (project.json inside)
    LENSBUS_PROJECT_NATS_URL   server URL(s), comma-separated
    LENSBUS_PROJECT_USER       NATS user (project-<name>), LENSBUS_PROJECT_PASSWORD its password
    LENSBUS_PROJECT_PREFIX     subject prefix
    LENSBUS_PROJECT_CAMERAS    comma list of the cameras to handle, or '*' for every camera
    LENSBUS_PROJECT_INSTANCE   the supervisor's instance id (for logs and metrics)
    LENSBUS_PROJECT_MODELS     a folder of the model packages project.json's `models` names,
                               unpacked, one folder per 'name:version' (`<name>-<version>`):
                               what a DeepLens function's mo.optimize/awscam.Model open
    LENSBUS_PROJECT_ECHO       1: also write each message sent as an "output" line (the
                               development runner prints them; the project's own NATS user
                               may not subscribe to what it sends)
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, Literal

log = logging.getLogger("lensbus.projects.control")

# Seconds between two beats of a host.
BEAT_S = 0.5

ENV_DIR = "LENSBUS_PROJECT_DIR"
ENV_NATS_URL = "LENSBUS_PROJECT_NATS_URL"
ENV_USER = "LENSBUS_PROJECT_USER"
ENV_PASSWORD = "LENSBUS_PROJECT_PASSWORD"
ENV_PREFIX = "LENSBUS_PROJECT_PREFIX"
ENV_CAMERAS = "LENSBUS_PROJECT_CAMERAS"
ENV_INSTANCE = "LENSBUS_PROJECT_INSTANCE"
ENV_MODELS = "LENSBUS_PROJECT_MODELS"
ENV_ECHO = "LENSBUS_PROJECT_ECHO"
# The CA that signed the NATS server's certificate (a tls:// server; empty: the system's).
ENV_TLS_CA = "LENSBUS_PROJECT_TLS_CA"

Last = dict[str, int]


@dataclass
class MetricSample:
    """One of the project's own metrics (``ctx.counter(name).inc()``, ``ctx.gauge(name).set()``)."""

    name: str
    kind: Literal["counter", "gauge"]
    value: float
    help: str = ""


@dataclass
class Beat:
    busy_s: float | None = None
    handled: int = 0
    errors: int = 0
    dropped: int = 0
    last: Last = field(default_factory=dict)
    metrics: list[MetricSample] = field(default_factory=list)
    # Messages the host dropped as unreadable, by reason (result_malformed, frame_invalid...).
    rejected: dict[str, int] = field(default_factory=dict)


def dump(message: dict[str, Any]) -> str:
    """One protocol line (with its newline)."""
    return json.dumps(message, separators=(",", ":")) + "\n"


def write(stream: IO[str], message: dict[str, Any]) -> None:
    stream.write(dump(message))
    stream.flush()


def beat_message(beat: Beat) -> dict[str, Any]:
    return {
        "t": "beat",
        "busy_s": beat.busy_s,
        "handled": beat.handled,
        "errors": beat.errors,
        "dropped": beat.dropped,
        "last": beat.last,
        "metrics": [m.__dict__ for m in beat.metrics],
        "rejected": beat.rejected,
    }


def parse(line: str | bytes) -> dict[str, Any]:
    """One line read back; ValueError for anything that is not a protocol message."""
    message = json.loads(line)
    if not isinstance(message, dict) or not isinstance(message.get("t"), str):
        raise ValueError(f"not a control message: {line!r:.200}")
    return message


# A host's own metrics in one beat, at most (a beat is read from a process we do not trust).
MAX_METRICS = 256


def parse_beat(message: dict[str, Any]) -> Beat:
    """A beat read back, every field checked (ValueError, TypeError): the host runs the
    project's code, which can write to the protocol stream."""
    busy = message.get("busy_s")
    if busy is not None and not _finite(busy):
        raise ValueError(f"busy_s is not a number: {busy!r:.50}")
    metrics = message.get("metrics") or []
    if not isinstance(metrics, list) or len(metrics) > MAX_METRICS:
        raise ValueError("metrics: not a list of at most MAX_METRICS")
    return Beat(
        busy_s=None if busy is None else float(busy),
        handled=_count(message.get("handled", 0)),
        errors=_count(message.get("errors", 0)),
        dropped=_count(message.get("dropped", 0)),
        last=_counts(message.get("last")),
        metrics=[_metric(m) for m in metrics],
        rejected=_counts(message.get("rejected")),
    )


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"not a count: {value!r:.50}")
    return value


def _counts(value: object) -> dict[str, int]:
    if not isinstance(value, dict) or len(value) > MAX_METRICS:
        if value is None:
            return {}
        raise ValueError("not a map of counts")
    return {str(k)[:64]: _count(v) for k, v in value.items()}


def _metric(value: object) -> MetricSample:
    if not isinstance(value, dict):
        raise ValueError("a metric is not an object")
    name, kind, number = value.get("name"), value.get("kind"), value.get("value")
    if not isinstance(name, str) or kind not in ("counter", "gauge") or not _finite(number):
        raise ValueError(f"a bad metric: {value!r:.100}")
    assert isinstance(number, int | float)
    return MetricSample(name[:100], kind, float(number), str(value.get("help", ""))[:200])


class Protocol:
    """The host's side of the control protocol: its original stdout, written from any thread."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._lock = threading.Lock()

    def write(self, message: dict[str, Any]) -> None:
        with self._lock:
            try:
                write(self.stream, message)
            except (BrokenPipeError, ValueError, OSError):
                pass  # the supervisor is gone; PDEATHSIG or stdin's end stops us


def take_stdout() -> IO[str]:
    """Keep the original stdout for the protocol; fd 1 and ``sys.stdout`` become stderr."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return open(fd, "w", encoding="utf-8", closefd=True)


def read_lines(stream: IO[str], deliver: Callable[[dict[str, Any]], object]) -> None:
    """The host's stdin thread: each message to ``deliver``; the stream's end is "eof" (stop)."""
    for line in stream:
        if not line.strip():
            continue
        try:
            message = parse(line)
        except ValueError as exc:
            log.warning("not a control message: %s", exc)
            continue
        deliver(message)
    deliver({"t": "eof"})
