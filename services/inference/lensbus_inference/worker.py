"""The worker: takes frames from the mailbox, runs them through the model in service, publishes
the results, and puts a new model in service between two frames."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator

from nats.aio.msg import Msg

from lensbus import metrics as shared_metrics
from lensbus.codec import encode
from lensbus.errors import LensbusError, Rejected
from lensbus.logs import RateLimit, log_limited
from lensbus.runtime import Runtime
from lensbus.schemas import Result
from lensbus.stored import ResultSender
from lensbus.waiting import wait_unless_stopped
from lensbus_inference import metrics
from lensbus_inference.config import InferenceSettings
from lensbus_inference.frames import Plan, process
from lensbus_inference.mailbox import Mailbox, Pending
from lensbus_inference.model import LoadedModel

log = logging.getLogger(__name__)

TURN_TRIES = 5  # frames a swap's step lets go first, waiting for a gap between frames


class NoModelInService(LensbusError):
    """A frame came before any model was in service: dropped and counted, not rejected."""


class Worker:
    """Takes the newest frames per camera from the mailbox (``queue_depth``) and runs each
    off the event loop; a frame that newer ones push out before its turn is dropped as
    stale."""

    def __init__(self, settings: InferenceSettings, rt: Runtime, model: LoadedModel | None) -> None:
        self.s = settings
        self.rt = rt
        self.model = model
        # The group's pipeline as run here (None: no pipeline, today's single model).
        self.plan: Plan | None = None
        # Held while a frame is in the model: a swap takes it, so it lands between frames.
        self.busy = asyncio.Lock()
        self.mailbox = Mailbox(settings.queue_depth)
        self.ready = asyncio.Event()
        self.received = 0
        self.processed = 0
        self.stale = 0
        self.rejected = 0
        self._limit = RateLimit(60.0)
        # A frame that arrives while the worker waits for work is the worker's at once: a
        # frame right behind it (a burst after a stall anywhere upstream) waits in the
        # mailbox instead of replacing it before the worker task has run.
        self._idle = False
        self._handoff: tuple[str, Pending] | None = None
        self.sender = ResultSender(rt.nc, settings.results_acked)

    def counters(self) -> dict[str, float]:
        return {
            "received": self.received,
            "processed": self.processed,
            "dropped_stale": self.stale,
            "rejected": self.rejected,
        }

    async def on_frame(self, msg: Msg) -> None:
        """NATS callback: only files the frame; all work happens in worker threads."""
        self.received += 1
        metrics.FRAMES_RECEIVED.inc()
        camera = self.rt.subjects.camera_of(msg.subject)
        item = Pending(msg.data, time.perf_counter(), camera)
        if self._idle:
            self._idle = False
            self._handoff = (camera, item)
        elif self.mailbox.put(camera, item) is not None:
            self.stale += 1
            metrics.FRAMES_DROPPED.labels("stale").inc()
        self.ready.set()

    # ---- serving -------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until stopped; the frame in hand is finished and published."""
        while not self.rt.stop.is_set():
            taken, self._handoff = self._handoff or self.mailbox.take(), None
            if taken is None:
                await self._wait_for_frames()
                continue
            result = await self._handle(taken[1])
            if result is not None:
                await self.publish(result)

    async def _wait_for_frames(self) -> None:
        self.ready.clear()
        self._idle = True
        await wait_unless_stopped(self.rt.stop, self.ready.wait())
        self._idle = False

    async def _handle(self, item: Pending) -> Result | None:
        """Run one frame; None when it gave no result (counted and logged here)."""
        metrics.BUSY.set(1)
        try:
            result = await self._serve(item)
        except NoModelInService:
            metrics.FRAMES_DROPPED.labels("no_model").inc()
            log_limited(
                log,
                self._limit,
                "no_model",
                logging.WARNING,
                "no model in service yet: dropping frames",
            )
            return None
        except Rejected as exc:
            self._reject(exc)
            return None
        except Exception as exc:  # a model that fails on one frame must not stop the service
            self._reject(Rejected("model_error", f"{type(exc).__name__}: {exc}"))
            return None
        finally:
            metrics.BUSY.set(0)
        self.processed += 1
        metrics.FRAMES_PROCESSED.inc()
        self._observe(result)
        return result

    async def _serve(self, item: Pending) -> Result:
        """Decode and run one frame in one hop to a worker thread; a swap lands between
        frames.  (Decoding the next frame while the model ran this one was tried and
        measured: on 2 cores the decode thread slowed the model's two threads more than it
        hid, 18.2 fps with it against 19.8 without, ONNX at 1080p.)"""
        async with self.busy:
            model, plan = self.model, self.plan
            if model is None:  # following a group that has no loadable model yet
                raise NoModelInService
            s = self.s
            return await asyncio.to_thread(
                process,
                item,
                model,
                s.instance,
                s.max_frame_bytes,
                s.reduced_decode,
                max_pixels=s.max_frame_pixels,
                plan=plan,
            )

    def _reject(self, exc: Rejected) -> None:
        self.rejected += 1
        shared_metrics.MESSAGES_REJECTED.labels(exc.reason).inc()
        log_limited(
            log,
            self._limit,
            exc.reason,
            logging.WARNING,
            "rejected a frame (%s): %s",
            exc.reason,
            exc,
        )

    def _observe(self, result: Result) -> None:
        t = result.timings
        for stage in ("queue", "decode", "preprocess", "compute", "postprocess"):
            metrics.STAGE_SECONDS.labels(stage).observe(getattr(t, stage))
        metrics.LATENCY_SECONDS.observe(max(0.0, result.latency_s))

    async def publish(self, result: Result) -> None:
        if not self.rt.bus.connected:
            metrics.FRAMES_DROPPED.labels("nats_down").inc()
            return
        # With a track stage, analytics owns the camera's results: it tracks and republishes.
        plan = self.plan
        subjects = self.rt.subjects
        try:
            if plan is not None and plan.analytics:  # not stored: analytics sends the result
                await self.rt.nc.publish(subjects.detections(result.camera), encode(result))
            else:
                await self.sender.send(
                    subjects.results(result.camera),
                    encode(result),
                    result.camera,
                    result.seq,
                    result.capture_ns,
                )
        except Exception as exc:
            metrics.FRAMES_DROPPED.labels("publish_error").inc()
            log_limited(
                log, self._limit, "publish", logging.WARNING, "result not published: %s", exc
            )
            return
        metrics.RESULTS_PUBLISHED.inc()

    # ---- swapping ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Hold the model for one step of a swap (a build, a warm-up run), between frames.

        Taken when no frame waits, where frames leave a gap (a few tries: a saturated
        camera never leaves one).
        """
        for _ in range(TURN_TRIES):
            await self.busy.acquire()
            if not len(self.mailbox) and self._handoff is None:
                break
            self.busy.release()
            await asyncio.sleep(0)  # the worker takes the waiting frame, then the lock
        else:
            await self.busy.acquire()
        try:
            yield
        finally:
            self.busy.release()

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """While a swap prepares its model: frames that arrive wait (``HOLD_SPARE`` more
        per camera than ``queue_depth``) instead of replacing each other, until the worker
        has caught up.  A download, an unpack and a load beside the model slow frames,
        and each warm-up step holds the model (MXNet's first run: two to four runs'
        compute, longer than a frame's interval): frames come late then, none is lost."""
        self.mailbox.hold()
        try:
            yield
        finally:
            self.mailbox.release()

    async def swap(self, new: LoadedModel) -> None:
        """Put ``new`` in service between two frames, then free the old model."""
        async with self.busy:
            old, self.model = self.model, new
            self.rt.model = new.ref
        metrics.set_model_info(new.ref, old.ref if old is not None else None)
        if old is not None:
            await asyncio.to_thread(old.close)

    async def set_plan(self, plan: Plan | None) -> None:
        """Put the pipeline's stages in service between two frames (the models they drop
        are the caller's to close)."""
        async with self.busy:
            self.plan = plan
