"""The publisher's view of the bus: per camera, the recent frames and results, and the
heartbeats of every service. Messages come in decoded here; nothing here does I/O.

Frames are kept as the JPEG bytes they arrived in (the device stream serves them as they
are); a small ring by seq lets results be joined to their frames and events take a
snapshot of the frame that fired them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from lensbus import metrics as shared_metrics
from lensbus.codec import DecodeError, decode
from lensbus.logs import RateLimit, log_limited
from lensbus.schemas import Event, FrameEnvelope, Result, Status
from lensbus_publisher import metrics
from lensbus_publisher.config import PublisherSettings

log = logging.getLogger(__name__)


class Rejected(ValueError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Signal:
    """Wakes every waiter when something new is there; waiters compare versions."""

    def __init__(self) -> None:
        self.version = 0
        self._event = asyncio.Event()

    def notify(self) -> None:
        self.version += 1
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, seen: int) -> int:
        """Return the version once it differs from ``seen``."""
        while self.version == seen:
            await self._event.wait()
        return self.version


@dataclass(frozen=True, slots=True)
class FrameItem:
    seq: int
    capture_ns: int
    width: int
    height: int
    jpeg: bytes
    received: float  # time.monotonic() at arrival


@dataclass(frozen=True, slots=True)
class ResultItem:
    result: Result
    received: float
    sse: bytes  # the Server-Sent Event, serialized once for every client


@dataclass(frozen=True, slots=True)
class ProjectFrame:
    seq: int
    capture_ns: int
    result_seq: int  # -1: drawn without a result
    jpeg: bytes
    rendered: float  # time.monotonic() when ready


def result_json(result: Result) -> dict[str, Any]:
    """A result as JSON for browsers and scripts (the mask PNG left out)."""
    out = result.model_dump(mode="json", exclude={"mask_png"})
    out["latency_s"] = round(result.latency_s, 6)
    out["has_mask"] = result.mask_png is not None
    return out


def sse(event: str, ident: int, data: dict[str, Any]) -> bytes:
    body = json.dumps(data, separators=(",", ":"))
    return f"id: {ident}\nevent: {event}\ndata: {body}\n\n".encode()


class Subscribers:
    """SSE clients: a bounded queue each; a full queue loses its oldest item."""

    def __init__(self) -> None:
        self.queues: set[asyncio.Queue[bytes | None]] = set()

    def add(self, size: int) -> asyncio.Queue[bytes | None]:
        q: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=size)
        self.queues.add(q)
        return q

    def remove(self, q: asyncio.Queue[bytes | None]) -> None:
        self.queues.discard(q)

    def send(self, item: bytes | None) -> None:
        for q in self.queues:
            if q.full():
                q.get_nowait()
                metrics.VIEWER_DROPS.labels("results", "slow_viewer").inc()
            q.put_nowait(item)


@dataclass
class Camera:
    id: str
    frame_ring: int
    result_ring: int
    frames: OrderedDict[int, FrameItem] = field(default_factory=OrderedDict)
    newest: FrameItem | None = None
    results: OrderedDict[int, ResultItem] = field(default_factory=OrderedDict)
    newest_result: ResultItem | None = None
    frame_signal: Signal = field(default_factory=Signal)
    changed: Signal = field(default_factory=Signal)  # a frame or a result came
    project: ProjectFrame | None = None
    project_signal: Signal = field(default_factory=Signal)
    subscribers: Subscribers = field(default_factory=Subscribers)
    viewers: dict[str, int] = field(default_factory=lambda: dict.fromkeys(metrics.STREAMS, 0))
    render_task: asyncio.Task[None] | None = None
    arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=31))
    frames_received: int = 0
    results_received: int = 0
    frames_rendered: int = 0
    restarts: int = 0

    def add_frame(self, item: FrameItem) -> bool:
        """File a frame; returns True when its seq went back (the capture restarted)."""
        restarted = self.newest is not None and item.seq <= self.newest.seq
        if restarted:
            self.frames.clear()
            self.results.clear()
            self.newest_result = None
            self.restarts += 1
        self.frames[item.seq] = item
        while len(self.frames) > self.frame_ring:
            self.frames.popitem(last=False)
        self.newest = item
        self.frames_received += 1
        self.arrivals.append(item.received)
        self.frame_signal.notify()
        self.changed.notify()
        return restarted

    def add_result(self, item: ResultItem) -> None:
        seq = item.result.seq
        self.results[seq] = item
        while len(self.results) > self.result_ring:
            self.results.popitem(last=False)
        if self.newest_result is None or seq >= self.newest_result.result.seq:
            self.newest_result = item
        self.results_received += 1
        self.subscribers.send(item.sse)
        self.changed.notify()

    def result_for_frame(self, frame: FrameItem, max_age_s: float) -> Result | None:
        """The frame's own result, else the newest result if it is recent enough."""
        own = self.results.get(frame.seq)
        if own is not None:
            return own.result
        newest = self.newest_result
        if newest is None:
            return None
        age = (frame.capture_ns - newest.result.capture_ns) / 1e9
        return newest.result if age <= max_age_s else None

    @property
    def fps(self) -> float:
        if len(self.arrivals) < 2:
            return 0.0
        span = self.arrivals[-1] - self.arrivals[0]
        return (len(self.arrivals) - 1) / span if span > 0 else 0.0

    def summary(self, now: float) -> dict[str, Any]:
        frame, res = self.newest, self.newest_result
        r = res.result if res else None
        return {
            "id": self.id,
            "frame": None
            if frame is None
            else {
                "seq": frame.seq,
                "capture_ns": frame.capture_ns,
                "width": frame.width,
                "height": frame.height,
                "bytes": len(frame.jpeg),
                "age_s": round(now - frame.received, 3),
            },
            "fps": round(self.fps, 2),
            "model": None if r is None else r.model.model_dump(mode="json"),
            "task": None if r is None else r.task,
            "result": None
            if r is None or res is None
            else {
                "seq": r.seq,
                "latency_s": round(r.latency_s, 4),
                "age_s": round(now - res.received, 3),
                "labels": [d.label for d in r.detections]
                + [c.label for c in r.classes[:1]]
                + [s.label for s in r.segments],
            },
            "viewers": dict(self.viewers),
            "frames_received": self.frames_received,
            "results_received": self.results_received,
            "frames_rendered": self.frames_rendered,
            "streams": {
                "device": f"/cameras/{self.id}/device.mjpeg",
                "project": f"/cameras/{self.id}/project.mjpeg",
                "results": f"/cameras/{self.id}/results",
            },
        }


class Hub:
    """Every camera the publisher has seen, and every service's last heartbeat."""

    def __init__(self, settings: PublisherSettings) -> None:
        self.s = settings
        self.cameras: dict[str, Camera] = {}
        self.statuses: dict[tuple[str, str], tuple[Status, float]] = {}
        self.all_results = Subscribers()  # SSE clients of every camera
        self.closing = False
        self.rejected = 0
        self._limit = RateLimit(60.0)

    # ---- bad input ---------------------------------------------------------------------

    def reject(self, reason: str, what: str, exc: Exception) -> None:
        self.rejected += 1
        shared_metrics.MESSAGES_REJECTED.labels(reason).inc()
        log_limited(
            log, self._limit, f"{what}:{reason}", logging.WARNING,
            "rejected a %s (%s): %s", what, reason, exc,
        )  # fmt: skip

    def camera(self, camera_id: str, create: bool = False) -> Camera | None:
        cam = self.cameras.get(camera_id)
        if cam is None and create:
            if len(self.cameras) >= self.s.max_cameras:
                raise Rejected("too_many_cameras", f"over max_cameras={self.s.max_cameras}")
            cam = Camera(camera_id, self.s.frame_ring, self.s.result_ring)
            self.cameras[camera_id] = cam
            for stream in metrics.STREAMS:
                metrics.VIEWERS.labels(camera_id, stream).set(0)
            log.info("new camera %s", camera_id)
        return cam

    # ---- messages ----------------------------------------------------------------------

    def on_frame(self, subject_camera: str, data: bytes) -> tuple[Camera, bool] | None:
        """File a frame message; returns its camera and whether the capture restarted."""
        try:
            env = decode(data, FrameEnvelope)
            if env.camera != subject_camera:
                raise Rejected("camera_mismatch", f"{env.camera!r} on {subject_camera!r}")
            cam = self.camera(env.camera, create=True)
            assert cam is not None
        except (DecodeError, Rejected) as exc:
            self.reject(exc.reason, "frame", exc)
            return None
        item = FrameItem(env.seq, env.capture_ns, env.width, env.height, env.data, time.monotonic())
        restarted = cam.add_frame(item)
        metrics.FRAMES_RECEIVED.labels(cam.id).inc()
        return cam, restarted

    def on_result(self, subject_camera: str, data: bytes) -> tuple[Camera, Result] | None:
        try:
            result = decode(data, Result)
            if result.camera != subject_camera:
                raise Rejected("camera_mismatch", f"{result.camera!r} on {subject_camera!r}")
            cam = self.camera(result.camera, create=True)
            assert cam is not None
            body = result_json(result)
        except (DecodeError, Rejected) as exc:
            self.reject(exc.reason, "result", exc)
            return None
        item = ResultItem(result, time.monotonic(), sse("result", result.seq, body))
        cam.add_result(item)
        self.all_results.send(item.sse)
        metrics.RESULTS_RECEIVED.labels(cam.id).inc()
        return cam, result

    def on_event(self, event: Event) -> None:
        """An event this publisher raised: to the SSE clients of its camera and of all."""
        item = sse("event", event.seq, event.model_dump(mode="json"))
        cam = self.cameras.get(event.camera)
        if cam is not None:
            cam.subscribers.send(item)
        self.all_results.send(item)

    def on_status(self, data: bytes) -> None:
        try:
            status = decode(data, Status)
        except DecodeError as exc:
            self.reject(exc.reason, "heartbeat", exc)
            return
        key = (status.service, status.instance)
        if key not in self.statuses and len(self.statuses) >= 4096:
            self.reject("too_many_services", "heartbeat", ValueError("over 4096 instances"))
            return
        self.statuses[key] = (status, time.monotonic())

    # ---- views -------------------------------------------------------------------------

    def status_view(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        for key in [k for k, (_, t) in self.statuses.items() if now - t > self.s.status_forget_s]:
            del self.statuses[key]
        out = []
        for _, (st, seen) in sorted(self.statuses.items(), key=lambda kv: kv[0]):
            age = now - seen
            item = st.model_dump(mode="json")
            item["age_s"] = round(age, 3)
            # Three missed heartbeats: the service is probably gone.
            item["stale"] = age > 3 * st.interval_s + 1.0
            out.append(item)
        return out

    def cameras_view(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [cam.summary(now) for _, cam in sorted(self.cameras.items())]

    def close(self) -> None:
        """Wake every stream so that it ends."""
        self.closing = True
        for cam in self.cameras.values():
            cam.frame_signal.notify()
            cam.changed.notify()
            cam.project_signal.notify()
            cam.subscribers.send(None)
        self.all_results.send(None)
