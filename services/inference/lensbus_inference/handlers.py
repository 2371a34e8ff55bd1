"""The per-frame work of inference: frame message in, result out. No I/O set-up here."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from lensbus.codec import DecodeError, decode
from lensbus.images import ImageError, decode_jpeg, reduction_for
from lensbus.schemas import FrameEnvelope, ModelRef, Result, Timings
from lensbus_inference.model import LoadedModel


class Rejected(Exception):
    """A frame message that cannot be processed; ``reason`` labels the metric."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Pending:
    """A frame message waiting in the mailbox, with when it arrived."""

    data: bytes
    arrived: float  # time.perf_counter()


class Mailbox:
    """The newest frame per camera: a frame that arrives while the model is busy replaces
    the one waiting for that camera (the replaced one is returned so it can be counted)."""

    def __init__(self) -> None:
        self._waiting: OrderedDict[str, Pending] = OrderedDict()

    def put(self, camera: str, item: Pending) -> Pending | None:
        replaced = self._waiting.pop(camera, None)
        # Re-inserted at the end: cameras are served in the order their frames came in.
        self._waiting[camera] = item
        return replaced

    def take(self) -> tuple[str, Pending] | None:
        """The camera that has waited longest and its newest frame."""
        if not self._waiting:
            return None
        return self._waiting.popitem(last=False)

    def __len__(self) -> int:
        return len(self._waiting)


def process(
    item: Pending, model: LoadedModel, instance: str, max_bytes: int, reduced: bool
) -> Result:
    """Decode, run and describe one frame. Raises :class:`Rejected` for bad input."""
    t0 = time.perf_counter()
    queue_s = t0 - item.arrived
    if len(item.data) > max_bytes:
        raise Rejected("too_large", f"frame message of {len(item.data)} bytes > {max_bytes}")
    try:
        env = decode(item.data, FrameEnvelope)
    except DecodeError as exc:
        raise Rejected(exc.reason, str(exc)) from None
    in_w, in_h = model.input_size
    factor = reduction_for(env.width, env.height, in_w, in_h) if reduced else 1
    try:
        image = decode_jpeg(env.data, factor)
    except ImageError as exc:
        raise Rejected("corrupt_image", f"frame {env.camera}#{env.seq}: {exc}") from None
    h, w = image.shape[:2]
    if (w, h) != (math.ceil(env.width / factor), math.ceil(env.height / factor)):
        raise Rejected(
            "size_mismatch",
            f"frame {env.camera}#{env.seq} says {env.width}x{env.height}, "
            f"JPEG is {w * factor}x{h * factor}",
        )
    decode_s = time.perf_counter() - t0
    out = model.run(image, env.width, env.height)
    m = model.manifest
    return Result(
        camera=env.camera,
        seq=env.seq,
        capture_ns=env.capture_ns,
        result_ns=time.time_ns(),
        width=env.width,
        height=env.height,
        model=ModelRef(name=m.name, version=m.version, framework=m.framework, device=model.device),
        task=m.task,
        instance=instance,
        detections=out.detections,
        classes=out.classes,
        segments=out.segments,
        mask_png=out.mask_png,
        timings=Timings(
            queue=queue_s,
            decode=decode_s,
            preprocess=out.preprocess_s,
            compute=out.compute_s,
            postprocess=out.postprocess_s,
        ),
    )
