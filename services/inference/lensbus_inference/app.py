"""Inference lifecycle: load the model, subscribe in the queue group, serve the mailbox."""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.msg import Msg

from lensbus import metrics as shared_metrics
from lensbus.codec import encode
from lensbus.logs import RateLimit, log_limited
from lensbus.modelpkg import PackageError, open_package
from lensbus.runtime import Runtime
from lensbus.schemas import ModelRef, Result
from lensbus_inference import metrics
from lensbus_inference.config import InferenceSettings
from lensbus_inference.deployment import Follower
from lensbus_inference.handlers import (
    DECODE_THREADS,
    Decoded,
    Mailbox,
    Pending,
    Rejected,
    decode_frame,
    fits,
    process,
    run_model,
)
from lensbus_inference.model import LoadedModel, ModelLoadError, load_model

log = logging.getLogger(__name__)

EXIT_MODEL = 4  # the model could not be loaded at start

# Decode the next frame while the model runs the current one.  Off: measured on the 2-core
# bench machine (bench/pipeline.py, ONNX 1080p, 1.25x the model's rate), the decode thread
# slows the model's own two threads more than it hides (18.2 fps with it, 19.8 without).
# Worth trying where the model leaves a core free (threads < cores).
DECODE_AHEAD = False
# The next frame's decode starts this many (typical) decode times before the model is
# expected to finish the current frame: enough to hide the decode behind the model while
# it runs on the same cores, little enough that a newer frame rarely replaces the decoded one.
PREFETCH_LEAD = 2.0
EMA = 0.2  # weight of the newest sample in the running model and decode times


class _NoModel(Exception):
    """A frame came before any model was in service: dropped and counted, not rejected."""


def _seen(fut: asyncio.Future[Decoded]) -> None:
    """Mark a decode's failure as seen: a bad frame replaced before its turn is only stale."""
    if not fut.cancelled():
        fut.exception()


def model_ref(model: LoadedModel) -> ModelRef:
    m = model.manifest
    return ModelRef(name=m.name, version=m.version, framework=m.framework, device=model.device)


def set_model_info(new: LoadedModel, old: LoadedModel | None = None) -> None:
    if old is not None:
        ref = model_ref(old)
        metrics.MODEL_INFO.labels(ref.name, ref.version, ref.framework, ref.device).set(0)
    ref = model_ref(new)
    metrics.MODEL_INFO.labels(ref.name, ref.version, ref.framework, ref.device).set(1)


def load(settings: InferenceSettings) -> LoadedModel | None:
    """Open, verify, load and warm up the configured local package (blocking)."""
    if settings.model is None:
        return None
    package = open_package(settings.model, max_bytes=settings.max_package_bytes)
    model = load_model(package, settings.device, settings.threads, settings.mask_png)
    model.warmup()
    return model


class Worker:
    """Takes the newest frame per camera from the mailbox and runs it off the event loop.

    With DECODE_AHEAD, while the model works on one frame the next frame's JPEG is decoded in
    another thread (timed to finish as the model does), so the decode overlaps the model
    instead of adding to it.  A frame that a newer one replaces before its turn is still
    dropped as stale, decoded or not.
    """

    def __init__(self, settings: InferenceSettings, rt: Runtime, model: LoadedModel | None) -> None:
        self.s = settings
        self.rt = rt
        self.model = model
        # Held while a frame is in the model: a swap takes it, so it lands between frames.
        self.busy = asyncio.Lock()
        self.mailbox = Mailbox(settings.queue_depth)
        self.ready = asyncio.Event()
        self.received = 0
        self.processed = 0
        self.stale = 0
        self.rejected = 0
        self._limit = RateLimit(60.0)
        self._model_started: float | None = None  # perf_counter() while a frame is in the model
        self._model_s = 0.0  # running estimates (seconds) of a frame in the model, a decode
        self._decode_s = 0.0
        self._prefetched_for: float | None = None  # _model_started of the last decode ahead
        self._prefetch_timer: asyncio.TimerHandle | None = None
        # A frame that arrives while the worker waits for work is the worker's at once: a
        # frame right behind it (a burst after a stall anywhere upstream) waits in the
        # mailbox instead of replacing it before the worker task has run.
        self._idle = False
        self._handoff: tuple[str, Pending] | None = None

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
        item = Pending(msg.data, time.perf_counter())
        if self._idle:
            self._idle = False
            self._handoff = (camera, item)
        elif self.mailbox.put(camera, item) is not None:
            self.stale += 1
            metrics.FRAMES_DROPPED.labels("stale").inc()
        self.ready.set()
        self._prefetch()

    # ---- decoding the next frame while the model runs ------------------------------------

    def _decode(
        self, item: Pending, model: LoadedModel, threads: int = DECODE_THREADS
    ) -> asyncio.Future[Decoded]:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(
            None,
            decode_frame,
            item,
            model.input_size,
            self.s.max_frame_bytes,
            self.s.reduced_decode,
            threads,
        )
        item.decoded = fut
        return fut

    def _prefetch(self) -> None:
        """Start decoding the frame that is served next, if the model is busy and due to
        finish within about two decode times (later: a timer calls again).  One such decode
        per frame in the model: if a newer frame replaces the decoded one, the newer one is
        decoded when the model is free, so an overloaded instance wastes at most one decode
        per frame it serves."""
        model = self.model
        if not DECODE_AHEAD or self._model_started is None or model is None:
            return  # idle: run() takes the frame and decodes it at once
        if self._prefetched_for == self._model_started:
            return
        item = self.mailbox.peek()
        if item is None or item.decoded is not None:
            return
        due = self._model_started + self._model_s - PREFETCH_LEAD * self._decode_s
        delay = due - time.perf_counter()
        if delay > 0.001:
            if self._prefetch_timer is None:
                self._prefetch_timer = asyncio.get_running_loop().call_later(
                    delay, self._prefetch_due
                )
            return
        self._prefetched_for = self._model_started
        # One thread: the model has the cores, and the decode only has to end before it.
        self._decode(item, model, threads=1).add_done_callback(_seen)

    def _prefetch_due(self) -> None:
        self._prefetch_timer = None
        self._prefetch()

    # ---- serving -------------------------------------------------------------------------

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

    def _learn(self, model_s: float, decode_s: float) -> None:
        if self._model_s == 0.0:
            self._model_s, self._decode_s = model_s, decode_s
        else:
            self._model_s += EMA * (model_s - self._model_s)
            self._decode_s += EMA * (decode_s - self._decode_s)

    async def _serve(self, item: Pending) -> Result:
        """Run one frame: the decode started ahead if there was one, else decode and model
        in one hop to a worker thread."""
        frame: Decoded | None = None
        if item.decoded is not None:
            frame = await item.decoded  # raises Rejected for a bad frame
        async with self.busy:  # a swap lands between frames
            model = self.model
            if model is None:  # following a group that has no loadable model yet
                raise _NoModel
            if frame is not None and not fits(frame, model, self.s.reduced_decode):
                frame = None  # decoded for the model a swap just replaced
            t0 = time.perf_counter()
            # when the model itself starts, for the next frame's decode ahead
            self._model_started = t0 + (0.0 if frame else self._decode_s)
            try:
                self._prefetch()
                if frame is None:
                    result = await asyncio.to_thread(
                        process,
                        item,
                        model,
                        self.s.instance,
                        self.s.max_frame_bytes,
                        self.s.reduced_decode,
                    )
                else:
                    result = await asyncio.to_thread(run_model, frame, model, self.s.instance)
            finally:
                self._model_started = None
        decode_s = result.timings.decode
        self._learn(time.perf_counter() - t0 - (0.0 if frame else decode_s), decode_s)
        return result

    async def run(self) -> None:
        """Serve until stopped; the frame in hand is finished and published."""
        while not self.rt.stop.is_set():
            taken, self._handoff = self._handoff or self.mailbox.take(), None
            if taken is None:
                self.ready.clear()
                self._idle = True
                stop = asyncio.ensure_future(self.rt.stop.wait())
                ready = asyncio.ensure_future(self.ready.wait())
                await asyncio.wait({stop, ready}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                ready.cancel()
                self._idle = False
                continue
            _, item = taken
            metrics.BUSY.set(1)
            try:
                result = await self._serve(item)
            except _NoModel:
                metrics.FRAMES_DROPPED.labels("no_model").inc()
                log_limited(
                    log,
                    self._limit,
                    "no_model",
                    logging.WARNING,
                    "no model in service yet: dropping frames",
                )
                continue
            except Rejected as exc:
                self._reject(exc)
                continue
            except Exception as exc:  # a model that fails on one frame must not stop the service
                self._reject(Rejected("model_error", f"{type(exc).__name__}: {exc}"))
                continue
            finally:
                metrics.BUSY.set(0)
            self.processed += 1
            metrics.FRAMES_PROCESSED.inc()
            self._observe(result)
            await self.publish(result)
        if self._prefetch_timer is not None:
            self._prefetch_timer.cancel()

    async def swap(self, new: LoadedModel) -> None:
        """Put ``new`` in service between two frames, then free the old model."""
        async with self.busy:
            old, self.model = self.model, new
            self.rt.model = model_ref(new)
        set_model_info(new, old)
        if old is not None:
            await asyncio.to_thread(old.close)

    async def publish(self, result: Result) -> None:
        if not self.rt.bus.connected:
            metrics.FRAMES_DROPPED.labels("nats_down").inc()
            return
        try:
            await self.rt.nc.publish(self.rt.subjects.results(result.camera), encode(result))
        except Exception as exc:
            metrics.FRAMES_DROPPED.labels("publish_error").inc()
            log_limited(
                log, self._limit, "publish", logging.WARNING, "result not published: %s", exc
            )
            return
        metrics.RESULTS_PUBLISHED.inc()


async def run(settings: InferenceSettings) -> int:
    try:
        model = await asyncio.to_thread(load, settings)
    except (ModelLoadError, PackageError) as exc:
        log.error("cannot load model %s: %s", settings.model, exc)
        return EXIT_MODEL
    if model is not None:
        set_model_info(model)
        ref = model_ref(model)
        log.info("serving %s:%s (%s on %s)", ref.name, ref.version, ref.framework, ref.device)
    worker: Worker | None = None
    try:
        async with Runtime(settings, counters=lambda: worker.counters() if worker else {}) as rt:
            if rt.bus.nc is None:  # stopped before NATS was reachable
                return 0
            worker = Worker(settings, rt, model)
            busy = worker.busy
            rt.model = model_ref(model) if model else None
            tasks = [asyncio.create_task(worker.run(), name="worker")]
            if settings.group is not None:
                rt.detail["group"] = settings.group
                follower = Follower(
                    settings,
                    rt,
                    lambda: worker.model if worker else None,
                    worker.swap,
                    lambda: busy,  # warm-up runs take a frame's turn
                )
                tasks.append(asyncio.create_task(follower.run(), name="follower"))
            cams = settings.camera_list
            subs = [
                await rt.nc.subscribe(s, queue=settings.queue_group, cb=worker.on_frame)
                for s in (
                    [rt.subjects.frames(c) for c in cams] if cams else [rt.subjects.all_frames()]
                )
            ]
            rt.set_state("running")
            await rt.stop.wait()
            # Stop taking frames, then let the worker finish the frame in hand.
            for sub in subs:
                await sub.unsubscribe()
            await asyncio.gather(*tasks)
        return 0
    finally:
        current = worker.model if worker else model
        if current is not None:
            await asyncio.to_thread(current.close)
