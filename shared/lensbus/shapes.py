"""Plane geometry for zones and lines, in normalised frame coordinates (x right, y DOWN):
the analytics service counts with it, the publisher draws occupancy with it.

Because y points down, the usual orientation flips: for a line a->b, a point with a positive
:func:`side` lies to the RIGHT of a->b as drawn on the image (walking from a to b on the
screen, the right hand points there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Pt = tuple[float, float]
BoxT = tuple[float, float, float, float]


def anchor_point(box: BoxT, anchor: str) -> Pt:
    """The point of a box that is in a zone or crosses a line: ``bottom_center`` (where an
    object stands on the ground) or ``center``."""
    x1, y1, x2, y2 = box
    if anchor == "center":
        return ((x1 + x2) / 2.0, (y1 + y2) / 2.0)
    return ((x1 + x2) / 2.0, y2)


def side(a: Pt, b: Pt, p: Pt) -> float:
    """Signed distance of p from the infinite line through a->b: > 0 right of a->b as drawn
    on the image (y down), < 0 left."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    return (dx * (p[1] - a[1]) - dy * (p[0] - a[0])) / math.hypot(dx, dy)


def crosses_segment(a: Pt, b: Pt, p0: Pt, p1: Pt) -> bool:
    """Whether the movement p0->p1, whose ends lie strictly on opposite sides of the line
    through a->b, meets the line where it is the SEGMENT a-b (ends included), not its
    infinite extension."""
    s0, s1 = side(a, b, p0), side(a, b, p1)
    if s0 == s1:
        return False
    t = s0 / (s0 - s1)
    q = (p0[0] + t * (p1[0] - p0[0]), p0[1] + t * (p1[1] - p0[1]))
    dx, dy = b[0] - a[0], b[1] - a[1]
    u = ((q[0] - a[0]) * dx + (q[1] - a[1]) * dy) / (dx * dx + dy * dy)
    # The ends count, rounding included: a path through an end is not lost to 1e-17.
    return -1e-9 <= u <= 1.0 + 1e-9


def inside_polygon(poly: Sequence[Pt], p: Pt) -> bool:
    """Even-odd ray casting: right for concave polygons too (each crossing of a horizontal
    ray from p toggles inside/outside, whatever the polygon's shape)."""
    x, y = p
    inside = False
    n = len(poly)
    for i in range(n):
        xi, yi = poly[i]
        xj, yj = poly[i - 1]
        # Half-open rule (yi > y) != (yj > y): a vertex exactly at the ray's height is
        # counted once, not twice.
        if (yi > y) != (yj > y) and x < xi + (y - yi) * (xj - xi) / (yj - yi):
            inside = not inside
    return inside


def distance_to_polygon(poly: Sequence[Pt], p: Pt) -> float:
    """Distance from p to the nearest edge of the polygon (its boundary)."""
    return min(_distance_to_segment(poly[i - 1], poly[i], p) for i in range(len(poly)))


def _distance_to_segment(a: Pt, b: Pt, p: Pt) -> float:
    dx, dy = b[0] - a[0], b[1] - a[1]
    length2 = dx * dx + dy * dy
    u = 0.0 if length2 == 0.0 else ((p[0] - a[0]) * dx + (p[1] - a[1]) * dy) / length2
    u = min(1.0, max(0.0, u))
    return math.hypot(p[0] - (a[0] + u * dx), p[1] - (a[1] + u * dy))
