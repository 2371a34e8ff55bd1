"""The ``segmentation`` decoder: a class map -> per-class area and box (and the map as PNG)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from lensbus.decoders.base import (
    Array,
    DecodedOutputs,
    Decoder,
    DecoderOptions,
    clamp_score,
    label_for,
    register,
)
from lensbus.errors import OutputsError
from lensbus.geometry import Geometry
from lensbus.schemas.manifest import Manifest
from lensbus.schemas.result import Box, Segment


class SegmentationOptions(DecoderOptions):
    decoder: Literal["segmentation"] = "segmentation"
    background_id: int | None = Field(
        default=None, description="class id left out of the segments (default: none)"
    )


@register
class SegmentationDecoder(Decoder):
    """``(1, C, H, W)`` scores or ``(1, H, W)`` class map -> per-class area and box.

    Only the part of the map that holds the image counts (letterbox padding is cut off);
    areas are fractions of it, boxes are in frame coordinates.  With ``mask_png`` the class
    map (at the model's output resolution, padding cut off) is encoded as an 8-bit PNG.
    """

    key: ClassVar[str] = "segmentation"
    tasks: ClassVar[frozenset[str]] = frozenset({"segmentation"})
    Options: ClassVar[type[DecoderOptions]] = SegmentationOptions
    options: SegmentationOptions

    def __init__(self, manifest: Manifest, mask_png: bool = False) -> None:
        super().__init__(manifest, mask_png)
        self.mask_png = mask_png
        self.background_id = self.options.background_id
        if mask_png and len(self.labels) > 256:
            raise OutputsError(f"segmentation: {len(self.labels)} classes do not fit an 8-bit PNG")

    def class_map(self, outputs: Sequence[Array]) -> Array:
        if len(outputs) != 1:
            raise OutputsError(f"segmentation: expected 1 output, got {len(outputs)}")
        a = np.asarray(outputs[0])
        if a.ndim == 4 and a.shape[0] == 1 and a.shape[1] > 1:
            if a.shape[1] != len(self.labels):
                raise OutputsError(
                    f"segmentation: {a.shape[1]} score channels but {len(self.labels)} labels"
                )
            return a[0].argmax(axis=0)
        if a.ndim in (3, 4) and math.prod(a.shape[:-2]) == 1:
            return np.rint(a.reshape(a.shape[-2:])).astype(np.int64)
        if a.ndim == 2:
            return np.rint(a).astype(np.int64)
        raise OutputsError(f"segmentation: expected (1, C, H, W) or (1, H, W), got {a.shape}")

    def check(self, outputs: Sequence[Array]) -> None:
        self.class_map(outputs)

    def __call__(
        self, outputs: Sequence[Array], geometry: Geometry, frame_w: int, frame_h: int
    ) -> DecodedOutputs:
        full = self.class_map(outputs)
        rows, cols = geometry.content_slice(full.shape[1], full.shape[0])
        cmap = full[rows, cols]
        h, w = cmap.shape
        counts = np.bincount(np.clip(cmap, 0, None).ravel(), minlength=len(self.labels))
        segments = []
        for cid in np.flatnonzero(counts):
            if cid == self.background_id:
                continue
            mask = cmap == cid
            ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            box = Box.from_normalized(
                xs[0] / w, ys[0] / h, (xs[-1] + 1) / w, (ys[-1] + 1) / h, frame_w, frame_h
            )
            segments.append(
                Segment(
                    label=label_for(self.labels, int(cid)),
                    class_id=int(cid),
                    area=clamp_score(counts[cid] / cmap.size),
                    box=box,
                )
            )
        png = self._png(cmap) if self.mask_png else None
        return DecodedOutputs(segments=segments, mask_png=png)

    @staticmethod
    def _png(cmap: Array) -> bytes:
        import cv2  # here, not with the module: see lensbus.decoders.base.nms

        ok, buf = cv2.imencode(".png", np.clip(cmap, 0, 255).astype(np.uint8))
        if not ok:
            raise OutputsError("segmentation: PNG encoding failed")
        return bytes(buf.tobytes())
