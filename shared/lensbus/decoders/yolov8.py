"""The ``yolov8`` decoder: Ultralytics YOLOv8 / YOLO11 detection exports (no objectness).

An Ultralytics ``detect`` model exported to ONNX (``nms=False``, the default) has one output
``(1, 4 + C, N)``: for each of the ``N`` anchor points a column ``[cx, cy, w, h, class
scores...]``, the box in input pixels, the class scores already sigmoid-ed.  YOLOv8 and YOLO11
share this head.  Some tools transpose it to ``(1, N, 4 + C)``; both are read.  Score = best
class; then NMS, per class like Ultralytics' ``predict`` (``agnostic_nms`` for one NMS over
all classes).

Tested against a real model, NudeNet 3.4's YOLOv8n (``tests/test_decoders_modern.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from lensbus.decoders.base import (
    Array,
    DecodedOutputs,
    Decoder,
    DecoderOptions,
    best_classes,
    center_boxes,
    register,
    suppressed,
)
from lensbus.errors import OutputsError
from lensbus.geometry import Geometry
from lensbus.schemas.manifest import Manifest


class Yolov8Options(DecoderOptions):
    decoder: Literal["yolov8"] = "yolov8"
    layout: Literal["auto", "columns", "rows"] = Field(
        default="auto",
        description="'columns': (1, 4+C, N), one box per column, as Ultralytics exports; "
        "'rows': (1, N, 4+C), transposed; 'auto': whichever axis has 4+C entries (columns "
        "when both do)",
    )
    agnostic_nms: bool = Field(
        default=False,
        description="one NMS over all classes (a box suppresses overlapping boxes of any "
        "class), instead of one per class",
    )
    max_detections: int = Field(default=300, gt=0, description="detections kept, best first")


@register
class Yolov8Decoder(Decoder):
    """``(1, 4+C, N)`` (or ``(1, N, 4+C)``) ``[cx, cy, w, h, scores...]`` -> detections."""

    key: ClassVar[str] = "yolov8"
    tasks: ClassVar[frozenset[str]] = frozenset({"detection"})
    Options: ClassVar[type[DecoderOptions]] = Yolov8Options
    options: Yolov8Options

    def __init__(self, manifest: Manifest, mask_png: bool = False) -> None:
        super().__init__(manifest, mask_png)
        self.width = 4 + len(self.labels)
        self.threshold = manifest.score_threshold
        self.nms_threshold = manifest.nms_threshold
        self.input_size = (manifest.input.width, manifest.input.height)

    def rows(self, outputs: Sequence[Array]) -> Array:
        """The one output as ``(N, 4 + C)``."""
        if len(outputs) != 1:
            raise OutputsError(f"yolov8: expected 1 output, got {len(outputs)}")
        a = np.asarray(outputs[0])
        layout = self.options.layout
        if a.ndim == 3 and a.shape[0] == 1:
            if layout == "auto":
                layout = "columns" if a.shape[1] == self.width else "rows"
            if layout == "columns" and a.shape[1] == self.width:
                return a[0].T
            if layout == "rows" and a.shape[2] == self.width:
                return a[0]
        raise OutputsError(
            f"yolov8: output of shape {a.shape} does not fit {len(self.labels)} labels "
            f"(expected (1, {self.width}, N) or (1, N, {self.width}), layout "
            f"{self.options.layout!r})"
        )

    def check(self, outputs: Sequence[Array]) -> None:
        self.rows(outputs)

    def __call__(
        self, outputs: Sequence[Array], geometry: Geometry, frame_w: int, frame_h: int
    ) -> DecodedOutputs:
        rows = self.rows(outputs)
        keep, ids, scores = best_classes(rows[:, 4:], self.threshold)
        if keep.size == 0:
            return DecodedOutputs()
        boxes = center_boxes(rows[keep, 0:4], *self.input_size)
        rule = (self.nms_threshold, self.options.agnostic_nms, self.options.max_detections)
        return suppressed(
            self.labels, ids, scores.astype(np.float64), boxes, rule, geometry, frame_w, frame_h
        )
