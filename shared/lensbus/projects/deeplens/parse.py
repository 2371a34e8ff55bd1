"""A DeepLens function's frame -> model input, and decoded outputs -> ``parseResult`` shapes.

Preprocessing: the function resized the frame itself (``cv2.resize(frame, (w, h))``, as
DeepLens's model optimizer fixed the input size), so the frame is taken as the whole model
input (stretch) and only what the lensbus package's manifest adds is applied: colour order,
``(pixel * scale - mean) / std``, layout, a batch of one. A frame of another size is resized
to the model's input first (DeepLens refused it; a warning says so once).

``parseResult`` shapes (the AWS DeepLens developer guide, ``model.parseResult``, and its
sample functions, which index their label lists with ``obj['label']``):

``ssd``
    ``[{"label": class_id, "prob": p, "xmin": px, "ymin": px, "xmax": px, "ymax": px}, ...]``
    best first; corners in pixels of the model input (the samples multiply them by
    ``frame.shape[1] / input_width`` and ``frame.shape[0] / input_height`` to draw on the
    full frame), whole pixels as in the guide's example. ``class_id`` indexes the package's
    labels; a background class keeps its index (a Caffe/TF SSD's 0) and never appears, as
    DeepLens's detection output dropped it. Every detection above 0.01 is given (DeepLens
    gave its detection layer's top-k, low scores included): the function applies its own
    threshold.
``classification``
    ``[{"label": class_id, "prob": p}, ...]``, every class, best first.
``segmentation``
    the guide documents only "a list of dicts with the probability of a label"; here one
    per class present in the class map, best (largest) first:
    ``{"label": class_id, "prob": fraction of the input's pixels of that class, "xmin",
    "ymin", "xmax", "ymax": the class's bounding box in model-input pixels}``.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from lensbus.decoders import DecodedOutputs, decoder_for
from lensbus.geometry import STRETCH
from lensbus.projects.deeplens.runtime import warn_once
from lensbus.schemas.manifest import InputSpec, Manifest
from lensbus.schemas.result import Box

MODEL_TYPES = ("ssd", "classification", "segmentation")
# The task a lensbus package must have for each parseResult model type.
TASKS = {"ssd": "detection", "classification": "classification", "segmentation": "segmentation"}
# Lowest score parseResult('ssd') reports: DeepLens gave low scores too (its guide's example
# ends with prob 0.001); the function's own threshold picks.
MIN_PROB = 0.01

Array = npt.NDArray[Any]


def to_tensor(frame: Array, spec: InputSpec) -> npt.NDArray[np.float32]:
    """The model input for a frame the function resized: ``(1, 3, H, W)`` or ``(1, H, W, 3)``."""
    image = np.asarray(frame)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"doInference needs an (H, W, 3) BGR frame, got shape {image.shape}")
    if image.shape[:2] != (spec.height, spec.width):
        warn_once(
            "size",
            f"doInference got a {image.shape[1]}x{image.shape[0]} frame, the model's input is "
            f"{spec.width}x{spec.height}: resized (resize it to the model's input first)",
        )
        image = cv2.resize(image, (spec.width, spec.height), interpolation=cv2.INTER_LINEAR)
    if spec.color == "rgb":
        image = image[..., ::-1]
    scale = np.float32(spec.scale)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    tensor = (image.astype(np.float32) * scale - mean) / std
    if spec.layout == "NCHW":
        tensor = tensor.transpose(2, 0, 1)
    return np.ascontiguousarray(tensor[np.newaxis], dtype=np.float32)


class ResultParser:
    """``parseResult`` for one model: its decoder, built to report what DeepLens reported."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.width, self.height = manifest.input.width, manifest.input.height
        update: dict[str, Any] = {"score_threshold": min(manifest.score_threshold, MIN_PROB)}
        if manifest.task == "classification":
            update["top_k"] = len(manifest.labels)
        self._decoder = decoder_for(manifest.model_copy(update=update))

    def __call__(self, model_type: str, outputs: list[Array]) -> dict[str, list[dict[str, Any]]]:
        if model_type not in MODEL_TYPES:
            raise ValueError(f"parseResult: model_type is one of {MODEL_TYPES}, not {model_type!r}")
        task = self.manifest.task
        if TASKS[model_type] != task:
            raise ValueError(
                f"parseResult({model_type!r}): {self.manifest.ref} is a {task} model; "
                f"use {next(k for k, t in TASKS.items() if t == task)!r}"
            )
        decoded = self._decoder(outputs, STRETCH, self.width, self.height)
        return {model_type: self._shape(model_type, decoded)}

    def _shape(self, model_type: str, decoded: DecodedOutputs) -> list[dict[str, Any]]:
        if model_type == "classification":
            return [{"label": c.class_id, "prob": float(c.score)} for c in decoded.classes]
        if model_type == "ssd":
            dets = sorted(decoded.detections, key=lambda d: -d.score)
            return [{"label": d.class_id, "prob": float(d.score), **_corners(d.box)} for d in dets]
        segs = sorted(decoded.segments, key=lambda s: -s.area)
        return [{"label": s.class_id, "prob": float(s.area), **_corners(s.box)} for s in segs]


def _corners(box: Box) -> dict[str, int]:
    # Box.from_normalized with the input's size: its pixel edges are model-input pixels.
    return {"xmin": box.left, "ymin": box.top, "xmax": box.right, "ymax": box.bottom}
