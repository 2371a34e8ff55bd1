"""People counter: crossings of a line, per direction, counted from track ids.

The project's pipeline (project.json) runs YOLOv3-tiny and a tracker, so every person in a
result carries a ``track_id`` that stays with them from frame to frame. A track whose anchor
(the bottom centre of its box: where a person stands) moves from one side of the line to the
other has crossed it: ``in`` from the left of a->b to its right as drawn, ``out`` the other way.

The totals and each track's last side live in ``ctx.state`` (the project's own KV bucket), so
a restart or a new version carries on counting. Counts are published on the topic ``counts``
when they change and drawn, with the line, on the project stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lensbus.shapes import anchor_point, crosses_segment, side

if TYPE_CHECKING:
    from lensbus.projects.context import Context
    from lensbus.schemas import Result

# A point this close to the line (0..1 of the frame) is on it: not a side yet.
ON_LINE = 0.005


def on_start(ctx: Context) -> None:
    line = ctx.settings["line"]
    ctx.log.info("counting %ss crossing %s", ctx.settings["label"], line["name"])


def on_result(result: Result, ctx: Context) -> None:
    line = ctx.settings["line"]
    # One record per camera: {"in": n, "out": n, "tracks": {track id: [side, x, y, seen_ns]}}
    counts = ctx.state.get(result.camera) or {"in": 0, "out": 0, "tracks": {}}
    before = (counts["in"], counts["out"])
    for d in result.detections:
        if d.track_id is None or d.label != ctx.settings["label"]:
            continue  # untracked (not a person, or a result that came too late to track)
        b = d.box
        point = anchor_point((b.xmin, b.ymin, b.xmax, b.ymax), "bottom_center")
        direction = step(counts["tracks"], str(d.track_id), line, point, result.capture_ns)
        if direction is not None:
            counts[direction] += 1
    forget(counts["tracks"], result.capture_ns, ctx.settings.get("forget_s", 10.0))
    ctx.state.set(result.camera, counts)
    if (counts["in"], counts["out"]) != before:
        ctx.publish("counts", {"line": line["name"], "in": counts["in"], "out": counts["out"]})
        ctx.gauge("people_in", "crossings in").set(counts["in"])
        ctx.gauge("people_out", "crossings out").set(counts["out"])
    ctx.overlay(drawing(line, counts, ctx.settings.get("color", "#00ffff")))


def step(
    tracks: dict[str, list[Any]], track: str, line: dict[str, Any], p: tuple[float, float], ns: int
) -> str | None:
    """Move one track's anchor to ``p``: the direction of the crossing it completes, or None."""
    a, b = tuple(line["a"]), tuple(line["b"])
    s = side(a, b, p)
    if abs(s) <= ON_LINE:
        return None  # on the line: the crossing counts once it is clearly on the other side
    now = 1 if s > 0 else -1
    last = tracks.get(track)
    tracks[track] = [now, p[0], p[1], ns]
    if last is None or last[0] == now:
        return None
    # Sides changed; it is a crossing only where the line is drawn, not on its extension.
    if not crosses_segment(a, b, (last[1], last[2]), p):
        return None
    return "in" if now > 0 else "out"


def forget(tracks: dict[str, list[Any]], now_ns: int, forget_s: float) -> None:
    """Drop tracks unseen for ``forget_s``: the record stays small on a busy street."""
    for track in [t for t, v in tracks.items() if now_ns - v[3] > forget_s * 1e9]:
        del tracks[track]


def drawing(line: dict[str, Any], counts: dict[str, Any], color: str) -> list[dict[str, Any]]:
    """The line (thick, so the pipeline's own thinner line drawn there too does not hide it)
    and the counts beside its first end."""
    text = f"{line['name']}: in {counts['in']}  out {counts['out']}"
    x, y = line["a"]
    at = [min(x + 0.02, 0.7), max(y + 0.05, 0.05)]
    return [
        {"shape": "line", "points": [line["a"], line["b"]], "color": color, "thickness": 8},
        {"shape": "text", "points": [at], "text": text, "color": color},
    ]
