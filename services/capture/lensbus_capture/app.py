"""Capture lifecycle: open the source, start the runtime, run the capture loop."""

from __future__ import annotations

import asyncio
import logging

from lensbus.runtime import Runtime
from lensbus_capture import metrics
from lensbus_capture.capture import Capture
from lensbus_capture.config import CaptureSettings
from lensbus_capture.sources import SourceError, make_source

log = logging.getLogger(__name__)

EXIT_SOURCE = 3  # the source could not be opened at start


async def run(settings: CaptureSettings) -> int:
    source = make_source(settings.source, settings.width, settings.height, settings.loop)
    try:
        await asyncio.to_thread(source.open)
    except SourceError as exc:
        log.error("%s", exc)
        return EXIT_SOURCE
    log.info(
        "capturing %s as camera %s at up to %.1f fps", source.name, settings.camera, settings.fps
    )
    metrics.SOURCE_UP.set(1)
    capture: Capture | None = None
    try:
        async with Runtime(settings, counters=lambda: capture.counters() if capture else {}) as rt:
            capture = Capture(settings, source, rt)
            rt.detail = {"camera": settings.camera, "source": source.name}
            rt.set_state("running")
            return await capture.loop()
    finally:
        await asyncio.to_thread(source.close)
