"""Model outputs -> detections, classes or segments, one decoder per ``manifest.decoder``.

Every decoder is built once per model (``decoder = DECODERS[manifest.decoder](manifest,
mask_png)``), checks a set of raw outputs with :meth:`Decoder.check` (warm-up uses it to
refuse a model whose outputs do not fit) and turns outputs into a :class:`Decoded` with
``decoder(outputs, geometry, frame_w, frame_h)``.  Boxes are computed in normalized
coordinates of the model input, mapped to the frame through the preprocessing
:class:`~lensbus_inference.preprocess.Geometry` (letterbox), and reported with
:meth:`lensbus.schemas.Box.from_normalized`, so their pixels are those of the full frame.

Labels: a model's class index ``i`` is ``manifest.labels[i]``, for every decoder, and is the
``class_id`` reported.  Where the model has a background class (Caffe SSD: label 0), the
labels list keeps it at its index (``["background", "face"]``) and the decoder drops it.

``decoder_options`` per decoder:

* classification: ``softmax`` true/false (default: apply it unless the outputs already look
  like probabilities: all in 0..1 and summing to 1).
* ssd: ``layout`` ``"caffe"`` (DetectionOutput, ``(1, 1, K, 7)`` rows
  ``[image_id, label, conf, xmin, ymin, xmax, ymax]``, normalized), ``"mxnet"``
  (MultiBoxDetection, ``(1, K, 6)`` rows ``[class_id, score, xmin, ymin, xmax, ymax]``,
  normalized, class -1 = nothing) or ``"gluoncv"`` (three outputs ids ``(1, K, 1)``, scores
  ``(1, K, 1)``, boxes ``(1, K, 4)`` in input pixels, id -1 = nothing); ``background_id``
  (default 0 for caffe, none otherwise).
* yolo: ``anchors`` (optional) switches from the decoded darknet layout to raw YOLOv3 grids,
  one list of ``[w, h, ...]`` anchor pairs (input pixels) per output, in output order;
  ``class_threshold`` (default 0.2) zeroes smaller class scores as the darknet layout does;
  ``max_detections`` (default 100, also for ssd).
* segmentation: ``background_id`` (default none) is left out of the segments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from lensbus.schemas import Box, ClassScore, Detection, Manifest, Segment
from lensbus_inference.preprocess import Geometry

Array = npt.NDArray[Any]
FloatArray = npt.NDArray[np.float64]


class DecodeError(ValueError):
    """Outputs that do not have the shape or size the decoder and manifest expect."""


@dataclass
class Decoded:
    detections: list[Detection] = field(default_factory=list)
    classes: list[ClassScore] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    mask_png: bytes | None = None


class Decoder(Protocol):
    def __init__(self, manifest: Manifest, mask_png: bool = False) -> None: ...

    def check(self, outputs: Sequence[Array]) -> None:
        """Raise :class:`DecodeError` when ``outputs`` cannot be decoded with this manifest."""

    def __call__(
        self, outputs: Sequence[Array], geometry: Geometry, frame_w: int, frame_h: int
    ) -> Decoded: ...


# ------------------------------------------------------------------------------ shared helpers


def _label(labels: Sequence[str], index: int) -> str:
    return labels[index] if 0 <= index < len(labels) else f"class_{index}"


def _score(value: float) -> float:
    return min(1.0, max(0.0, float(value)))


def nms(
    boxes: FloatArray, scores: FloatArray, class_ids: Array, iou_threshold: float
) -> npt.NDArray[np.intp]:
    """Per-class non-maximum suppression; indices kept, best score first.

    ``boxes`` are ``[xmin, ymin, xmax, ymax]`` in any consistent unit (IoU does not change
    under per-axis scaling, so normalized coordinates give the same result as pixels).
    """
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


def _detections(
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
        out.append(Detection(label=_label(labels, cid), class_id=cid, score=_score(score), box=box))
    return out


def _rows(output: Array, width: int, name: str) -> Array:
    """``(..., K, width)`` with leading axes of size 1 -> ``(K, width)``."""
    a = np.asarray(output)
    if a.ndim < 2 or a.shape[-1] != width or math.prod(a.shape[:-2]) != 1:
        raise DecodeError(f"{name}: expected output shape (1, ..., K, {width}), got {a.shape}")
    return a.reshape(-1, width)


# ------------------------------------------------------------------------------ classification


class ClassificationDecoder:
    """``(1, C)`` (or ``(C,)``, ``(1, C, 1, 1)``) scores -> top-k classes with labels."""

    def __init__(self, manifest: Manifest, mask_png: bool = False) -> None:
        self.labels = manifest.labels
        self.top_k = min(manifest.top_k, len(self.labels))
        softmax = manifest.decoder_options.get("softmax")
        self.softmax: bool | None = None if softmax is None else bool(softmax)

    def _scores(self, outputs: Sequence[Array]) -> FloatArray:
        if len(outputs) != 1:
            raise DecodeError(f"classification: expected 1 output, got {len(outputs)}")
        scores = np.asarray(outputs[0], dtype=np.float64).ravel()
        if scores.size != len(self.labels):
            raise DecodeError(
                f"classification: the model gives {scores.size} scores (output shape "
                f"{np.shape(outputs[0])}) but the manifest has {len(self.labels)} labels"
            )
        return scores

    def check(self, outputs: Sequence[Array]) -> None:
        self._scores(outputs)

    @staticmethod
    def is_probability(scores: FloatArray) -> bool:
        return bool(scores.min() >= 0.0 and scores.max() <= 1.0 and abs(scores.sum() - 1) < 1e-3)

    def __call__(
        self, outputs: Sequence[Array], geometry: Geometry, frame_w: int, frame_h: int
    ) -> Decoded:
        scores = self._scores(outputs)
        if self.softmax or (self.softmax is None and not self.is_probability(scores)):
            e = np.exp(scores - scores.max())
            scores = e / e.sum()
        top = np.argsort(-scores, kind="stable")[: self.top_k]
        classes = [
            ClassScore(label=self.labels[i], class_id=int(i), score=_score(scores[i])) for i in top
        ]
        return Decoded(classes=classes)


# ------------------------------------------------------------------------------ ssd


class SSDDecoder:
    """Detection-output layers that already ran NMS: Caffe, MXNet MultiBox or GluonCV."""

    LAYOUTS: ClassVar[tuple[str, ...]] = ("caffe", "mxnet", "gluoncv")

    def __init__(self, manifest: Manifest, mask_png: bool = False) -> None:
        opts = manifest.decoder_options
        self.layout = str(opts.get("layout", "caffe"))
        if self.layout not in self.LAYOUTS:
            raise DecodeError(f"ssd: layout {self.layout!r} is not one of {list(self.LAYOUTS)}")
        default_bg = 0 if self.layout == "caffe" else None
        bg = opts.get("background_id", default_bg)
        self.background_id: int | None = None if bg is None else int(bg)
        self.labels = manifest.labels
        self.threshold = manifest.score_threshold
        self.max_detections = int(opts.get("max_detections", 100))
        self.input_size = (manifest.input.width, manifest.input.height)

    def _split(self, outputs: Sequence[Array]) -> tuple[Array, Array, Array]:
        """-> class ids (K,), scores (K,), boxes (K, 4) input-normalized."""
        if self.layout == "gluoncv":
            if len(outputs) != 3:
                raise DecodeError(f"ssd gluoncv: expected 3 outputs, got {len(outputs)}")
            ids = _rows(outputs[0], 1, "ssd gluoncv ids")[:, 0]
            scores = _rows(outputs[1], 1, "ssd gluoncv scores")[:, 0]
            boxes = _rows(outputs[2], 4, "ssd gluoncv boxes").astype(np.float64)
            boxes = boxes / np.array(self.input_size * 2, dtype=np.float64)
            return ids, scores, boxes
        if len(outputs) != 1:
            raise DecodeError(f"ssd {self.layout}: expected 1 output, got {len(outputs)}")
        if self.layout == "caffe":
            rows = _rows(outputs[0], 7, "ssd caffe (DetectionOutput)")
            return rows[:, 1], rows[:, 2], rows[:, 3:7]
        rows = _rows(outputs[0], 6, "ssd mxnet (MultiBoxDetection)")
        return rows[:, 0], rows[:, 1], rows[:, 2:6]

    def check(self, outputs: Sequence[Array]) -> None:
        self._split(outputs)

    def __call__(
        self, outputs: Sequence[Array], geometry: Geometry, frame_w: int, frame_h: int
    ) -> Decoded:
        ids, scores, boxes = self._split(outputs)
        ids = np.rint(ids).astype(np.int64)
        keep = (ids >= 0) & (scores >= self.threshold)
        if self.background_id is not None:
            keep &= ids != self.background_id
        idx = np.flatnonzero(keep)
        idx = idx[np.argsort(-scores[idx], kind="stable")][: self.max_detections]
        dets = _detections(
            self.labels, ids[idx], scores[idx], boxes[idx], geometry, frame_w, frame_h
        )
        return Decoded(detections=dets)


# ------------------------------------------------------------------------------ yolo


def _sigmoid(x: Array) -> FloatArray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def decode_yolo_grid(
    raw: Array, anchors: Sequence[float], input_w: int, input_h: int, class_threshold: float
) -> FloatArray:
    """One raw YOLOv3 output ``(1, A*(5+C), H, W)`` -> rows in the darknet layout.

    Rows are ``[cx, cy, w, h, obj, obj*sigmoid(class)...]``, normalized to the input, class
    scores at or below ``class_threshold`` zeroed; the same as ``darknet.py``'s yolo layer.
    """
    a = np.asarray(raw, dtype=np.float64)
    pairs = np.asarray(anchors, dtype=np.float64).reshape(-1, 2)
    n_anchors = len(pairs)
    if a.ndim != 4 or a.shape[0] != 1 or a.shape[1] % n_anchors:
        raise DecodeError(f"yolo raw grid: expected (1, A*(5+C), H, W), got {a.shape}")
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


class YoloDecoder:
    """YOLO rows ``[cx, cy, w, h, obj, class scores (already x obj)...]`` -> detections.

    Accepts our MXNet/ONNX exports (one ``(1, boxes, 5+C)`` output), OpenCV's darknet reader
    (one ``(boxes, 5+C)`` array per yolo layer, concatenated here) and, with the ``anchors``
    option, raw YOLOv3 grids.  Score = best class column; per-class NMS.
    """

    def __init__(self, manifest: Manifest, mask_png: bool = False) -> None:
        opts = manifest.decoder_options
        self.labels = manifest.labels
        self.width = 5 + len(self.labels)
        self.threshold = manifest.score_threshold
        self.nms_threshold = manifest.nms_threshold
        self.max_detections = int(opts.get("max_detections", 100))
        self.class_threshold = float(opts.get("class_threshold", 0.2))
        self.anchors: list[list[float]] | None = opts.get("anchors")
        self.input_size = (manifest.input.width, manifest.input.height)

    def rows(self, outputs: Sequence[Array]) -> Array:
        """All outputs as one ``(boxes, 5 + classes)`` array."""
        if self.anchors is not None:
            if len(self.anchors) != len(outputs):
                raise DecodeError(
                    f"yolo: {len(outputs)} outputs but anchors for {len(self.anchors)}"
                )
            parts = [
                decode_yolo_grid(o, a, *self.input_size, self.class_threshold)
                for o, a in zip(outputs, self.anchors, strict=True)
            ]
        else:
            parts = [np.asarray(o) for o in outputs]
        if not parts:
            raise DecodeError("yolo: the model gave no outputs")
        for p in parts:
            batched = p.ndim == 3 and p.shape[0] == 1
            if p.shape[-1] != self.width or not (p.ndim == 2 or batched):
                raise DecodeError(
                    f"yolo: output of shape {p.shape} does not fit {len(self.labels)} labels "
                    f"(expected (1, boxes, {self.width}) or (boxes, {self.width}))"
                )
        flat = [p.reshape(-1, self.width) for p in parts]
        return flat[0] if len(flat) == 1 else np.concatenate(flat, axis=0)

    def check(self, outputs: Sequence[Array]) -> None:
        self.rows(outputs)

    def __call__(
        self, outputs: Sequence[Array], geometry: Geometry, frame_w: int, frame_h: int
    ) -> Decoded:
        rows = self.rows(outputs)
        # Class columns are objectness x class probability, so never above objectness: rows
        # whose objectness misses the threshold cannot pass it (most of them; 3x faster).
        rows = rows[rows[:, 4] >= self.threshold]
        cls = rows[:, 5:]
        ids = cls.argmax(axis=1)
        scores = cls[np.arange(len(rows)), ids]
        keep = np.flatnonzero(scores >= self.threshold)
        if keep.size == 0:
            return Decoded()
        cxcy, wh = rows[keep, 0:2].astype(np.float64), rows[keep, 2:4].astype(np.float64)
        boxes = np.concatenate([cxcy - wh / 2, cxcy + wh / 2], axis=1)
        # NMS on input-normalized boxes: the letterbox mapping only scales and shifts each
        # axis, which leaves IoU unchanged, so this is the same as NMS in frame pixels.
        ids, scores = ids[keep], scores[keep]
        kept = nms(boxes, scores, ids, self.nms_threshold)[: self.max_detections]
        dets = _detections(
            self.labels, ids[kept], scores[kept], boxes[kept], geometry, frame_w, frame_h
        )
        return Decoded(detections=dets)


# ------------------------------------------------------------------------------ segmentation


class SegmentationDecoder:
    """``(1, C, H, W)`` scores or ``(1, H, W)`` class map -> per-class area and box.

    Only the part of the map that holds the image counts (letterbox padding is cut off);
    areas are fractions of it, boxes are in frame coordinates.  With ``mask_png`` the class
    map (at the model's output resolution, padding cut off) is encoded as an 8-bit PNG.
    """

    def __init__(self, manifest: Manifest, mask_png: bool = False) -> None:
        self.labels = manifest.labels
        self.mask_png = mask_png
        bg = manifest.decoder_options.get("background_id")
        self.background_id: int | None = None if bg is None else int(bg)
        if mask_png and len(self.labels) > 256:
            raise DecodeError(f"segmentation: {len(self.labels)} classes do not fit an 8-bit PNG")

    def class_map(self, outputs: Sequence[Array]) -> Array:
        if len(outputs) != 1:
            raise DecodeError(f"segmentation: expected 1 output, got {len(outputs)}")
        a = np.asarray(outputs[0])
        if a.ndim == 4 and a.shape[0] == 1 and a.shape[1] > 1:
            if a.shape[1] != len(self.labels):
                raise DecodeError(
                    f"segmentation: {a.shape[1]} score channels but {len(self.labels)} labels"
                )
            return a[0].argmax(axis=0)
        if a.ndim in (3, 4) and math.prod(a.shape[:-2]) == 1:
            return np.rint(a.reshape(a.shape[-2:])).astype(np.int64)
        if a.ndim == 2:
            return np.rint(a).astype(np.int64)
        raise DecodeError(f"segmentation: expected (1, C, H, W) or (1, H, W), got {a.shape}")

    def check(self, outputs: Sequence[Array]) -> None:
        self.class_map(outputs)

    def __call__(
        self, outputs: Sequence[Array], geometry: Geometry, frame_w: int, frame_h: int
    ) -> Decoded:
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
                    label=_label(self.labels, int(cid)),
                    class_id=int(cid),
                    area=_score(counts[cid] / cmap.size),
                    box=box,
                )
            )
        png = None
        if self.mask_png:
            ok, buf = cv2.imencode(".png", np.clip(cmap, 0, 255).astype(np.uint8))
            if not ok:
                raise DecodeError("segmentation: PNG encoding failed")
            png = buf.tobytes()
        return Decoded(segments=segments, mask_png=png)


DECODERS: dict[str, type[Decoder]] = {
    "classification": ClassificationDecoder,
    "ssd": SSDDecoder,
    "yolo": YoloDecoder,
    "segmentation": SegmentationDecoder,
}
