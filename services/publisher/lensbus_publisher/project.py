"""The project stream: each new frame is drawn once, in a worker thread, and the one JPEG
is handed to every viewer. A camera's renderer runs only while its project stream has a
viewer; when frames come faster than they can be drawn, the newest frame is drawn next and
the ones in between are skipped (the device stream still has them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from lensbus.logs import RateLimit, log_limited
from lensbus_publisher import metrics
from lensbus_publisher.camera import Camera, FrameItem, ProjectFrame
from lensbus_publisher.config import PublisherSettings
from lensbus_publisher.hub import Hub
from lensbus_publisher.overlay import Overlays
from lensbus_publisher.render import render

log = logging.getLogger(__name__)


class ProjectRenderer:
    def __init__(self, settings: PublisherSettings, hub: Hub) -> None:
        self.s = settings
        self.hub = hub
        self.pool = ThreadPoolExecutor(settings.render_threads, thread_name_prefix="render")
        self.overlays: Overlays | None = None  # the zones and lines drawn, once bound
        self._limit = RateLimit(60.0)

    def watch(self, cam: Camera) -> None:
        """A project viewer arrived: make sure the camera's renderer runs."""
        if cam.render_task is None or cam.render_task.done():
            cam.render_task = asyncio.create_task(self._loop(cam), name=f"render {cam.id}")

    async def _next(self, cam: Camera, done: tuple[int, int] | None) -> FrameItem | None:
        """The frame to draw next: the newest one not drawn yet, as soon as its own result is
        in, or at once (``result_wait_s`` 0), or when the wait is over; ``None`` when the
        last viewer left. The wait runs from the first frame waited for, so a camera whose
        results never come still shows a frame every ``result_wait_s``."""
        wait = self.s.result_wait_s
        deadline: float | None = None
        while cam.viewers["project"] > 0 and not self.hub.closing:
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

    async def _loop(self, cam: Camera) -> None:
        loop = asyncio.get_running_loop()
        # A frame is known by (seq, capture time): seq starts again when capture restarts.
        done = (cam.project.seq, cam.project.capture_ns) if cam.project else None
        while (frame := await self._next(cam, done)) is not None:
            done = (frame.seq, frame.capture_ns)
            result = cam.result_for_frame(frame, self.s.result_max_age_s)
            overlay = None if self.overlays is None else self.overlays.overlay(cam.id, result)
            try:
                out = await loop.run_in_executor(
                    self.pool,
                    render,
                    frame.jpeg,
                    result,
                    frame.seq,
                    self.s.project_jpeg_quality,
                    overlay,
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
                continue
            metrics.RENDER_SECONDS.observe(out.total_s)
            metrics.FRAMES_RENDERED.labels(cam.id).inc()
            cam.frames_rendered += 1
            cam.project = ProjectFrame(
                seq=frame.seq,
                capture_ns=frame.capture_ns,
                result_seq=-1 if result is None else result.seq,
                jpeg=out.jpeg,
                rendered=time.monotonic(),
            )
            cam.project_signal.notify()

    async def close(self) -> None:
        tasks = [c.render_task for c in self.hub.cameras.values() if c.render_task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.pool.shutdown(wait=False, cancel_futures=True)
