"""The project stream: each new frame is drawn once, in a worker thread, and the one JPEG
is handed to every viewer. A camera's renderer runs only while its project stream has a
viewer; when frames come faster than they can be drawn, the newest frame is drawn next and
the ones in between are skipped (the device stream still has them).

A camera has one such stream per view (every project's overlays, or one project's); while
a project sends frames it drew itself (fresh ones), the view shows those and draws nothing
(the hub hands them over as they come).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from lensbus.logs import RateLimit, log_limited
from lensbus_publisher import metrics
from lensbus_publisher.camera import Camera, FrameItem, ProjectView
from lensbus_publisher.config import PublisherSettings
from lensbus_publisher.hub import Hub
from lensbus_publisher.overlay import Overlays
from lensbus_publisher.projects import ProjectFrame
from lensbus_publisher.render import render

log = logging.getLogger(__name__)


class ProjectRenderer:
    def __init__(self, settings: PublisherSettings, hub: Hub) -> None:
        self.s = settings
        self.hub = hub
        self.pool = ThreadPoolExecutor(settings.render_threads, thread_name_prefix="render")
        self.overlays: Overlays | None = None  # the zones and lines drawn, once bound
        self._limit = RateLimit(60.0)

    def watch(self, cam: Camera, view: ProjectView) -> None:
        """A project viewer arrived: make sure the view's renderer runs; a fresh frame a
        project drew is there at once."""
        drawn = cam.inputs.drawn_for(view.key, time.monotonic())
        if drawn is not None and (view.out is None or view.out.rendered < drawn.rendered):
            view.out = drawn
        if view.task is None or view.task.done():
            name = f"render {cam.id} {view.key}".rstrip()
            view.task = asyncio.create_task(self._loop(cam, view), name=name)

    async def _next(
        self, cam: Camera, view: ProjectView, done: tuple[int, int] | None
    ) -> FrameItem | None:
        """The frame to draw next: the newest one not drawn yet, as soon as its own result is
        in, or at once (``result_wait_s`` 0), or when the wait is over; ``None`` when the
        last viewer left. The wait runs from the first frame waited for, so a camera whose
        results never come still shows a frame every ``result_wait_s``."""
        wait = self.s.result_wait_s
        deadline: float | None = None
        while view.viewers > 0 and not self.hub.closing:
            version = cam.changed.version
            frame = cam.newest
            if frame is None or (frame.seq, frame.capture_ns) == done:
                await cam.changed.wait(version)
                continue
            if wait <= 0 or frame.seq in cam.results:
                return frame
            now = time.monotonic()
            deadline = deadline or now + wait
            if now >= deadline:
                return frame
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cam.changed.wait(version), deadline - now)
        return None

    async def _loop(self, cam: Camera, view: ProjectView) -> None:
        # A frame is known by (seq, capture time): seq starts again when capture restarts.
        done = (view.out.seq, view.out.capture_ns) if view.out else None
        while (frame := await self._next(cam, view, done)) is not None:
            done = (frame.seq, frame.capture_ns)
            if cam.inputs.drawn_for(view.key, time.monotonic()) is not None:
                continue  # a project draws this stream itself now
            out = await self._draw(cam, view, frame)
            if out is None or cam.inputs.drawn_for(view.key, time.monotonic()) is not None:
                continue
            view.out = out
            view.signal.notify()

    async def _draw(self, cam: Camera, view: ProjectView, frame: FrameItem) -> ProjectFrame | None:
        """One frame drawn in a worker thread; None if it could not be (counted, logged)."""
        result = cam.result_for_frame(frame, self.s.result_max_age_s)
        overlay = None if self.overlays is None else self.overlays.overlay(cam.id, result)
        drawn = cam.inputs.shapes_for(view.key, frame.seq, frame.capture_ns, time.monotonic())
        shapes = [shape for _, project_shapes in drawn for shape in project_shapes]
        try:
            out = await asyncio.get_running_loop().run_in_executor(
                self.pool,
                render,
                frame.jpeg,
                result,
                frame.seq,
                self.s.project_jpeg_quality,
                overlay,
                shapes,
            )
        except Exception as exc:  # a frame that does not decode: skip it, keep going
            metrics.RENDER_ERRORS.labels(cam.id).inc()
            log_limited(
                log,
                self._limit,
                cam.id,
                logging.WARNING,
                "camera %s: frame #%d not drawn: %s",
                cam.id,
                frame.seq,
                exc,
            )
            return None
        metrics.RENDER_SECONDS.observe(out.total_s)
        metrics.FRAMES_RENDERED.labels(cam.id).inc()
        for project, _ in drawn:
            metrics.PROJECT_OVERLAYS_DRAWN.labels(project).inc()
        cam.frames_rendered += 1
        return ProjectFrame(
            seq=frame.seq,
            capture_ns=frame.capture_ns,
            result_seq=-1 if result is None else result.seq,
            jpeg=out.jpeg,
            rendered=time.monotonic(),
        )

    async def close(self) -> None:
        tasks = [
            view.task
            for cam in self.hub.cameras.values()
            for view in cam.views.values()
            if view.task is not None
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.pool.shutdown(wait=False, cancel_futures=True)
