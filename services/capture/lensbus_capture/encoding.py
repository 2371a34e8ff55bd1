"""The per-frame pixel work of capture: resize to the output size (and the model stream's),
encode as JPEG, wrap in the frame message."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import cv2
import numpy as np

from lensbus.images import encode_jpeg
from lensbus.schemas import FrameEnvelope

# A large frame is JPEG-encoded in this many strips at once (lensbus.images): a 1080p frame
# takes ~5 ms on one core, ~3 ms on two.  The bytes are a standard baseline JPEG with a
# restart marker between the strips, which inference can decode in strips the same way.
ENCODE_THREADS = min(2, os.cpu_count() or 1)


@dataclass(frozen=True)
class Encoded:
    jpeg: bytes
    width: int
    height: int
    encode_s: float


def output_size(w: int, h: int, want_w: int | None, want_h: int | None) -> tuple[int, int]:
    """The size to publish: as configured, keeping the aspect ratio when one side is set."""
    if want_w and want_h:
        return want_w, want_h
    if want_w:
        return want_w, max(1, round(h * want_w / w))
    if want_h:
        return max(1, round(w * want_h / h)), want_h
    return w, h


def scale_frame(image: np.ndarray, want_w: int | None, want_h: int | None) -> np.ndarray:
    """The frame at the output size (area interpolation when shrinking), as published."""
    h, w = image.shape[:2]
    ow, oh = output_size(w, h, want_w, want_h)
    if (ow, oh) == (w, h):
        return image
    shrink = ow * oh < w * h
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(image, (ow, oh), interpolation=interpolation)


def model_size(out_w: int, out_h: int, model_height: int) -> tuple[int, int]:
    """The model stream's frame size for a device-stream frame of ``out_w`` x ``out_h``."""
    if model_height >= out_h:
        return out_w, out_h
    return max(1, round(out_w * model_height / out_h)), model_height


def shrink_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` at ``size``: averaged down by the largest whole factor, then linear for the
    rest.  One area resize by a fractional factor costs ~8 ms at 1080p; this ~1 ms."""
    h, w = image.shape[:2]
    if (w, h) == size:
        return image
    factor = min(w // size[0], h // size[1])
    if factor > 1:
        image = cv2.resize(image, (w // factor, h // factor), interpolation=cv2.INTER_AREA)
    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)


def encode_for_model(image: np.ndarray, size: tuple[int, int], quality: int) -> Encoded:
    """The model stream's copy of a frame: shrunk to ``size``, encoded on one thread (it is
    small, and the device stream's encode comes right after)."""
    small = shrink_to(image, size)
    t0 = time.perf_counter()
    jpeg = encode_jpeg(small, quality, 1)
    return Encoded(jpeg=jpeg, width=size[0], height=size[1], encode_s=time.perf_counter() - t0)


def encode_frame(
    image: np.ndarray, want_w: int | None, want_h: int | None, quality: int
) -> Encoded:
    """Resize (see :func:`scale_frame`) and JPEG-encode one BGR frame."""
    image = scale_frame(image, want_w, want_h)
    oh, ow = image.shape[:2]
    t0 = time.perf_counter()
    jpeg = encode_jpeg(image, quality, ENCODE_THREADS)
    return Encoded(jpeg=jpeg, width=ow, height=oh, encode_s=time.perf_counter() - t0)


def envelope(
    camera: str,
    seq: int,
    capture_ns: int,
    enc: Encoded,
    full_size: tuple[int, int] | None = None,
) -> FrameEnvelope:
    """The message for ``enc``; ``full_size``: the device-stream frame's (width, height),
    for a model-stream copy."""
    return FrameEnvelope(
        camera=camera,
        seq=seq,
        capture_ns=capture_ns,
        width=enc.width,
        height=enc.height,
        data=enc.jpeg,
        full_width=full_size[0] if full_size else None,
        full_height=full_size[1] if full_size else None,
    )
