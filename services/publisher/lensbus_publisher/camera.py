"""One camera as the publisher holds it: the recent frames (as the JPEG bytes they arrived
in: the device stream serves them as they are) and results, in small rings by seq so that
results are joined to their frames and events take a snapshot of the frame that fired them;
its project streams (every project's overlays, or one project's) with their newest frame;
what projects sent for it; the signals that wake its streams. Nothing here does I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lensbus.schemas import Result
from lensbus_publisher import metrics
from lensbus_publisher.projects import ProjectFrame, ProjectInputs
from lensbus_publisher.sse import Subscribers


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


MAX_VIEWS = 16  # streams of one project (?project=) per camera, besides the one of all


@dataclass
class ProjectView:
    """One project stream of a camera: key "" draws every project's overlays, a project's
    name only that project's (``?project=NAME``). Drawn once per frame for all its viewers."""

    key: str
    out: ProjectFrame | None = None  # the newest frame, drawn here or by a project
    signal: Signal = field(default_factory=Signal)
    viewers: int = 0
    task: asyncio.Task[None] | None = None  # its renderer, while it has viewers


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
    views: dict[str, ProjectView] = field(default_factory=lambda: {"": ProjectView("")})
    inputs: ProjectInputs = field(default_factory=ProjectInputs)
    subscribers: Subscribers = field(default_factory=Subscribers)
    viewers: dict[str, int] = field(default_factory=lambda: dict.fromkeys(metrics.STREAMS, 0))
    arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=31))
    frames_received: int = 0
    results_received: int = 0
    frames_rendered: int = 0
    restarts: int = 0
    heard: float = field(default_factory=time.monotonic)  # last frame or result

    @property
    def watched(self) -> bool:
        """Whether a stream holds this camera (it must not be forgotten under it)."""
        return any(self.viewers.values()) or bool(self.subscribers.queues)

    def view(self, key: str) -> ProjectView | None:
        """The project stream ``key`` (made on first use); None when there are MAX_VIEWS."""
        view = self.views.get(key)
        if view is None and len(self.views) <= MAX_VIEWS:
            view = self.views[key] = ProjectView(key)
        return view

    @contextlib.contextmanager
    def watching(self, view: ProjectView) -> Iterator[None]:
        """A viewer of ``view`` while in the block; one project's view goes with its last."""
        view.viewers += 1
        try:
            yield
        finally:
            view.viewers -= 1
            if view.key and not view.viewers and self.views.get(view.key) is view:
                del self.views[view.key]  # its renderer ends with its last viewer

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
        self.heard = item.received
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
        self.heard = item.received
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
