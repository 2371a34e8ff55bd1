"""What every decoder is, the registry that collects them, and their shared helpers.

A decoder turns a model's raw outputs into detections, classes or segments.  It is built once
per model (:func:`decoder_for`), checks a set of raw outputs with :meth:`Decoder.check`
(warm-up uses it to refuse a model whose outputs do not fit) and turns outputs into
:class:`DecodedOutputs` with ``decoder(outputs, geometry, frame_w, frame_h)``.  Boxes are
computed in normalized coordinates of the model input, mapped to the frame through the
preprocessing :class:`~lensbus.geometry.Geometry` (letterbox), and reported with
:meth:`lensbus.schemas.Box.from_normalized`, so their pixels are those of the full frame.

Labels: a model's class index ``i`` is ``manifest.labels[i]``, for every decoder, and is the
``class_id`` reported.  Where the model has a background class (Caffe SSD: label 0), the
labels list keeps it at its index (``["background", "face"]``) and the decoder drops it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
import numpy.typing as npt

from lensbus.errors import ModelLoadError, OutputsError
from lensbus.geometry import Geometry
from lensbus.schemas.manifest import DecoderOptions, Manifest
from lensbus.schemas.result import Box, ClassScore, Detection, Segment

__all__ = [
    "DECODERS",
    "Array",
    "DecodedOutputs",
    "Decoder",
    "DecoderOptions",
    "FloatArray",
    "center_boxes",
    "clamp_score",
    "decoder_for",
    "label_for",
    "nms",
    "output_rows",
    "register",
    "to_detections",
    "unregister",
]

Array = npt.NDArray[Any]
FloatArray = npt.NDArray[np.float64]


@dataclass
class DecodedOutputs:
    """What a decoder made of one run's outputs."""

    detections: list[Detection] = field(default_factory=list)
    classes: list[ClassScore] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    mask_png: bytes | None = None


class Decoder(ABC):
    """One way of reading a model's outputs.

    A decoder is one module that subclasses this, sets the class attributes, declares its
    ``Options`` model and decorates the class with :func:`register`; the manifest then
    accepts its ``key`` as ``decoder`` for its ``tasks`` and validates ``decoder_options``
    with its ``Options``.
    """

    key: ClassVar[str]
    """The manifest's ``decoder`` value."""
    tasks: ClassVar[frozenset[str]]
    """The manifest ``task`` values it fits."""
    Options: ClassVar[type[DecoderOptions]]
    """Its ``decoder_options``."""

    options: DecoderOptions

    def __init__(self, manifest: Manifest, mask_png: bool = False) -> None:
        """``mask_png``: attach the class map as a PNG (for the decoders that make one)."""
        if not isinstance(manifest.decoder_options, self.Options):
            raise TypeError(
                f"{type(self).__name__} needs {self.Options.__name__}, the manifest has "
                f"{type(manifest.decoder_options).__name__} (decoder {manifest.decoder!r})"
            )
        self.options = manifest.decoder_options
        self.labels = manifest.labels

    @abstractmethod
    def check(self, outputs: Sequence[Array]) -> None:
        """Raise :class:`~lensbus.errors.OutputsError` when ``outputs`` cannot be decoded."""

    @abstractmethod
    def __call__(
        self, outputs: Sequence[Array], geometry: Geometry, frame_w: int, frame_h: int
    ) -> DecodedOutputs:
        """Decode one run's outputs; boxes in the pixels of a ``frame_w x frame_h`` frame."""


DECODERS: dict[str, type[Decoder]] = {}
"""``decoder`` key -> decoder class; filled by :func:`register`."""

D = TypeVar("D", bound=type[Decoder])


def register(cls: D) -> D:
    """Class decorator: add a decoder to :data:`DECODERS` under its ``key``."""
    key = cls.key
    if key in DECODERS and DECODERS[key] is not cls:
        raise ValueError(f"decoder {key!r} is already registered to {DECODERS[key].__name__}")
    tag = cls.Options.model_fields.get("decoder")
    if tag is None or tag.default != key:
        raise ValueError(
            f"{cls.__name__}: {cls.Options.__name__} needs a field "
            f'decoder: Literal["{key}"] = "{key}"'
        )
    DECODERS[key] = cls
    return cls


def unregister(key: str) -> None:
    """Remove a decoder from :data:`DECODERS` (a test's, or one being replaced)."""
    DECODERS.pop(key, None)


def decoder_for(manifest: Manifest, mask_png: bool = False) -> Decoder:
    """The decoder ``manifest.decoder`` names, built for this manifest."""
    cls = DECODERS.get(manifest.decoder)
    if cls is None:
        raise ModelLoadError(
            f"{manifest.ref}: no decoder {manifest.decoder!r} (known: {sorted(DECODERS)})"
        )
    return cls(manifest, mask_png)


# ------------------------------------------------------------------------------ shared helpers


def label_for(labels: Sequence[str], index: int) -> str:
    return labels[index] if 0 <= index < len(labels) else f"class_{index}"


def clamp_score(value: float) -> float:
    return min(1.0, max(0.0, float(value)))


def nms(
    boxes: FloatArray, scores: FloatArray, class_ids: Array, iou_threshold: float
) -> npt.NDArray[np.intp]:
    """Per-class non-maximum suppression; indices kept, best score first.

    ``boxes`` are ``[xmin, ymin, xmax, ymax]`` in any consistent unit (IoU does not change
    under per-axis scaling, so normalized coordinates give the same result as pixels).
    """
    # Imported here, not with the module: the deployer imports the decoders to validate
    # manifests and never decodes, and OpenCV would add ~30 MB to its memory.
    import cv2

    if len(boxes) == 0:
        return np.zeros(0, dtype=np.intp)
    xywh = np.asarray(boxes, dtype=np.float64).copy()
    xywh[:, 2:] -= xywh[:, :2]
    kept = cv2.dnn.NMSBoxesBatched(
        xywh.tolist(),
        np.asarray(scores, dtype=np.float32).tolist(),
        np.asarray(class_ids, dtype=np.int32).tolist(),
        0.0,
        float(iou_threshold),
    )
    idx = np.asarray(kept, dtype=np.intp).ravel()
    return idx[np.argsort(-np.asarray(scores)[idx], kind="stable")]


def to_detections(
    labels: Sequence[str],
    class_ids: Array,
    scores: Array,
    boxes: FloatArray,
    geometry: Geometry,
    frame_w: int,
    frame_h: int,
) -> list[Detection]:
    """Boxes (input-normalized ``xyxy``) -> Detections in frame coordinates.

    A box that lies entirely in the letterbox padding or outside the frame is dropped.
    """
    out = []
    for cid, score, (x0, y0, x1, y1) in zip(
        class_ids.tolist(), scores.tolist(), geometry.boxes_to_frame(boxes).tolist(), strict=True
    ):
        box = Box.from_normalized(x0, y0, x1, y1, frame_w, frame_h)
        if box.xmax <= box.xmin or box.ymax <= box.ymin:
            continue
        cid = int(cid)
        out.append(
            Detection(label=label_for(labels, cid), class_id=cid, score=clamp_score(score), box=box)
        )
    return out


def best_classes(cls: Array, threshold: float) -> tuple[npt.NDArray[np.intp], Array, Array]:
    """Each row's best class and its score, for the rows whose score reaches ``threshold``:
    ``(rows kept, their class ids, their scores)``."""
    ids = cls.argmax(axis=1)
    scores = cls[np.arange(len(cls)), ids]
    keep = np.flatnonzero(scores >= threshold)
    return keep, ids[keep], scores[keep]


def suppressed(
    labels: Sequence[str],
    ids: Array,
    scores: Array,
    boxes: FloatArray,
    rule: tuple[float, bool, int],
    geometry: Geometry,
    frame_w: int,
    frame_h: int,
) -> DecodedOutputs:
    """Detections left by NMS (``rule``: IoU threshold, class-agnostic, at most N) on
    input-normalized ``xyxy`` boxes: the letterbox mapping only scales and shifts each axis,
    which leaves IoU unchanged, so this is the same as NMS in frame pixels."""
    iou, agnostic, most = rule
    groups = np.zeros_like(ids) if agnostic else ids
    kept = nms(boxes, scores, groups, iou)[:most]
    dets = to_detections(labels, ids[kept], scores[kept], boxes[kept], geometry, frame_w, frame_h)
    return DecodedOutputs(detections=dets)


def center_boxes(cxcywh: Array, input_w: int, input_h: int) -> FloatArray:
    """``(K, 4)`` ``[cx, cy, w, h]`` in input pixels -> input-normalized ``xyxy``."""
    a = np.asarray(cxcywh, dtype=np.float64).reshape(-1, 4)
    half = a[:, 2:4] / 2
    size = np.array([input_w, input_h, input_w, input_h], dtype=np.float64)
    return np.concatenate([a[:, 0:2] - half, a[:, 0:2] + half], axis=1) / size


def output_rows(output: Array, width: int, name: str) -> Array:
    """``(..., K, width)`` with leading axes of size 1 -> ``(K, width)``."""
    a = np.asarray(output)
    if a.ndim < 2 or a.shape[-1] != width or math.prod(a.shape[:-2]) != 1:
        raise OutputsError(f"{name}: expected output shape (1, ..., K, {width}), got {a.shape}")
    return a.reshape(-1, width)
