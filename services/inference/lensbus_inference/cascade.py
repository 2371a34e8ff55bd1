"""Cascades: a pipeline's classify stages on crops of the primary model's detections.

Pure per-frame work (no I/O): which boxes a stage classifies (:func:`select`), the pixels
of each crop (:func:`crop_region`), and the stage's best class attached to its detection as an
:class:`~lensbus.schemas.Attribute` (:func:`run_stage`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from lensbus.schemas import Attribute, Detection, StageTiming
from lensbus.schemas.pipeline import ClassifyStage
from lensbus_inference import metrics
from lensbus_inference.model import LoadedModel


@dataclass(frozen=True)
class Cascade:
    """A classify stage in service: its settings and its loaded model."""

    stage: ClassifyStage
    model: LoadedModel

    @property
    def ref(self) -> str:
        m = self.model.manifest
        return f"{m.name}:{m.version}"


def select(detections: list[Detection], stage: ClassifyStage) -> list[int]:
    """Indices of the detections ``stage`` classifies: a listed label, a box whose shorter
    side (full-frame pixels) is at least ``min_size``, the best ``max_crops`` by score."""
    wanted = set(stage.labels)
    picked = [
        i
        for i, d in enumerate(detections)
        if d.label in wanted
        and min(d.box.right - d.box.left, d.box.bottom - d.box.top) >= stage.min_size
    ]
    picked.sort(key=lambda i: -detections[i].score)
    return picked[: stage.max_crops]


def crop_region(
    det: Detection, padding: float, width: int, height: int
) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` in pixels of a ``width x height`` image: the box (in
    normalised coordinates, so the image may be a reduced-scale decode) grown by
    ``padding`` of its size on each side, clipped to the image, at least one pixel."""
    b = det.box
    pad_x, pad_y = (b.xmax - b.xmin) * padding, (b.ymax - b.ymin) * padding
    left = max(0, min(width - 1, int(np.floor((b.xmin - pad_x) * width))))
    top = max(0, min(height - 1, int(np.floor((b.ymin - pad_y) * height))))
    right = max(left + 1, min(width, int(np.ceil((b.xmax + pad_x) * width))))
    bottom = max(top + 1, min(height, int(np.ceil((b.ymax + pad_y) * height))))
    return left, top, right, bottom


def crop(image: npt.NDArray[np.uint8], det: Detection, padding: float) -> npt.NDArray[np.uint8]:
    h, w = image.shape[:2]
    left, top, right, bottom = crop_region(det, padding, w, h)
    return np.ascontiguousarray(image[top:bottom, left:right])


def run_stage(
    image: npt.NDArray[np.uint8], detections: list[Detection], cascade: Cascade
) -> tuple[list[Detection], StageTiming]:
    """Classify the selected crops of ``image`` (the frame the primary ran on) and attach
    each best class scoring at least ``min_score``; detections are new objects (the input
    list is not changed)."""
    t0 = time.perf_counter()
    stage = cascade.stage
    out = list(detections)
    chosen = select(detections, stage)
    for i in chosen:
        piece = crop(image, detections[i], stage.padding)
        h, w = piece.shape[:2]
        classes = cascade.model.run(piece, w, h).classes
        if not classes:
            continue
        best = max(classes, key=lambda c: c.score)
        if best.score < stage.min_score:
            continue
        attr = Attribute(
            stage=stage.name,
            model=cascade.ref,
            label=best.label,
            class_id=best.class_id,
            score=best.score,
        )
        out[i] = out[i].model_copy(update={"attributes": [*out[i].attributes, attr]})
    ms = (time.perf_counter() - t0) * 1000.0
    metrics.PIPELINE_STAGE_SECONDS.labels(stage.name, "classify").observe(ms / 1000.0)
    metrics.CROPS.labels(stage.name).inc(len(chosen))
    timing = StageTiming(
        stage=stage.name, kind="classify", model=cascade.ref, ms=ms, items=len(chosen)
    )
    return out, timing
