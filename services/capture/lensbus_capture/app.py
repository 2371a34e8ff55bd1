"""Capture lifecycle: open the source, connect, read -> encode -> publish at the fps cap."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from lensbus.codec import encode
from lensbus.logs import RateLimit, log_limited
from lensbus.runtime import Runtime
from lensbus_capture import metrics
from lensbus_capture.config import CaptureSettings
from lensbus_capture.handlers import Encoded, encode_frame, envelope
from lensbus_capture.sources import Source, SourceError, make_source

log = logging.getLogger(__name__)

EXIT_SOURCE = 3  # the source could not be opened at start


class Capture:
    """Reads frames from a source and publishes them; newest-first, never queued."""

    def __init__(self, settings: CaptureSettings, source: Source, rt: Runtime) -> None:
        self.s = settings
        self.source = source
        self.rt = rt
        self.subject = rt.subjects.frames(settings.camera)
        self.seq = 0
        self.captured = 0
        self.published = 0
        self.dropped = 0
        self._limit = RateLimit(60.0)

    def counters(self) -> dict[str, float]:
        return {"captured": self.captured, "published": self.published, "dropped": self.dropped}

    def _read_and_encode(self) -> tuple[int, Encoded] | None:
        # One hop to a worker thread per frame: the read blocks and the encode is CPU work,
        # and both release the GIL, so the event loop stays free for NATS.
        t0 = time.perf_counter()
        image = self.source.read()
        if image is None:
            return None
        capture_ns = time.time_ns()
        metrics.READ_SECONDS.observe(time.perf_counter() - t0)
        return capture_ns, encode_frame(image, self.s.width, self.s.height, self.s.jpeg_quality)

    def _drop(self, reason: str, detail: str = "") -> None:
        self.dropped += 1
        metrics.FRAMES_DROPPED.labels(reason).inc()
        log_limited(
            log, self._limit, reason, logging.WARNING, "dropping frames (%s) %s", reason, detail
        )

    async def _publish(self, capture_ns: int, enc: Encoded) -> None:
        seq = self.seq
        self.seq += 1
        if not self.rt.bus.connected:
            # Never queue frames while NATS is away: a late frame is worth nothing.
            self._drop("nats_down")
            return
        try:
            await self.rt.nc.publish(
                self.subject, encode(envelope(self.s.camera, seq, capture_ns, enc))
            )
        except Exception as exc:  # buffer full, connection closing: drop and go on
            self._drop("publish_error", f"{type(exc).__name__}: {exc}")
            return
        self.published += 1
        metrics.FRAMES_PUBLISHED.inc()

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.rt.stop.wait(), seconds)

    async def _reopen(self, cause: SourceError) -> None:
        """Reopen a live source with doubling back-off until it works or we stop."""
        metrics.SOURCE_UP.set(0)
        self.rt.set_state("degraded", f"source lost: {cause}")
        delay = 0.5
        while not self.rt.stop.is_set():
            await asyncio.to_thread(self.source.close)
            await self._wait(delay)
            if self.rt.stop.is_set():
                return
            metrics.SOURCE_REOPENS.inc()
            try:
                await asyncio.to_thread(self.source.open)
            except SourceError as exc:
                log_limited(
                    log,
                    self._limit,
                    "reopen",
                    logging.WARNING,
                    "%s; retrying in up to %.1f s",
                    exc,
                    self.s.reopen_max_s,
                )
                self.rt.set_state("degraded", str(exc))
                delay = min(delay * 2, self.s.reopen_max_s)
                continue
            log.info("source %s reopened", self.source.name)
            metrics.SOURCE_UP.set(1)
            self.rt.set_state("running")
            return

    async def loop(self) -> int:
        interval = 1.0 / self.s.fps
        next_t = time.monotonic()
        while not self.rt.stop.is_set():
            try:
                item = await asyncio.to_thread(self._read_and_encode)
            except SourceError as exc:
                if not self.source.live:
                    log.error("%s", exc)
                    return 1
                log.warning("%s; reopening", exc)
                await self._reopen(exc)
                next_t = time.monotonic()
                continue
            if item is None:
                log.info("end of %s after %d frames; stopping", self.source.name, self.captured)
                return 0
            self.captured += 1
            metrics.FRAMES_CAPTURED.inc()
            metrics.ENCODE_SECONDS.observe(item[1].encode_s)
            await self._publish(*item)
            # Pace to the fps cap on a fixed schedule; after a stall, start a new schedule
            # instead of bursting to catch up.
            next_t += interval
            delay = next_t - time.monotonic()
            if delay > 0:
                await self._wait(delay)
            elif delay < -interval:
                next_t = time.monotonic()
        return 0


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
