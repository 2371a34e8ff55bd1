"""Capture lifecycle: settings -> runtime -> the cameras -> wait for stop (or the end of the
one camera's file) -> stop the cameras."""

from __future__ import annotations

import asyncio
import logging

from lensbus.runtime import Runtime
from lensbus_capture.cameras import Cameras
from lensbus_capture.config import CaptureSettings
from lensbus_capture.sources import Source, SourceError, make_source

log = logging.getLogger(__name__)

EXIT_SOURCE = 3  # the source could not be opened at start
FOLLOWER_STOP_S = 5.0  # its last state writes take ~0.5 s, at most 2 s each


async def run(settings: CaptureSettings) -> int:
    source: Source | None = None
    if settings.cameras_from == "settings":
        # One camera from the settings: a source that cannot be opened at start is a
        # configuration error (exit 3), as before cameras could come from the bucket.
        source = make_source(settings.camera_config())
        try:
            await asyncio.to_thread(source.open)
        except SourceError as exc:
            log.error("%s", exc)
            return EXIT_SOURCE
    cameras: Cameras | None = None
    async with Runtime(settings, counters=lambda: cameras.counters() if cameras else {}) as rt:
        cameras = Cameras(rt, settings, on_state=lambda state: None)
        rt.set_state("running")
        try:
            if source is not None:
                return await _one_camera(rt, settings, cameras, source)
            from lensbus_capture import desired

            follower = asyncio.create_task(desired.follow(rt, settings, cameras), name="desired")
            stopping = asyncio.create_task(rt.stop.wait())
            await asyncio.wait({follower, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not follower.done():
                # It ends by itself on stop, once it has written its cameras' last states.
                await asyncio.wait({follower}, timeout=FOLLOWER_STOP_S)
            if not follower.done():
                follower.cancel()
            elif follower.exception() is not None:
                log.error("following the cameras bucket failed: %r", follower.exception())
                return 1
            return 0
        finally:
            await cameras.stop()
    return 0


async def _one_camera(
    rt: Runtime, settings: CaptureSettings, cameras: Cameras, source: Source
) -> int:
    """Run the settings' camera until stopped (0) or its file ends (0) or fails (1)."""
    config = settings.camera_config()
    await cameras.apply({config.id: config}, sources={config.id: source})
    log.info("capturing %s as camera %s at up to %.1f fps", source.name, config.id, config.fps)
    task = cameras.task(config.id)
    stopping = asyncio.create_task(rt.stop.wait())
    await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if task.done():
        return task.result()
    return 0
