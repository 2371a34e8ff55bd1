"""Drawing the project stream: a result's boxes, labels, scores and masks on its frame; a
tracked detection's id and its cascade attributes (``#12 car 0.88 | taxi 0.91``); the
camera's zones (outline, name, occupancy) and lines (name, in/out counts); the shapes
projects asked for (``ctx.overlay``: boxes, lines, polygons, text, and blurred regions).

Pure functions on bytes and arrays, run in worker threads (OpenCV releases the GIL).
Boxes are placed from their normalized coordinates, so a result for a frame of another
size (a smaller rendition) still lands right.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from lensbus.images import decode_jpeg, decode_png, encode_jpeg
from lensbus.schemas import Box, Detection, Result
from lensbus.schemas.project import Shape
from lensbus_publisher.overlay import Overlay

# Saturated, bright BGR colours that survive JPEG's chroma subsampling; picked by class id.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 255, 255),  # yellow
    (255, 255, 0),  # cyan
    (0, 255, 0),  # green
    (255, 0, 255),  # magenta
    (0, 128, 255),  # orange
    (255, 128, 0),  # azure
    (128, 255, 0),  # spring green
    (0, 0, 255),  # red
    (255, 0, 128),  # violet
    (128, 0, 255),  # pink
    (0, 255, 128),  # chartreuse
    (255, 255, 255),  # white
)
FONT = cv2.FONT_HERSHEY_SIMPLEX
# Zones and lines: colours of their own, so they are not taken for a box of some class.
ZONE_COLOR = (200, 120, 0)  # BGR steel blue
LINE_COLOR = (60, 20, 220)  # BGR crimson
# A blurred region is shrunk to this many pixels across its longer side and scaled back:
# whatever was there (a face) is a few soft colour patches, not recognisable.
BLUR_CELLS = 6


def color_for(class_id: int) -> tuple[int, int, int]:
    """The BGR colour a class is drawn in."""
    return PALETTE[class_id % len(PALETTE)]


def line_width(width: int, height: int) -> int:
    """Box line thickness in pixels for a frame size (3 at VGA, 4 at 1080p)."""
    return max(3, round(min(width, height) / 270))


@dataclass(frozen=True)
class Rendered:
    jpeg: bytes
    decode_s: float
    draw_s: float
    encode_s: float

    @property
    def total_s(self) -> float:
        return self.decode_s + self.draw_s + self.encode_s


def _pixels(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    left = min(width - 1, max(0, round(box.xmin * width)))
    top = min(height - 1, max(0, round(box.ymin * height)))
    right = min(width - 1, max(0, round(box.xmax * width)))
    bottom = min(height - 1, max(0, round(box.ymax * height)))
    return left, top, right, bottom


def _label(
    img: np.ndarray, text: str, x: int, y: int, color: tuple[int, int, int], scale: float
) -> None:
    """Text on a filled background, above (x, y) where there is room, else inside below."""
    thick = max(1, round(scale * 2))
    (tw, th), base = cv2.getTextSize(text, FONT, scale, thick)
    h, w = img.shape[:2]
    pad = max(2, round(th * 0.3))
    x = min(max(0, x), max(0, w - tw - 2 * pad))
    top = y - th - base - 2 * pad
    if top < 0:
        top = min(h - th - base - 2 * pad, y)
    top = max(0, top)
    cv2.rectangle(img, (x, top), (x + tw + 2 * pad, top + th + base + 2 * pad), color, -1)
    b, g, r = color
    dark = 0.114 * b + 0.587 * g + 0.299 * r > 140  # light background: black text
    cv2.putText(
        img,
        text,
        (x + pad, top + pad + th),
        FONT,
        scale,
        (0, 0, 0) if dark else (255, 255, 255),
        thick,
        cv2.LINE_AA,
    )


def _mask(img: np.ndarray, result: Result) -> None:
    """Blend the segmentation class map (a PNG at the model's resolution) over the frame.
    The PNG came over the bus: a bomb raises :class:`ImageError` before it is decoded (the
    frame is then not drawn, counted as a render error)."""
    if not result.mask_png or not result.segments:
        return
    cmap = decode_png(result.mask_png)
    if cmap.ndim != 2:
        return
    h, w = img.shape[:2]
    cmap = cv2.resize(cmap, (w, h), interpolation=cv2.INTER_NEAREST)
    lut = np.zeros((256, 3), np.uint8)
    shown = np.zeros(256, bool)
    for seg in result.segments:
        if 0 <= seg.class_id < 256:
            lut[seg.class_id] = color_for(seg.class_id)
            shown[seg.class_id] = True
    where = shown[cmap]
    if not where.any():
        return
    overlay = lut[cmap]
    img[where] = (img[where].astype(np.uint16) + overlay[where]) // 2


def det_text(det: Detection) -> str:
    """A detection's label: ``#id`` when tracked (its consensus label), then the attributes
    its cascades gave. ASCII only: OpenCV's Hershey fonts draw nothing else."""
    text = f"{det.label} {det.score:.2f}"
    if det.track_id is not None:
        text = f"#{det.track_id} {det.track_label or det.label} {det.score:.2f}"
    for attr in det.attributes:
        text += f" | {attr.label} {attr.score:.2f}"
    return text


def _zones(img: np.ndarray, overlay: Overlay, thick: int, scale: float) -> None:
    h, w = img.shape[:2]

    def px(p: tuple[float, float]) -> tuple[int, int]:
        return min(w - 1, round(p[0] * w)), min(h - 1, round(p[1] * h))

    for zone in overlay.zones:
        pts = np.array([px(p) for p in zone.points], np.int32)
        cv2.polylines(img, [pts], True, ZONE_COLOR, max(2, thick - 1), cv2.LINE_AA)
        x, y = pts.min(axis=0)
        _label(img, f"{zone.name}: {zone.occupancy}", int(x), int(y), ZONE_COLOR, scale)
    for ln in overlay.lines:
        a, b = px(ln.a), px(ln.b)
        cv2.line(img, a, b, LINE_COLOR, thick, cv2.LINE_AA)
        text = f"{ln.name} in {ln.count_in} out {ln.count_out}"
        _label(img, text, min(a[0], b[0]), min(a[1], b[1]), LINE_COLOR, scale)


def hex_bgr(color: str) -> tuple[int, int, int]:
    """'#rrggbb' as OpenCV's BGR."""
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return b, g, r


def _shape_px(img: np.ndarray, shape: Shape) -> np.ndarray:
    h, w = img.shape[:2]
    pts = [(round(x * w), round(y * h)) for x, y in shape.points]
    return np.clip(np.array(pts, np.int32), 0, [w - 1, h - 1]).astype(np.int32)


def blur(img: np.ndarray, shapes: Sequence[Shape]) -> None:
    """Blur the regions of the ``blur`` shapes beyond recognition (in place)."""
    for shape in shapes:
        if shape.shape != "blur":
            continue
        pts = _shape_px(img, shape)
        (x0, y0), (x1, y1) = pts.min(axis=0), pts.max(axis=0) + 1
        roi = img[y0:y1, x0:x1]
        rh, rw = roi.shape[:2]
        if rh < 2 or rw < 2:
            continue
        f = BLUR_CELLS / max(rw, rh)
        small = cv2.resize(
            roi, (max(1, round(rw * f)), max(1, round(rh * f))), interpolation=cv2.INTER_AREA
        )
        # Bilinear back up: soft gradients with no cell edges (a Gaussian pass on the full
        # region would cost ~10x the whole blur, for nothing a viewer could recognise).
        roi[:] = cv2.resize(small, (rw, rh), interpolation=cv2.INTER_LINEAR)


def draw_shapes(img: np.ndarray, shapes: Sequence[Shape], scale: float) -> None:
    """The projects' boxes (with their label), lines, polygons and texts (in place)."""
    for shape in shapes:
        color = hex_bgr(shape.color)
        pts = _shape_px(img, shape)
        if shape.shape == "box":
            (x0, y0), (x1, y1) = pts.min(axis=0), pts.max(axis=0)
            cv2.rectangle(img, (int(x0), int(y0)), (int(x1), int(y1)), color, shape.thickness)
            if shape.text:
                _label(img, shape.text, int(x0) - shape.thickness // 2, int(y0), color, scale)
        elif shape.shape in ("line", "polygon"):
            closed = shape.shape == "polygon"
            cv2.polylines(img, [pts], closed, color, shape.thickness, cv2.LINE_AA)
        elif shape.shape == "text" and shape.text:
            _label(img, shape.text, int(pts[0][0]), int(pts[0][1]), color, scale)


def draw(
    img: np.ndarray,
    result: Result | None,
    note: str = "",
    overlay: Overlay | None = None,
    shapes: Sequence[Shape] = (),
) -> None:
    """Draw ``result`` (and the camera's zones and lines, and the projects' shapes) on
    ``img`` (BGR, in place). Blurred regions go first: what is drawn on top stays sharp."""
    h, w = img.shape[:2]
    thick = line_width(w, h)
    scale = max(0.45, min(w, h) / 900)
    blur(img, shapes)
    if overlay is not None:  # under the boxes: an object on a line stays readable
        _zones(img, overlay, thick, scale)
    if result is not None:
        _mask(img, result)
        for seg in result.segments:
            left, top, _, _ = _pixels(seg.box, w, h)
            text = f"{seg.label} {seg.area:.0%}"
            _label(img, text, left, top + 1, color_for(seg.class_id), scale)
        for det in result.detections:
            color = color_for(det.class_id)
            left, top, right, bottom = _pixels(det.box, w, h)
            cv2.rectangle(img, (left, top), (right, bottom), color, thick)
            _label(img, det_text(det), left - thick // 2, top, color, scale)
        y = 0
        for cls in result.classes[:5]:
            text = f"{cls.label} {cls.score:.2f}"
            (_, th), base = cv2.getTextSize(text, FONT, scale, max(1, round(scale * 2)))
            y += th + base + 8
            _label(img, text, 4, y, color_for(cls.class_id), scale)
    if note:
        small = max(0.4, scale * 0.8)
        (_, th), base = cv2.getTextSize(note, FONT, small, 1)
        _label(img, note, 0, h, (40, 40, 40), small)
    draw_shapes(img, shapes, scale)


def caption(result: Result | None, frame_seq: int) -> str:
    if result is None:
        return f"#{frame_seq}  no result"
    m = result.model
    lag = "" if result.seq == frame_seq else f" (result #{result.seq})"
    return f"#{frame_seq}{lag}  {m.name}:{m.version}  {result.latency_s * 1000:.0f} ms"


def render(
    jpeg: bytes,
    result: Result | None,
    frame_seq: int,
    quality: int = 80,
    overlay: Overlay | None = None,
    shapes: Sequence[Shape] = (),
) -> Rendered:
    """Decode a frame, draw a result on it, encode it again (one project frame)."""
    t0 = time.perf_counter()
    img = decode_jpeg(jpeg)
    t1 = time.perf_counter()
    draw(img, result, caption(result, frame_seq), overlay, shapes)
    t2 = time.perf_counter()
    out = encode_jpeg(img, quality)
    t3 = time.perf_counter()
    return Rendered(jpeg=out, decode_s=t1 - t0, draw_s=t2 - t1, encode_s=t3 - t2)
