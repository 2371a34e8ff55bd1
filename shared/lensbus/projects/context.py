"""``ctx``: what a project's handler is given (the device library of lensbus).

Every method may be called from the handler's worker thread (a sync handler) or from the
event loop (an async one), and none waits on the network: a message is encoded in the
caller (so a bad payload raises there, in the handler) and queued to the host's connection
(:class:`Outbox`), which sends it in order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np
from nats.aio.client import Client as NATS

from lensbus.codec import encode
from lensbus.errors import ProjectError
from lensbus.logs import RateLimit, log_limited
from lensbus.projects import control
from lensbus.projects.control import MetricSample
from lensbus.projects.state import State, on_loop
from lensbus.schemas.base import Message
from lensbus.schemas.event import Event
from lensbus.schemas.frame import FrameEnvelope
from lensbus.schemas.project import Overlay, ProjectManifest, ProjectMessage, Shape
from lensbus.schemas.result import Box, Result
from lensbus.subjects import Subjects, validate_token

log = logging.getLogger(__name__)

# Messages queued to the connection; past it a handler publishing in a tight loop is told.
MAX_OUTBOX = 10_000
BoxLike: TypeAlias = Box | tuple[float, float, float, float] | list[float]


class Outbox:
    """Messages to send, from any thread, in order; ``send`` never waits for the server."""

    def __init__(
        self,
        nc: NATS,
        loop: asyncio.AbstractEventLoop,
        echo: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.nc = nc
        self.loop = loop
        self.echo = echo  # lensbus project run: each message sent, shown to the developer
        self.errors = 0
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._task = loop.create_task(self._send_all(), name="outbox")
        self._limit = RateLimit(60.0)

    def send(self, subject: str, data: bytes) -> None:
        if self._queue.qsize() >= MAX_OUTBOX:
            raise ProjectError(f"{MAX_OUTBOX} messages are waiting to be sent: publish less")
        on_loop(self.loop, self._queue.put_nowait, (subject, data))

    async def _send_all(self) -> None:
        while True:
            subject, data = await self._queue.get()
            try:
                await self.nc.publish(subject, data)
                if self.echo is not None:
                    self.echo(subject, data)
            except Exception as exc:  # a closed or slow connection: counted, the next goes on
                self.errors += 1
                cause = type(exc).__name__
                msg = "not sent on %s: %s: %s"
                log_limited(log, self._limit, cause, logging.WARNING, msg, subject, cause, exc)
            finally:
                self._queue.task_done()

    async def flush(self, timeout_s: float = 5.0) -> None:
        try:
            await asyncio.wait_for(self._queue.join(), timeout_s)
        except TimeoutError:
            log.warning("%d messages not sent at stop", self._queue.qsize())
        self._task.cancel()


class Counter:
    """A project's own counter (``lensbus_project_counter_total{project,name}``)."""

    kind: Literal["counter", "gauge"] = "counter"

    def __init__(self, name: str, help: str) -> None:
        self.name, self.help, self.value = name, help, 0.0
        self._lock = threading.Lock()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ProjectError(f"counter {self.name!r} only goes up (inc({amount}))")
        with self._lock:
            self.value += amount


class Gauge(Counter):
    """A project's own gauge (``lensbus_project_gauge{project,name}``)."""

    kind: Literal["counter", "gauge"] = "gauge"

    def set(self, value: float) -> None:
        with self._lock:
            self.value = float(value)

    def inc(self, amount: float = 1) -> None:
        with self._lock:
            self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.inc(-amount)


class Current:
    """The result being handled, its frame, and that frame decoded (once, on demand)."""

    def __init__(self, result: Result | None = None, frame: FrameEnvelope | None = None) -> None:
        self.result = result
        self.frame = frame
        self.image: np.ndarray | None = None
        self.lock = threading.Lock()


class Context:
    """The ``ctx`` of a project's handler."""

    def __init__(
        self,
        manifest: ProjectManifest,
        instance: str,
        subjects: Subjects,
        send: Callable[[str, bytes], None],
        state: State,
    ) -> None:
        self.project = manifest.name
        self.version = manifest.version
        self.instance = instance
        self.settings: dict[str, Any] = dict(manifest.settings)
        self.log = logging.getLogger(f"lensbus.project.{manifest.name}")
        self.state = state
        self._frames = manifest.frames
        self._subjects = subjects
        self._send = send
        self._current = Current()
        self._metrics: dict[str, Counter] = {}
        self._metrics_lock = threading.Lock()

    # ---- the result in hand (set by the host around each call) ----------------------------

    def begin(self, result: Result | None, frame: FrameEnvelope | None = None) -> None:
        self._current = Current(result, frame)

    @property
    def result(self) -> Result | None:
        return self._current.result

    @property
    def camera(self) -> str | None:
        result = self._current.result
        return result.camera if result is not None else None

    def frame(self) -> np.ndarray:
        """The current result's frame, full size, BGR uint8 (the same array on each call)."""
        current = self._current
        if not self._frames:
            raise ProjectError('ctx.frame() needs "frames": true in project.json')
        if current.result is None:
            raise ProjectError("ctx.frame(): no result is being handled (on_start/on_stop)")
        if current.frame is None:
            r = current.result
            raise ProjectError(f"ctx.frame(): the frame of {r.camera} seq {r.seq} never came")
        # OpenCV is imported on the first frame asked for, not at start: a project that never
        # looks at pixels does not pay its address space (RLIMIT_AS) for it.
        from lensbus.images import decode_jpeg

        with current.lock:
            if current.image is None:
                current.image = decode_jpeg(current.frame.data)
            return current.image

    # ---- outputs --------------------------------------------------------------------------

    def _camera(self, camera: str | None) -> str:
        chosen = camera or self.camera
        if not chosen:
            raise ProjectError("no result is being handled: pass camera=")
        return chosen

    def _seq(self) -> tuple[int, int]:
        result = self._current.result
        return (result.seq, result.capture_ns) if result is not None else (0, 0)

    def _emit(self, subject: str, message: Message) -> None:
        self._send(subject, encode(message))

    def publish(self, topic: str, payload: Any, camera: str | None = None) -> None:
        """Send ``payload`` (msgpack types) on ``<prefix>.projects.<project>.<camera>.<topic>``."""
        cam = self._camera(camera)
        subject = self._subjects.project_output(self.project, cam, topic)
        seq, capture_ns = self._seq()
        message = ProjectMessage(
            project=self.project,
            version=self.version,
            camera=cam,
            topic=topic,
            seq=seq,
            capture_ns=capture_ns,
            published_ns=time.time_ns(),
            payload=payload,
        )
        self._emit(subject, message)

    def event(
        self,
        label: str,
        score: float = 1.0,
        box: BoxLike | None = None,
        detail: Mapping[str, Any] | None = None,
        camera: str | None = None,
    ) -> None:
        """Raise an event (snapshot, clip, webhooks like a rule's) for the current frame."""
        cam = self._camera(camera)
        seq, capture_ns = self._seq()
        result = self._current.result
        event = Event(
            rule=self.project,
            camera=cam,
            label=label,
            score=score,
            seq=seq,
            capture_ns=capture_ns,
            event_ns=time.time_ns(),
            model=result.model if result is not None else None,
            box=self._box(box),
            trigger="project",
            project=self.project,
            detail=dict(detail) if detail is not None else None,
        )
        self._emit(self._subjects.project_event(self.project, cam), event)

    def _box(self, box: BoxLike | None) -> Box | None:
        if box is None or isinstance(box, Box):
            return box
        if len(box) != 4:
            raise ProjectError(f"box: (xmin, ymin, xmax, ymax) normalised, not {box!r}")
        result = self._current.result
        width, height = (result.width, result.height) if result is not None else (0, 0)
        return Box.from_normalized(*box, width=width, height=height)

    def overlay(
        self,
        shapes: Iterable[Shape | Mapping[str, Any]],
        ttl_s: float = 1.0,
        camera: str | None = None,
    ) -> None:
        """Shapes the publisher draws on the project stream from the current frame on."""
        cam = self._camera(camera)
        seq, capture_ns = self._seq()
        drawn = [s if isinstance(s, Shape) else Shape.model_validate(s) for s in shapes]
        overlay = Overlay(
            project=self.project,
            camera=cam,
            seq=seq,
            capture_ns=capture_ns,
            shapes=drawn,
            ttl_s=ttl_s,
        )
        self._emit(self._subjects.project_overlay(self.project, cam), overlay)

    # ---- the project's own metrics ------------------------------------------------------------

    def _metric(self, cls: type[Counter], name: str, help: str) -> Counter:
        validate_token(name, "metric name")
        with self._metrics_lock:
            metric = self._metrics.get(name)
            if metric is None:
                metric = self._metrics[name] = cls(name, help)
            if type(metric) is not cls:
                raise ProjectError(f"metric {name!r} is a {metric.kind}, not a {cls.kind}")
            return metric

    def counter(self, name: str, help: str = "") -> Counter:
        return self._metric(Counter, name, help)

    def gauge(self, name: str, help: str = "") -> Gauge:
        metric = self._metric(Gauge, name, help)
        assert isinstance(metric, Gauge)
        return metric

    def samples(self) -> list[MetricSample]:
        """The metrics for a beat (from the beat thread)."""
        with self._metrics_lock:
            metrics = list(self._metrics.values())
        return [MetricSample(m.name, m.kind, m.value, m.help) for m in metrics]


@dataclass
class HostEnv:
    """The host's environment (``LENSBUS_PROJECT_*``)."""

    project_dir: Path
    nats_url: str
    user: str = ""
    password: str = ""
    prefix: str = "lensbus"
    cameras: frozenset[str] | None = None  # None: every camera
    instance: str = "dev"
    models_dir: str = ""
    echo: bool = False  # write each message sent on the protocol too (lensbus project run)
    tls_ca: str = ""  # the CA of the NATS server's certificate (empty: plain, or the system's)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> HostEnv:
        e = dict(os.environ if env is None else env)
        return cls(
            project_dir=Path(e[control.ENV_DIR]),
            nats_url=e.get(control.ENV_NATS_URL, "nats://127.0.0.1:4222"),
            user=e.get(control.ENV_USER, ""),
            password=e.get(control.ENV_PASSWORD, ""),
            prefix=e.get(control.ENV_PREFIX) or "lensbus",
            cameras=parse_cameras(e.get(control.ENV_CAMERAS, "*")),
            instance=e.get(control.ENV_INSTANCE) or "dev",
            models_dir=e.get(control.ENV_MODELS, ""),
            echo=e.get(control.ENV_ECHO, "") == "1",
            tls_ca=e.get(control.ENV_TLS_CA, ""),
        )


def parse_cameras(value: str | list[str] | None) -> frozenset[str] | None:
    """``'*'``, ``''`` or None -> None (every camera); ``'a,b'`` or a list -> those (``[]``:
    none, what the environment cannot say)."""
    if isinstance(value, list):
        return frozenset(value)
    value = (value or "").strip()
    if value in ("", "*"):
        return None
    return frozenset(c.strip() for c in value.split(",") if c.strip())
