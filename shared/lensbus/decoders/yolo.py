"""The ``yolo`` decoder: YOLO rows (decoded darknet layout, or raw YOLOv3 grids) -> boxes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from lensbus.decoders.base import (
    Array,
    DecodedOutputs,
    Decoder,
    DecoderOptions,
    FloatArray,
    best_classes,
    register,
    suppressed,
)
from lensbus.errors import OutputsError
from lensbus.geometry import Geometry
from lensbus.schemas.manifest import Manifest


class YoloOptions(DecoderOptions):
    decoder: Literal["yolo"] = "yolo"
    anchors: list[list[float]] | None = Field(
        default=None,
        description="switches from the decoded darknet layout to raw YOLOv3 grids: one list "
        "of [w, h, ...] anchor pairs (input pixels) per output, in output order",
    )
    class_threshold: float = Field(
        default=0.2,
        ge=0.0,
        le=1.0,
        description="raw grids: class scores at or below it are zeroed, as the darknet layout does",
    )
    max_detections: int = Field(default=100, gt=0, description="detections kept, best first")

    @field_validator("anchors")
    @classmethod
    def _pairs(cls, v: list[list[float]] | None) -> list[list[float]] | None:
        for i, anchors in enumerate(v or []):
            if not anchors or len(anchors) % 2:
                raise ValueError(f"output {i}: anchors come in [w, h] pairs, got {anchors}")
        return v


def _sigmoid(x: Array) -> FloatArray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def decode_yolo_grid(
    raw: Array, anchors: Sequence[float], input_w: int, input_h: int, class_threshold: float
) -> FloatArray:
    """One raw YOLOv3 output ``(1, A*(5+C), H, W)`` -> rows in the darknet layout.

    Rows are ``[cx, cy, w, h, obj, obj*sigmoid(class)...]``, normalized to the input, class
    scores at or below ``class_threshold`` zeroed; the same as the darknet importer's yolo
    layer (``lensbus_inference.packaging``).
    """
    a = np.asarray(raw, dtype=np.float64)
    pairs = np.asarray(anchors, dtype=np.float64).reshape(-1, 2)
    n_anchors = len(pairs)
    if a.ndim != 4 or a.shape[0] != 1 or a.shape[1] % n_anchors:
        raise OutputsError(f"yolo raw grid: expected (1, A*(5+C), H, W), got {a.shape}")
    n = a.shape[1] // n_anchors
    grid_h, grid_w = a.shape[2:]
    # (1, A, n, H, W) -> (H, W, A, n): rows ordered (y, x, anchor) like darknet/OpenCV
    t = a.reshape(n_anchors, n, grid_h, grid_w).transpose(2, 3, 0, 1)
    gy, gx = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    out = np.empty_like(t)
    out[..., 0] = (_sigmoid(t[..., 0]) + gx[..., None]) / grid_w
    out[..., 1] = (_sigmoid(t[..., 1]) + gy[..., None]) / grid_h
    out[..., 2] = np.exp(t[..., 2]) * pairs[:, 0] / input_w
    out[..., 3] = np.exp(t[..., 3]) * pairs[:, 1] / input_h
    obj = _sigmoid(t[..., 4])
    out[..., 4] = obj
    cls = _sigmoid(t[..., 5:]) * obj[..., None]
    out[..., 5:] = np.where(cls > class_threshold, cls, 0.0)
    return out.reshape(-1, n)


@register
class YoloDecoder(Decoder):
    """YOLO rows ``[cx, cy, w, h, obj, class scores (already x obj)...]`` -> detections.

    Accepts our MXNet/ONNX exports (one ``(1, boxes, 5+C)`` output), OpenCV's darknet reader
    (one ``(boxes, 5+C)`` array per yolo layer, concatenated here) and, with the ``anchors``
    option, raw YOLOv3 grids.  Score = best class column; per-class NMS.
    """

    key: ClassVar[str] = "yolo"
    tasks: ClassVar[frozenset[str]] = frozenset({"detection"})
    Options: ClassVar[type[DecoderOptions]] = YoloOptions
    options: YoloOptions

    def __init__(self, manifest: Manifest, mask_png: bool = False) -> None:
        super().__init__(manifest, mask_png)
        self.width = 5 + len(self.labels)
        self.threshold = manifest.score_threshold
        self.nms_threshold = manifest.nms_threshold
        self.max_detections = self.options.max_detections
        self.class_threshold = self.options.class_threshold
        self.anchors = self.options.anchors
        self.input_size = (manifest.input.width, manifest.input.height)

    def rows(self, outputs: Sequence[Array]) -> Array:
        """All outputs as one ``(boxes, 5 + classes)`` array."""
        if self.anchors is not None:
            if len(self.anchors) != len(outputs):
                raise OutputsError(
                    f"yolo: {len(outputs)} outputs but anchors for {len(self.anchors)}"
                )
            parts = [
                decode_yolo_grid(o, a, *self.input_size, self.class_threshold)
                for o, a in zip(outputs, self.anchors, strict=True)
            ]
        else:
            parts = [np.asarray(o) for o in outputs]
        if not parts:
            raise OutputsError("yolo: the model gave no outputs")
        for p in parts:
            batched = p.ndim == 3 and p.shape[0] == 1
            if p.shape[-1] != self.width or not (p.ndim == 2 or batched):
                raise OutputsError(
                    f"yolo: output of shape {p.shape} does not fit {len(self.labels)} labels "
                    f"(expected (1, boxes, {self.width}) or (boxes, {self.width}))"
                )
        flat = [p.reshape(-1, self.width) for p in parts]
        return flat[0] if len(flat) == 1 else np.concatenate(flat, axis=0)

    def check(self, outputs: Sequence[Array]) -> None:
        self.rows(outputs)

    def __call__(
        self, outputs: Sequence[Array], geometry: Geometry, frame_w: int, frame_h: int
    ) -> DecodedOutputs:
        rows = self.rows(outputs)
        # Class columns are objectness x class probability, so never above objectness: rows
        # whose objectness misses the threshold cannot pass it (most of them; 3x faster).
        rows = rows[rows[:, 4] >= self.threshold]
        keep, ids, scores = best_classes(rows[:, 5:], self.threshold)
        if keep.size == 0:
            return DecodedOutputs()
        cxcy, wh = rows[keep, 0:2].astype(np.float64), rows[keep, 2:4].astype(np.float64)
        boxes = np.concatenate([cxcy - wh / 2, cxcy + wh / 2], axis=1)
        rule = (self.nms_threshold, False, self.max_detections)  # per-class NMS
        return suppressed(self.labels, ids, scores, boxes, rule, geometry, frame_w, frame_h)
