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
from lensbus_inference.handlers import Mailbox, Pending, Rejected, process
from lensbus_inference.model import LoadedModel, ModelLoadError, load_model

log = logging.getLogger(__name__)

EXIT_MODEL = 4  # the model could not be loaded at start


class _NoModel(Exception):
    """A frame came before any model was in service: dropped and counted, not rejected."""


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
    """Takes the newest frames per camera from the mailbox (``queue_depth``) and runs each
    off the event loop; a frame that newer ones push out before its turn is dropped as
    stale."""

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

    async def _serve(self, item: Pending) -> Result:
        """Decode and run one frame in one hop to a worker thread; a swap lands between
        frames.  (Decoding the next frame while the model ran this one was tried and
        measured: on 2 cores the decode thread slowed the model's two threads more than it
        hid, 18.2 fps with it against 19.8 without, ONNX at 1080p.)"""
        async with self.busy:
            model = self.model
            if model is None:  # following a group that has no loadable model yet
                raise _NoModel
            return await asyncio.to_thread(
                process, item, model, self.s.instance, self.s.max_frame_bytes,
                self.s.reduced_decode,
            )  # fmt: skip

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
            if settings.stream == "model":
                one, every = rt.subjects.model_frames, rt.subjects.all_model_frames
            else:
                one, every = rt.subjects.frames, rt.subjects.all_frames
            subs = [
                await rt.nc.subscribe(s, queue=settings.queue_group, cb=worker.on_frame)
                for s in ([one(c) for c in cams] if cams else [every()])
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
