"""The per-frame work of inference: frame message in, result out. No I/O set-up here."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lensbus.codec import decode
from lensbus.errors import DecodeError, ImageError, Rejected
from lensbus.images import MAX_PIXELS, decode_jpeg, reduction_for
from lensbus.schemas import FrameEnvelope, Result, StageTiming, Timings
from lensbus_inference import metrics
from lensbus_inference.cascade import Cascade, run_stage
from lensbus_inference.mailbox import Pending
from lensbus_inference.model import LoadedModel

# A large frame that capture encoded in strips is decoded in this many strips at once when it
# is decoded at reduced scale (lensbus.images): the same pixels, in about half the time.
DECODE_THREADS = min(2, os.cpu_count() or 1)


@dataclass(frozen=True)
class Plan:
    """The group's pipeline as inference runs it: the primary stage's name, the classify
    stages in service, and whether results go to analytics (a track stage)."""

    primary: str = "model"
    cascades: Sequence[Cascade] = field(default_factory=tuple)
    analytics: bool = False


@dataclass(frozen=True, eq=False)
class DecodedFrame:
    """A frame decoded and checked, ready for the model."""

    env: FrameEnvelope
    image: np.ndarray
    factor: int  # the JPEG reduction it was decoded at
    arrived: float  # perf_counter() stamps: message arrival, decode start and end
    started: float
    finished: float


def decode_frame(
    item: Pending,
    input_size: tuple[int, int],
    max_bytes: int,
    reduced: bool,
    threads: int = DECODE_THREADS,
    max_pixels: int = MAX_PIXELS,
) -> DecodedFrame:
    """Unpack the frame message and decode its JPEG at the largest reduction that still
    leaves ``input_size`` (the model's input) pixels, in ``threads`` strips where the JPEG
    allows it.  The JPEG's own header must say the envelope's size and at most
    ``max_pixels`` before anything is decoded (the scale is chosen from the envelope).
    Raises :class:`~lensbus.errors.Rejected`."""
    t0 = time.perf_counter()
    if len(item.data) > max_bytes:
        raise Rejected("too_large", f"frame message of {len(item.data)} bytes > {max_bytes}")
    try:
        env = decode(item.data, FrameEnvelope)
    except DecodeError as exc:
        raise Rejected(exc.reason, str(exc)) from None
    if item.camera and env.camera != item.camera:
        raise Rejected(
            "camera_mismatch", f"frame of {env.camera!r} on the subject of {item.camera!r}"
        )
    factor = reduction_for(env.width, env.height, *input_size) if reduced else 1
    try:
        size = (env.width, env.height)
        image = decode_jpeg(env.data, factor, threads, size=size, max_pixels=max_pixels)
    except ImageError as exc:
        raise Rejected(exc.reason, f"frame {env.camera}#{env.seq}: {exc}") from None
    h, w = image.shape[:2]
    # The header said the envelope's size; libjpeg's output must agree.
    if (w, h) != (math.ceil(env.width / factor), math.ceil(env.height / factor)):
        raise Rejected(
            "size_mismatch",
            f"frame {env.camera}#{env.seq} says {env.width}x{env.height}, "
            f"JPEG is {w * factor}x{h * factor}",
        )
    return DecodedFrame(env, image, factor, item.arrived, t0, time.perf_counter())


def run_model(
    frame: DecodedFrame, model: LoadedModel, instance: str, plan: Plan | None = None
) -> Result:
    """Run a decoded frame through the model (and the plan's classify stages, on crops of
    the same decoded frame) and describe the result."""
    t0 = time.perf_counter()
    # Queue: every wait between arrival and the model, before and after the decode.
    queue_s = (frame.started - frame.arrived) + (t0 - frame.finished)
    env = frame.env
    width, height = env.frame_size  # a model-stream frame's boxes are in full-frame pixels
    out = model.run(frame.image, width, height)
    detections, stages = out.detections, []
    if plan is not None:
        model_s = out.preprocess_s + out.compute_s + out.postprocess_s
        metrics.PIPELINE_STAGE_SECONDS.labels(plan.primary, "model").observe(model_s)
        m = model.manifest
        stages.append(
            StageTiming(
                stage=plan.primary,
                kind="model",
                model=f"{m.name}:{m.version}",
                ms=model_s * 1000.0,
                items=len(detections),
            )
        )
        for cascade in plan.cascades:
            detections, timing = run_stage(frame.image, detections, cascade)
            stages.append(timing)
    return Result(
        camera=env.camera,
        seq=env.seq,
        capture_ns=env.capture_ns,
        result_ns=time.time_ns(),
        width=width,
        height=height,
        model=model.ref,
        task=model.manifest.task,
        instance=instance,
        detections=detections,
        classes=out.classes,
        segments=out.segments,
        mask_png=out.mask_png,
        timings=Timings(
            queue=max(0.0, queue_s),
            decode=frame.finished - frame.started,
            preprocess=out.preprocess_s,
            compute=out.compute_s,
            postprocess=out.postprocess_s,
        ),
        stages=stages,
    )


def process(
    item: Pending,
    model: LoadedModel,
    instance: str,
    max_bytes: int,
    reduced: bool,
    threads: int = DECODE_THREADS,
    max_pixels: int = MAX_PIXELS,
    plan: Plan | None = None,
) -> Result:
    """Decode, run and describe one frame. Raises :class:`~lensbus.errors.Rejected` for bad
    input."""
    frame = decode_frame(item, model.input_size, max_bytes, reduced, threads, max_pixels)
    return run_model(frame, model, instance, plan)
