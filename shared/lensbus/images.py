"""JPEG encode/decode helpers, including decoding at reduced scale in the DCT domain."""

from __future__ import annotations

import cv2
import numpy as np

# cv2 flags for decoding at 1/1, 1/2, 1/4 and 1/8 of the size: libjpeg skips the work
# in the DCT domain, which is much cheaper than decoding in full and resizing.
_REDUCED = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


class ImageError(ValueError):
    """Bytes that are not a decodable image."""


def encode_jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ImageError("JPEG encoding failed")
    return buf.tobytes()


def reduction_for(width: int, height: int, need_w: int, need_h: int) -> int:
    """The largest JPEG reduction (1, 2, 4, 8) that still leaves at least the needed size."""
    factor = 1
    for f in (2, 4, 8):
        if width // f >= need_w and height // f >= need_h:
            factor = f
    return factor


def decode_jpeg(data: bytes, reduction: int = 1) -> np.ndarray:
    """Decode JPEG bytes to a BGR image, optionally at 1/2, 1/4 or 1/8 scale."""
    if not data:
        raise ImageError("empty image")
    buf = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buf, _REDUCED[reduction])
    if image is None:
        raise ImageError("not a decodable JPEG")
    return image
