"""The capture loop: read a frame, encode it (and its model-stream copy), publish it now or
drop it, pace to the fps cap; a live source that fails is reopened with back-off."""

from __future__ import annotations

import asyncio
import logging
import time

from lensbus.codec import encode
from lensbus.logs import RateLimit, log_limited
from lensbus.runtime import Runtime
from lensbus.schemas import FrameEnvelope
from lensbus.waiting import sleep_unless_stopped
from lensbus_capture import metrics
from lensbus_capture.config import CaptureSettings
from lensbus_capture.encoding import (
    Encoded,
    encode_for_model,
    encode_frame,
    envelope,
    model_size,
    output_size,
    scale_frame,
)
from lensbus_capture.sources import Source, SourceError

log = logging.getLogger(__name__)

# Unsent frame bytes in the NATS client above which a new frame is dropped (nats-py's own
# default pending size: where it forces a flush).
MAX_PENDING_BYTES = 2 * 1024 * 1024


class Capture:
    """Reads frames from a source and publishes them; newest-first, never queued."""

    def __init__(self, settings: CaptureSettings, source: Source, rt: Runtime) -> None:
        self.s = settings
        self.source = source
        self.rt = rt
        self.subject = rt.subjects.frames(settings.camera)
        self.model_subject = rt.subjects.model_frames(settings.camera)
        self.seq = 0
        self.captured = 0
        self.published = 0
        self.dropped = 0
        self._limit = RateLimit(60.0)

    def counters(self) -> dict[str, float]:
        return {"captured": self.captured, "published": self.published, "dropped": self.dropped}

    def _read_and_encode(self, loop: asyncio.AbstractEventLoop) -> tuple[int, int, Encoded] | None:
        """(seq, capture_ns, device-stream JPEG) of the next frame, None at the source's end.

        One hop to a worker thread per frame: the read blocks and the encodes are CPU work,
        and all release the GIL, so the event loop stays free for NATS.  With a model stream,
        its small copy is published from here as soon as it is encoded: inference starts on
        the frame while the device stream's larger JPEG is still being encoded.
        """
        t0 = time.perf_counter()
        image = self.source.read()
        if image is None:
            return None
        capture_ns = time.time_ns()
        metrics.READ_SECONDS.observe(time.perf_counter() - t0)
        h, w = image.shape[:2]
        out_w, out_h = output_size(w, h, self.s.width, self.s.height)
        scaled = None
        seq = self.seq
        self.seq += 1
        if self.s.model_height:
            # Made from the image as read unless the device stream shrinks it: one resample
            # instead of two, and no wait for an upscale the model does not need.
            if h > out_h:
                scaled = scale_frame(image, self.s.width, self.s.height)
            base = image if scaled is None else scaled
            size = model_size(out_w, out_h, self.s.model_height)
            small = encode_for_model(base, size, self.s.jpeg_quality)
            msg = envelope(self.s.camera, seq, capture_ns, small, (out_w, out_h))
            asyncio.run_coroutine_threadsafe(self._publish(self.model_subject, msg), loop)
        if scaled is None:
            scaled = scale_frame(image, self.s.width, self.s.height)
        return seq, capture_ns, encode_frame(scaled, None, None, self.s.jpeg_quality)

    def _drop(self, reason: str, detail: str = "") -> None:
        self.dropped += 1
        metrics.FRAMES_DROPPED.labels(reason).inc()
        log_limited(
            log, self._limit, reason, logging.WARNING, "dropping frames (%s) %s", reason, detail
        )

    async def _publish(self, subject: str, msg: FrameEnvelope) -> bool:
        """Publish one frame message now, or drop it (never queued); True if sent."""
        if not self.rt.bus.connected:
            # Never queue frames while NATS is away: a late frame is worth nothing.
            self._drop("nats_down")
            return False
        if self.rt.nc.pending_data_size > MAX_PENDING_BYTES:
            # Nor behind a stalled connection: the server holds back a producer whose
            # consumers are slow, and nats-py then keeps every later publish in memory
            # (measured: capture's RSS stepped up ~10 MB under overload).
            self._drop("backpressure")
            return False
        try:
            await self.rt.nc.publish(subject, encode(msg))
        except Exception as exc:  # buffer full, connection closing: drop and go on
            self._drop("publish_error", f"{type(exc).__name__}: {exc}")
            return False
        return True

    async def _reopen(self, cause: SourceError) -> None:
        """Reopen a live source with doubling back-off until it works or we stop."""
        metrics.SOURCE_UP.set(0)
        self.rt.set_state("degraded", f"source lost: {cause}")
        delay = 0.5
        while not self.rt.stop.is_set():
            await asyncio.to_thread(self.source.close)
            if await sleep_unless_stopped(self.rt.stop, delay):
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
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.s.fps
        next_t = time.monotonic()
        while not self.rt.stop.is_set():
            try:
                item = await asyncio.to_thread(self._read_and_encode, loop)
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
            seq, capture_ns, enc = item
            metrics.ENCODE_SECONDS.observe(enc.encode_s)
            if await self._publish(self.subject, envelope(self.s.camera, seq, capture_ns, enc)):
                self.published += 1
                metrics.FRAMES_PUBLISHED.inc()
            # Pace to the fps cap on a fixed schedule; after a stall, start a new schedule
            # instead of bursting to catch up.
            next_t += interval
            delay = next_t - time.monotonic()
            if delay > 0:
                await sleep_unless_stopped(self.rt.stop, delay)
            elif delay < -interval:
                next_t = time.monotonic()
        return 0
