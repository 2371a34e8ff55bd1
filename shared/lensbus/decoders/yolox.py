"""The ``yolox`` decoder: YOLOX exports, ``(1, N, 5 + C)`` rows with objectness.

A YOLOX model exported to ONNX has one output ``(1, N, 5 + C)``: a row per grid cell of
each stride (8, 16, 32 by default; rows of stride 8 first, each grid row by row), ``[x, y,
w, h, objectness, class scores...]``, objectness and classes already sigmoid-ed.  By default
the export leaves the grid decode to the caller (YOLOX's ``decode_in_inference=False``, what
its ONNX demo expects): ``cx = (x + gx) * stride``, ``w = exp(w) * stride``, in input pixels.
``decoded: true`` reads rows the export already decoded.  Score = objectness x best class;
then NMS over all classes, as YOLOX's demo does (``agnostic_nms: false`` for one per class).

Tested against a real model, ddddocr 1.6's YOLOX detector (``tests/test_decoders_modern.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, ClassVar, Literal

import numpy as np
from pydantic import Field

from lensbus.decoders.base import (
    Array,
    DecodedOutputs,
    Decoder,
    DecoderOptions,
    FloatArray,
    best_classes,
    center_boxes,
    output_rows,
    register,
    suppressed,
)
from lensbus.errors import OutputsError
from lensbus.geometry import Geometry
from lensbus.schemas.manifest import Manifest


class YoloxOptions(DecoderOptions):
    decoder: Literal["yolox"] = "yolox"
    decoded: bool = Field(
        default=False,
        description="the export decoded the grid itself (rows already [cx, cy, w, h] in input "
        "pixels); false: raw rows, decoded here with 'strides'",
    )
    strides: list[Annotated[int, Field(gt=0)]] = Field(
        default=[8, 16, 32],
        min_length=1,
        description="the output strides in row order ([8, 16, 32, 64] for the P6 models)",
    )
    agnostic_nms: bool = Field(
        default=True,
        description="one NMS over all classes, as YOLOX's demo does; false: one per class",
    )
    max_detections: int = Field(default=100, gt=0, description="detections kept, best first")


def yolox_grid(input_w: int, input_h: int, strides: Sequence[int]) -> tuple[FloatArray, FloatArray]:
    """``(cells (N, 2) [gx, gy], strides (N, 1))`` in YOLOX's row order."""
    cells, scale = [], []
    for s in strides:
        gy, gx = np.meshgrid(np.arange(input_h // s), np.arange(input_w // s), indexing="ij")
        cells.append(np.stack([gx.ravel(), gy.ravel()], axis=1))
        scale.append(np.full((gx.size, 1), s))
    return np.concatenate(cells).astype(np.float64), np.concatenate(scale).astype(np.float64)


@register
class YoloxDecoder(Decoder):
    """``(1, N, 5 + C)`` ``[x, y, w, h, obj, classes...]`` (raw grid or decoded) -> detections."""

    key: ClassVar[str] = "yolox"
    tasks: ClassVar[frozenset[str]] = frozenset({"detection"})
    Options: ClassVar[type[DecoderOptions]] = YoloxOptions
    options: YoloxOptions

    def __init__(self, manifest: Manifest, mask_png: bool = False) -> None:
        super().__init__(manifest, mask_png)
        self.width = 5 + len(self.labels)
        self.threshold = manifest.score_threshold
        self.nms_threshold = manifest.nms_threshold
        self.input_size = (manifest.input.width, manifest.input.height)
        self.cells, self.strides = yolox_grid(*self.input_size, self.options.strides)

    def rows(self, outputs: Sequence[Array]) -> Array:
        if len(outputs) != 1:
            raise OutputsError(f"yolox: expected 1 output, got {len(outputs)}")
        rows = output_rows(outputs[0], self.width, f"yolox ({len(self.labels)} labels)")
        if not self.options.decoded and len(rows) != len(self.cells):
            w, h = self.input_size
            raise OutputsError(
                f"yolox: {len(rows)} rows, but a {w}x{h} input with strides "
                f"{self.options.strides} has {len(self.cells)} grid cells"
            )
        return rows

    def check(self, outputs: Sequence[Array]) -> None:
        self.rows(outputs)

    def __call__(
        self, outputs: Sequence[Array], geometry: Geometry, frame_w: int, frame_h: int
    ) -> DecodedOutputs:
        rows = self.rows(outputs)
        cls = rows[:, 5:].astype(np.float64) * rows[:, 4:5]
        keep, ids, scores = best_classes(cls, self.threshold)
        if keep.size == 0:
            return DecodedOutputs()
        xywh = rows[keep, 0:4].astype(np.float64)
        if not self.options.decoded:
            stride = self.strides[keep]
            xywh[:, 0:2] = (xywh[:, 0:2] + self.cells[keep]) * stride
            xywh[:, 2:4] = np.exp(xywh[:, 2:4]) * stride
        boxes = center_boxes(xywh, *self.input_size)
        rule = (self.nms_threshold, self.options.agnostic_nms, self.options.max_detections)
        return suppressed(self.labels, ids, scores, boxes, rule, geometry, frame_w, frame_h)
