"""The ``ssd`` decoder: detection-output layers that already ran NMS."""

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
    output_rows,
    register,
    to_detections,
)
from lensbus.errors import OutputsError
from lensbus.geometry import Geometry
from lensbus.schemas.manifest import Manifest


class SSDOptions(DecoderOptions):
    decoder: Literal["ssd"] = "ssd"
    layout: Literal["caffe", "mxnet", "gluoncv"] = Field(
        default="caffe",
        description="'caffe': DetectionOutput, (1, 1, K, 7) rows [image_id, label, conf, xmin, "
        "ymin, xmax, ymax], normalized; 'mxnet': MultiBoxDetection, (1, K, 6) rows [class_id, "
        "score, xmin, ymin, xmax, ymax], normalized, class -1 = nothing; 'gluoncv': three "
        "outputs ids (1, K, 1), scores (1, K, 1), boxes (1, K, 4) in input pixels, id -1 = "
        "nothing",
    )
    background_id: int | None = Field(
        default=None,
        description="class id left out of the detections; when not given: 0 for the caffe "
        "layout, none for the others",
    )
    max_detections: int = Field(default=100, gt=0, description="detections kept, best first")

    @property
    def background(self) -> int | None:
        """``background_id`` as given, else the layout's default."""
        if "background_id" in self.model_fields_set:
            return self.background_id
        return 0 if self.layout == "caffe" else None


@register
class SSDDecoder(Decoder):
    """Detection-output layers that already ran NMS: Caffe, MXNet MultiBox or GluonCV."""

    key: ClassVar[str] = "ssd"
    tasks: ClassVar[frozenset[str]] = frozenset({"detection"})
    Options: ClassVar[type[DecoderOptions]] = SSDOptions
    options: SSDOptions

    def __init__(self, manifest: Manifest, mask_png: bool = False) -> None:
        super().__init__(manifest, mask_png)
        self.layout = self.options.layout
        self.background_id = self.options.background
        self.threshold = manifest.score_threshold
        self.max_detections = self.options.max_detections
        self.input_size = (manifest.input.width, manifest.input.height)

    def _split(self, outputs: Sequence[Array]) -> tuple[Array, Array, Array]:
        """-> class ids (K,), scores (K,), boxes (K, 4) input-normalized."""
        if self.layout == "gluoncv":
            if len(outputs) != 3:
                raise OutputsError(f"ssd gluoncv: expected 3 outputs, got {len(outputs)}")
            ids = output_rows(outputs[0], 1, "ssd gluoncv ids")[:, 0]
            scores = output_rows(outputs[1], 1, "ssd gluoncv scores")[:, 0]
            boxes = output_rows(outputs[2], 4, "ssd gluoncv boxes").astype(np.float64)
            boxes = boxes / np.array(self.input_size * 2, dtype=np.float64)
            return ids, scores, boxes
        if len(outputs) != 1:
            raise OutputsError(f"ssd {self.layout}: expected 1 output, got {len(outputs)}")
        if self.layout == "caffe":
            rows = output_rows(outputs[0], 7, "ssd caffe (DetectionOutput)")
            return rows[:, 1], rows[:, 2], rows[:, 3:7]
        rows = output_rows(outputs[0], 6, "ssd mxnet (MultiBoxDetection)")
        return rows[:, 0], rows[:, 1], rows[:, 2:6]

    def check(self, outputs: Sequence[Array]) -> None:
        self._split(outputs)

    def __call__(
        self, outputs: Sequence[Array], geometry: Geometry, frame_w: int, frame_h: int
    ) -> DecodedOutputs:
        ids, scores, boxes = self._split(outputs)
        ids = np.rint(ids).astype(np.int64)
        keep = (ids >= 0) & (scores >= self.threshold)
        if self.background_id is not None:
            keep &= ids != self.background_id
        idx = np.flatnonzero(keep)
        idx = idx[np.argsort(-scores[idx], kind="stable")][: self.max_detections]
        dets = to_detections(
            self.labels, ids[idx], scores[idx], boxes[idx], geometry, frame_w, frame_h
        )
        return DecodedOutputs(detections=dets)
