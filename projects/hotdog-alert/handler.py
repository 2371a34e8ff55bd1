"""Hot dog alert: the DeepLens developer guide's own example, as a lensbus project.

lensbus calls ``on_result`` with every result of YOLOv3-tiny (COCO: it knows "hot dog") on
the cameras of the project's groups. When the label (setting ``label``) is seen on
``min_count`` results in a row on a camera, the project

- raises an event (``ctx.event``): the publisher keeps its snapshot and clip and sends it to
  the webhooks of rules that select ``projects: [hotdog-alert]``;
- publishes an alert on its topic ``alert`` (``lensbus watch`` shows it as JSON);

and every sighting is boxed on the project stream (``ctx.overlay``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lensbus.projects.context import Context
    from lensbus.schemas import Detection, Result

# Results in a row with the label, per camera. Kept in memory: a restart or a new version
# starts counting again, which is what "N in a row" means anyway.
streaks: dict[str, int] = {}


def on_start(ctx: Context) -> None:
    streaks.clear()
    label, count = ctx.settings["label"], ctx.settings["min_count"]
    ctx.log.info("alerting when %r is seen %d results in a row", label, count)


def on_result(result: Result, ctx: Context) -> None:
    seen = best_sighting(result, ctx.settings["label"], ctx.settings.get("min_score", 0.3))
    if seen is None:
        streaks[result.camera] = 0  # the streak is broken
        return
    streak = streaks[result.camera] = streaks.get(result.camera, 0) + 1
    ctx.counter("sightings", "results with the label").inc()
    ctx.overlay([sighting_box(seen, ctx.settings.get("color", "#ff00ff"))])
    # Once per streak: the label has to go away and come back for another alert.
    if streak == ctx.settings["min_count"]:
        alert(seen, streak, ctx)


def best_sighting(result: Result, label: str, min_score: float) -> Detection | None:
    """The detection of ``label`` with the highest score, if one reaches ``min_score``."""
    found = [d for d in result.detections if d.label == label and d.score >= min_score]
    return max(found, key=lambda d: d.score, default=None)


def sighting_box(seen: Detection, color: str) -> dict[str, Any]:
    """A box a little outside the model's own (which the project stream draws too), so both
    show. Points are normalised: 0..1 of the frame, x right, y down."""
    b, pad = seen.box, 0.01
    corners = [[b.xmin - pad, b.ymin - pad], [b.xmax + pad, b.ymax + pad]]
    return {"shape": "box", "points": corners, "text": f"{seen.label}!", "color": color}


def alert(seen: Detection, streak: int, ctx: Context) -> None:
    b = seen.box
    ctx.counter("alerts", "alerts raised").inc()
    ctx.event(seen.label, score=seen.score, box=b, detail={"in_a_row": streak})
    ctx.publish(
        "alert",
        {
            "label": seen.label,
            "score": round(seen.score, 3),
            "in_a_row": streak,
            "box": [b.xmin, b.ymin, b.xmax, b.ymax],
        },
    )
    ctx.log.info("%s seen %d times in a row on %s", seen.label, streak, ctx.camera)
