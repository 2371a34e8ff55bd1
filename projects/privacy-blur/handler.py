"""Privacy blur: faces blurred on the project stream.

The face SSD finds the faces; for each the project asks the publisher to blur a box a little
larger than the face (hair, ears and a detector's tight box included) on the project stream.
The device stream (the camera's own JPEGs) is never touched: what is recorded and what
programs read stays exact, what people watch is blurred.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lensbus.projects.context import Context
    from lensbus.schemas import Box, Result


def on_result(result: Result, ctx: Context) -> None:
    min_score = ctx.settings.get("min_score", 0.5)
    padding = ctx.settings.get("padding", 0.2)
    faces = [d.box for d in result.detections if d.label == "face" and d.score >= min_score]
    if faces:
        ctx.counter("faces", "faces blurred").inc(len(faces))
    # Sent for every result, even an empty one: the shapes live for ttl_s, so a face that
    # has just left is not blurred in the wrong place for long.
    ctx.overlay([blur(box, padding) for box in faces], ttl_s=0.5)


def blur(box: Box, padding: float) -> dict[str, Any]:
    """A blur shape over ``box`` grown by ``padding`` of its size on each side, kept inside
    the frame (points are normalised: 0..1 of the frame)."""
    dx, dy = (box.xmax - box.xmin) * padding, (box.ymax - box.ymin) * padding
    x0, y0 = max(box.xmin - dx, 0.0), max(box.ymin - dy, 0.0)
    x1, y1 = min(box.xmax + dx, 1.0), min(box.ymax + dy, 1.0)
    return {"shape": "blur", "points": [[x0, y0], [x1, y1]]}
