"""Inference lifecycle: load the model, subscribe in the queue group, serve the mailbox.

Only the wiring lives here (settings -> load -> Runtime -> subscribe -> wait -> drain); the
work is in :mod:`~lensbus_inference.worker` (frames in, results out, swaps) and
:mod:`~lensbus_inference.deployment` (following a group's desired model).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from lensbus.errors import ModelLoadError, PackageError
from lensbus.modelpkg import open_package
from lensbus.runtime import Runtime
from lensbus_inference import metrics
from lensbus_inference.config import InferenceSettings
from lensbus_inference.deployment import Follower
from lensbus_inference.model import LoadedModel, load_model
from lensbus_inference.stages import StagesFollower
from lensbus_inference.worker import Worker

log = logging.getLogger(__name__)

EXIT_MODEL = 4  # the model could not be loaded at start


def load(settings: InferenceSettings) -> LoadedModel | None:
    """Open, verify, load and warm up the configured local package (blocking)."""
    if settings.model is None:
        return None
    package = open_package(settings.model, max_bytes=settings.max_package_bytes)
    model = load_model(package, settings.device, settings.threads, settings.mask_png)
    model.warmup()
    return model


def _follower(settings: InferenceSettings, rt: Runtime, worker: Worker) -> Follower:
    return Follower(
        settings,
        rt,
        lambda: worker.model,
        worker.swap,
        worker.turn,  # builds and warm-up runs take a frame's turn
        worker.holding,  # frames wait, not replace each other, while a swap prepares
    )


async def _subscribe(
    settings: InferenceSettings, rt: Runtime, cb: Callable[[Msg], Awaitable[None]]
) -> list[Subscription]:
    """The configured cameras' frames (all cameras' without a list), in the queue group."""
    cams = settings.camera_list
    if settings.stream == "model":
        one, every = rt.subjects.model_frames, rt.subjects.all_model_frames
    else:
        one, every = rt.subjects.frames, rt.subjects.all_frames
    return [
        await rt.nc.subscribe(s, queue=settings.queue_group, cb=cb)
        for s in ([one(c) for c in cams] if cams else [every()])
    ]


async def run(settings: InferenceSettings) -> int:
    try:
        model = await asyncio.to_thread(load, settings)
    except (ModelLoadError, PackageError) as exc:
        log.error("cannot load model %s: %s", settings.model, exc)
        return EXIT_MODEL
    if model is not None:
        ref = model.ref
        metrics.set_model_info(ref)
        log.info("serving %s:%s (%s on %s)", ref.name, ref.version, ref.framework, ref.device)
    worker: Worker | None = None
    try:
        async with Runtime(settings, counters=lambda: worker.counters() if worker else {}) as rt:
            if rt.bus.nc is None:  # stopped before NATS was reachable
                return 0
            worker = Worker(settings, rt, model)
            rt.model = model.ref if model else None
            tasks = [asyncio.create_task(worker.run(), name="worker")]
            if settings.group is not None:
                rt.detail["group"] = settings.group
                follower = _follower(settings, rt, worker)
                tasks.append(asyncio.create_task(follower.run(), name="follower"))
                stages = StagesFollower(follower, worker)
                tasks.append(asyncio.create_task(stages.run(), name="stages"))
            subs = await _subscribe(settings, rt, worker.on_frame)
            rt.set_state("running")
            await rt.stop.wait()
            # Stop taking frames, then let the worker finish the frame in hand.
            for sub in subs:
                await sub.unsubscribe()
            await asyncio.gather(*tasks)
            await worker.sender.close()  # the acknowledgements still due, before the drain
        return 0
    finally:
        current = worker.model if worker else model
        if current is not None:
            await asyncio.to_thread(current.close)
        for cascade in worker.plan.cascades if worker and worker.plan else ():
            await asyncio.to_thread(cascade.model.close)
