"""One camera's capture: open the source (retried with back-off), take a frame, encode it
(and its model-stream copy), publish it now or drop it, pace to the fps cap.

A live source is drained by its reader thread (``reader.py``) and each tick takes the newest
frame; a file or folder is read frame by frame at its pace.  What the camera is doing is
reported as a :class:`CameraState` through ``on_state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from lensbus import metrics as shared_metrics
from lensbus.codec import encode
from lensbus.demand import Leases, parse_want
from lensbus.errors import DecodeError
from lensbus.logs import RateLimit, log_limited
from lensbus.runtime import Runtime
from lensbus.schemas import FrameEnvelope
from lensbus.schemas.camera import CameraConfig, CameraState, CameraStateName
from lensbus.waiting import sleep_unless_stopped
from lensbus_capture import metrics
from lensbus_capture.encoding import (
    Encoded,
    encode_for_model,
    encode_frame,
    envelope,
    model_size,
    output_size,
    scale_frame,
)
from lensbus_capture.reader import LiveReader
from lensbus_capture.sources import Source, SourceError, VideoSource, make_source

log = logging.getLogger(__name__)

# Unsent frame bytes in the NATS client above which a new frame is dropped (nats-py's own
# default pending size: where it forces a flush).
MAX_PENDING_BYTES = 2 * 1024 * 1024
FIRST_RETRY_S = 0.5


def unsent_bytes(nc: Any) -> int:
    """Bytes published but not yet taken by the kernel: nats-py's pending buffer and its
    asyncio transport's write buffer.

    nats-py hands its buffer to the transport with ``writelines`` and waits in ``drain()``.
    On CPython 3.12.0-3.12.8 and 3.13.0-3.13.1 ``writelines`` never pauses the protocol
    (CPython gh-127655), so ``drain()`` returns at once and a stalled server's backlog grows
    in the transport instead (measured on 3.13.0: 30 MB in 3 s, nats-py's pending 0).  The
    transport is private to nats-py: where it is not found only the pending buffer counts.
    """
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    transport = getattr(writer, "transport", None)
    buffered = transport.get_write_buffer_size() if transport is not None else 0
    return int(nc.pending_data_size) + int(buffered)


class Capture:
    """Reads one camera's frames and publishes them; newest-first, never queued."""

    def __init__(
        self,
        config: CameraConfig,
        rt: Runtime,
        reopen_max_s: float,
        on_state: Callable[[CameraState], None],
        seq: int = 0,
        source: Source | None = None,
    ) -> None:
        """``seq``: the first sequence number (a restarted camera continues its own);
        ``source``: one already open (the single-camera service opens it before starting)."""
        self.c = config
        self.rt = rt
        self.reopen_max_s = reopen_max_s
        self.on_state = on_state
        self.stop = asyncio.Event()
        self.source = source or make_source(config)
        self._open = source is not None
        self.reader: LiveReader | None = None
        self.subject = rt.subjects.frames(config.id)
        self.model_subject = rt.subjects.model_frames(config.id)
        self.seq = seq
        self.captured = self.published = self.dropped = self.skipped = 0
        # Who wants the device stream (lensbus.demand); with a model stream and nobody
        # wanting it, only an idle frame now and then is encoded for it.
        self.leases = Leases()
        self._last_device = float("-inf")
        self.state: CameraState | None = None
        self._limit = RateLimit(60.0)
        cam = config.id
        self._m_captured = metrics.FRAMES_CAPTURED.labels(cam)
        self._m_published = metrics.FRAMES_PUBLISHED.labels(cam)
        self._m_read = metrics.READ_SECONDS.labels(cam)
        self._m_encode = metrics.ENCODE_SECONDS.labels(cam)
        self._m_up = metrics.SOURCE_UP.labels(cam)
        self._m_reopens = metrics.SOURCE_REOPENS.labels(cam)
        self._m_model_published = metrics.MODEL_FRAMES_PUBLISHED.labels(cam)
        self._m_skipped = metrics.DEVICE_FRAMES_SKIPPED.labels(cam)
        self._m_wanted = metrics.DEVICE_STREAM_WANTED.labels(cam)

    def request_stop(self) -> None:
        """Stop soon: a reader waiting for a frame is woken at once."""
        self.stop.set()
        if self.reader is not None:
            self.reader.close()

    def counters(self) -> dict[str, float]:
        return {
            "captured": self.captured,
            "published": self.published,
            "dropped": self.dropped,
            "skipped": self.skipped,
        }

    async def _on_want(self, msg: Any) -> None:
        try:
            want = parse_want(msg.data)
        except DecodeError as exc:
            shared_metrics.MESSAGES_REJECTED.labels(exc.reason).inc()
            log_limited(log, self._limit, "want", logging.WARNING, "%s: %s", msg.subject, exc)
            return
        if self.leases.grant(self.c.id, want.for_s):
            log.info("camera %s: device stream wanted (%s)", self.c.id, want.by or "a consumer")

    def device_frame_due(self) -> bool:
        """Whether this frame goes on the device stream: always without a model stream
        (inference reads it) or with ``device_stream: always``; else while someone wants it,
        or as the idle frame."""
        c = self.c
        every = not c.model_height or c.device_stream == "always" or self.leases.wanted(c.id)
        self._m_wanted.set(1 if every else 0)
        if every:
            return True
        return c.idle_fps > 0 and time.monotonic() - self._last_device >= 1.0 / c.idle_fps

    def _report(self, state: CameraStateName, reason: str = "") -> None:
        if self.state is not None and (self.state.state, self.state.reason) == (state, reason):
            return
        self.state = CameraState(
            camera=self.c.id,
            state=state,
            reason=reason,
            instance=self.rt.settings.instance,
            node=self.c.node,
            since_ns=time.time_ns(),
            frames=self.published,
        )
        self.on_state(self.state)

    async def run(self) -> int:
        """Capture until stopped (0), the end of a file or folder (0) or its failure (1)."""
        delay, lost = FIRST_RETRY_S, ""
        want = self.rt.subjects.frames_wanted(self.c.id)
        want_sub = await self.rt.nc.subscribe(want, cb=self._on_want)
        try:
            while not self.stop.is_set():
                if not self._open:
                    if await self._try_open(lost):
                        delay = FIRST_RETRY_S
                    elif await sleep_unless_stopped(self.stop, delay):
                        break
                    else:
                        delay = min(delay * 2, self.reopen_max_s)
                        continue
                code, lost = await self._stream()
                if code is not None:
                    return code
                await self._close()
                if await sleep_unless_stopped(self.stop, FIRST_RETRY_S):
                    break
        finally:
            with contextlib.suppress(Exception):  # the connection may be closing
                await want_sub.unsubscribe()
            await self._close()
            self._m_up.set(0)
            if self.stop.is_set():
                self._report("stopped")
        return 0

    async def _try_open(self, lost: str) -> bool:
        """Open the source; False (state retrying, with the reason) if it cannot be."""
        if self.state is None:
            self._report("opening")
        else:
            self._m_reopens.inc()
        try:
            await asyncio.to_thread(self.source.open)
        except SourceError as exc:
            reason = f"{lost}; {exc}" if lost else str(exc)
            log_limited(log, self._limit, "open", logging.WARNING, "%s; retrying", reason)
            self._report("retrying", reason)
            return False
        if lost:
            log.info("source %s reopened", self.source.name)
        self._open = True
        return True

    async def _close(self) -> None:
        if self.reader is not None:
            reader, self.reader = self.reader, None
            # A grab returns within a frame, or at the source's read timeout.
            wait_s = self.c.options.read_timeout_s + 1.0
            if not await asyncio.to_thread(reader.close, wait_s):
                log.warning("camera %s: reader still blocked in the source", self.c.id)
        if self._open:
            self._open = False
            await asyncio.to_thread(self.source.close)

    def _next_frame(self) -> tuple[np.ndarray, int] | None:
        """(image, capture time) of the next frame to publish, None at a file's end."""
        if self.reader is not None:
            before = self.reader.grabbed
            got = self.reader.take(self.c.options.read_timeout_s)
            grabbed = self.reader.grabbed - before
            self.captured += grabbed
            self._m_captured.inc(grabbed)
            self._m_read.observe(got.retrieve_s)
            return got.image, got.capture_ns
        t0 = time.perf_counter()
        image = self.source.read()
        if image is None:
            return None
        capture_ns = time.time_ns()
        self._m_read.observe(time.perf_counter() - t0)
        self.captured += 1
        self._m_captured.inc()
        return image, capture_ns

    def _take_and_encode(
        self, loop: asyncio.AbstractEventLoop
    ) -> tuple[int, int, Encoded | None] | None:
        """(seq, capture_ns, device-stream JPEG or None when not due: see
        :meth:`device_frame_due`) of the next frame, None at the source's end.

        One hop to a worker thread per frame: the read blocks and the encodes are CPU work,
        and all release the GIL, so the event loop stays free for NATS.  With a model stream,
        its small copy is published from here as soon as it is encoded: inference starts on
        the frame while the device stream's larger JPEG is still being encoded.
        """
        frame = self._next_frame()
        if frame is None:
            return None
        image, capture_ns = frame
        c = self.c
        h, w = image.shape[:2]
        out_w, out_h = output_size(w, h, c.width, c.height)
        scaled = None
        seq = self.seq
        self.seq += 1
        if c.model_height:
            # Made from the image as read unless the device stream shrinks it: one resample
            # instead of two, and no wait for an upscale the model does not need.
            if h > out_h:
                scaled = scale_frame(image, c.width, c.height)
            base = image if scaled is None else scaled
            size = model_size(out_w, out_h, c.model_height)
            small = encode_for_model(base, size, c.jpeg_quality)
            msg = envelope(c.id, seq, capture_ns, small, (out_w, out_h))
            asyncio.run_coroutine_threadsafe(self._publish_model(msg), loop)
        if not self.device_frame_due():
            return seq, capture_ns, None
        self._last_device = time.monotonic()
        if scaled is None:
            scaled = scale_frame(image, c.width, c.height)
        return seq, capture_ns, encode_frame(scaled, None, None, c.jpeg_quality)

    def _drop(self, reason: str, detail: str = "") -> None:
        self.dropped += 1
        metrics.FRAMES_DROPPED.labels(self.c.id, reason).inc()
        log_limited(
            log,
            self._limit,
            reason,
            logging.WARNING,
            "camera %s: dropping frames (%s) %s",
            self.c.id,
            reason,
            detail,
        )

    async def _publish_model(self, msg: FrameEnvelope) -> None:
        if await self._publish(self.model_subject, msg):
            self._m_model_published.inc()

    async def _publish(self, subject: str, msg: FrameEnvelope) -> bool:
        """Publish one frame message now, or drop it (never queued); True if sent."""
        if not self.rt.bus.connected:
            # Never queue frames while NATS is away: a late frame is worth nothing.
            self._drop("nats_down")
            return False
        if unsent_bytes(self.rt.nc) > MAX_PENDING_BYTES:
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

    async def _stream(self) -> tuple[int | None, str]:
        """Publish from the open source until stopped or it ends: (exit code, "") or, a live
        source lost, (None, why)."""
        if self.source.live and isinstance(self.source, VideoSource):
            self.reader = LiveReader(self.source.detach(), self.source.name)
        self._m_up.set(1)
        self._report("running")
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.c.fps
        next_t = time.monotonic()
        while not self.stop.is_set():
            try:
                item = await asyncio.to_thread(self._take_and_encode, loop)
            except SourceError as exc:
                if self.stop.is_set():
                    break
                self._m_up.set(0)
                if not self.source.live:
                    log.error("%s", exc)
                    self._report("ended", str(exc))
                    return 1, ""
                log.warning("%s; reopening", exc)
                self._report("retrying", f"source lost: {exc}")
                return None, f"source lost: {exc}"
            if item is None:
                log.info("end of %s after %d frames", self.source.name, self.captured)
                self._m_up.set(0)
                self._report("ended")
                return 0, ""
            seq, capture_ns, enc = item
            if enc is None:
                self.skipped += 1
                self._m_skipped.inc()
            else:
                self._m_encode.observe(enc.encode_s)
                if await self._publish(self.subject, envelope(self.c.id, seq, capture_ns, enc)):
                    self.published += 1
                    self._m_published.inc()
            # Pace to the fps cap on a fixed schedule; after a stall, start a new schedule
            # instead of bursting to catch up.
            next_t += interval
            delay = next_t - time.monotonic()
            if delay > 0:
                await sleep_unless_stopped(self.stop, delay)
            elif delay < -interval:
                next_t = time.monotonic()
        return 0, ""
