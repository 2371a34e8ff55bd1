"""BGR uint8 image -> model input tensor, as the manifest's ``input`` says.

The tensor is ``(pixel * scale - mean) / std`` per channel, in the model's colour order and
layout, float32, batch of one.  OpenCV does resize, channel swap, normalisation and layout in
one native pass (``cv2.dnn.blobFromImageWithParams``, per-channel scale since OpenCV 4.8):
measured ~0.8-1 ms for 1280x720 -> 416x416, NCHW or NHWC, on this 2-core machine; a numpy
version (resize, swap, fused multiply-add into one float32 buffer) took ~3.5 ms for NHWC.

``letterbox`` keeps the aspect ratio: the image is scaled to fit and centred on a canvas of
``pad_value``; ``letterbox_top_left`` puts it in the top-left corner (padding right and
bottom), as YOLOX's and NudeNet's own preprocessing do.  Both matter more than they look:
the detectors are not shift-invariant (centring ddddocr's YOLOX input moved its scores by up
to 0.15 and swapped its low-score detections on darknet's dog.jpg), and NudeNet's YOLOv8,
fed black padding by its own code, moved its box on person.jpg by 1.6 px on grey.  Where the
image landed is kept in a :class:`lensbus.geometry.Geometry`, which the decoders use to map
boxes from the model's input back to the frame (in normalized coordinates; see there).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from lensbus.geometry import STRETCH, Geometry
from lensbus.schemas import InputSpec

# The default letterbox fill, in BGR pixel values: mid grey, as darknet's letterbox (0.5).
LETTERBOX_FILL: int = InputSpec.model_fields["pad_value"].default


def letterbox_layout(
    image_w: int, image_h: int, input_w: int, input_h: int, top_left: bool = False
) -> tuple[int, int, int, int]:
    """``(new_w, new_h, left, top)``: the scaled image's size and its offset in the input.

    ``top_left`` follows YOLOX's own ``preproc``, sizes rounded down; centred, Ultralytics'
    ``LetterBox``, sizes rounded.  A pixel less changed ddddocr's scores on kite.jpg by 0.1.
    """
    scale = min(input_w / image_w, input_h / image_h)
    to_int = int if top_left else round
    new_w = max(1, min(input_w, to_int(image_w * scale)))
    new_h = max(1, min(input_h, to_int(image_h * scale)))
    if top_left:
        return new_w, new_h, 0, 0
    return new_w, new_h, (input_w - new_w) // 2, (input_h - new_h) // 2


@dataclass(frozen=True)
class Prepared:
    tensor: npt.NDArray[np.float32]
    geometry: Geometry


class Preprocessor:
    """Turns BGR uint8 images into the tensor ``spec`` describes; reusable and cheap to call."""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        self.size = (spec.width, spec.height)
        std = np.array(spec.std, dtype=np.float64)
        # (p * scale - mean) / std == (p - mean / scale) * (scale / std), OpenCV's form.
        params = cv2.dnn.Image2BlobParams()
        params.scalefactor = (*(spec.scale / std), 0.0)
        params.mean = (*(np.array(spec.mean) / spec.scale), 0.0)
        params.size = self.size
        params.swapRB = spec.color == "rgb"
        params.ddepth = cv2.CV_32F
        params.datalayout = (
            cv2.dnn.DNN_LAYOUT_NCHW if spec.layout == "NCHW" else cv2.dnn.DNN_LAYOUT_NHWC
        )
        self._params = params

    @property
    def shape(self) -> tuple[int, int, int, int]:
        w, h = self.size
        return (1, 3, h, w) if self.spec.layout == "NCHW" else (1, h, w, 3)

    def __call__(self, image: npt.NDArray[np.uint8]) -> Prepared:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected BGR uint8 (H, W, 3), got {image.dtype} {image.shape}")
        geometry = STRETCH
        if self.spec.resize != "stretch":
            image, geometry = self._letterbox(image)
        blob = cv2.dnn.blobFromImageWithParams(image, self._params)
        return Prepared(blob.astype(np.float32, copy=False), geometry)

    def _letterbox(self, image: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.uint8], Geometry]:
        in_w, in_h = self.size
        h, w = image.shape[:2]
        top_left = self.spec.resize == "letterbox_top_left"
        new_w, new_h, left, top = letterbox_layout(w, h, in_w, in_h, top_left)
        canvas = np.full((in_h, in_w, 3), self.spec.pad_value, dtype=np.uint8)
        canvas[top : top + new_h, left : left + new_w] = cv2.resize(
            image, (new_w, new_h), interpolation=cv2.INTER_LINEAR
        )
        return canvas, Geometry(left / in_w, top / in_h, new_w / in_w, new_h / in_h)
