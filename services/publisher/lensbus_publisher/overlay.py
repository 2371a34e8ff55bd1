"""A camera's zones and lines as the project stream draws them and the page shows them,
with their live figures: occupancy per zone (the tracked objects of the newest result whose
anchor point is inside it) and crossings per line and direction (the analytics service's
``cross`` events, counted since this publisher started).

The zones come from the camera group's pipeline (KV ``pipeline.<group>`` in the
deployments bucket, followed live); a camera's group is the one the cameras bucket gives it,
else the ``pipeline_group`` setting. Nothing is scraped from the analytics service: results
and events carry what is needed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from lensbus.schemas import Event, Result
from lensbus.schemas.pipeline import CameraZones, Pipeline, ZonesStage
from lensbus.shapes import Pt, anchor_point, inside_polygon
from lensbus_publisher import metrics
from lensbus_publisher.config import PublisherSettings
from lensbus_publisher.hub import Hub

log = logging.getLogger(__name__)

MAX_LINES = 64  # crossing counters per camera: event names are made up by whoever publishes


@dataclass(frozen=True)
class ZoneView:
    name: str
    points: list[Pt]
    occupancy: int


@dataclass(frozen=True)
class LineView:
    name: str
    a: Pt
    b: Pt
    count_in: int
    count_out: int


@dataclass(frozen=True)
class Overlay:
    """What is drawn on one project frame besides the result's boxes."""

    zones: list[ZoneView] = field(default_factory=list)
    lines: list[LineView] = field(default_factory=list)


def occupancy(zone_points: list[Pt], labels: list[str], anchor: str, result: Result) -> int:
    """Tracked objects of ``result`` whose anchor point lies in the zone."""
    n = 0
    for det in result.detections:
        if det.track_id is None or (labels and (det.track_label or det.label) not in labels):
            continue
        b = det.box
        n += inside_polygon(zone_points, anchor_point((b.xmin, b.ymin, b.xmax, b.ymax), anchor))
    return n


class Overlays:
    """The pipelines' zones per group and the crossing counts per camera."""

    def __init__(self, settings: PublisherSettings, hub: Hub) -> None:
        self.s = settings
        self.hub = hub
        self.stages: dict[str, ZonesStage | None] = {}  # group: its zones stage
        self.crossings: dict[str, dict[str, list[int]]] = {}  # camera: line: [in, out]

    def group_of(self, camera: str) -> str:
        d = self.hub.directory
        cfg = None if d is None else d.configs.get(camera)
        return (cfg.group if cfg is not None else None) or self.s.pipeline_group

    def set_pipeline(self, group: str, pipeline: Pipeline | None) -> None:
        self.stages[group] = None if pipeline is None else pipeline.zones

    def stage_of(self, camera: str) -> ZonesStage | None:
        return self.stages.get(self.group_of(camera))

    def zones_of(self, camera: str) -> CameraZones | None:
        stage = self.stage_of(camera)
        return None if stage is None else stage.cameras.get(camera)

    def forget(self, camera: str) -> None:
        self.crossings.pop(camera, None)

    def on_event(self, event: Event) -> bool:
        """Count a line crossing; whether the counts changed."""
        if event.trigger != "cross" or event.direction not in ("in", "out"):
            return False
        lines = self.crossings.setdefault(event.camera, {})
        if event.zone not in lines and len(lines) >= MAX_LINES:
            metrics.ZONE_EVENTS_IGNORED.labels("too_many_lines").inc()
            return False
        counts = lines.setdefault(event.zone, [0, 0])
        counts[0 if event.direction == "in" else 1] += 1
        return True

    def overlay(self, camera: str, result: Result | None) -> Overlay | None:
        """The zones and lines of a camera with their figures; None when it has none."""
        stage = self.stage_of(camera)
        cz = None if stage is None else stage.cameras.get(camera)
        if stage is None or cz is None:
            return None
        counts = self.crossings.get(camera, {})
        zones = [
            ZoneView(
                z.name,
                list(z.points),
                0 if result is None else occupancy(list(z.points), z.labels, stage.anchor, result),
            )
            for z in cz.zones
        ]
        lines = [LineView(ln.name, ln.a, ln.b, *counts.get(ln.name, [0, 0])) for ln in cz.lines]
        return Overlay(zones, lines)

    def view(self, camera: str, result: Result | None) -> dict[str, Any]:
        """``/api/cameras/<id>/zones``: the group, its zones and lines, their figures."""
        ov = self.overlay(camera, result)
        return {
            "camera": camera,
            "group": self.group_of(camera),
            "result_seq": None if result is None else result.seq,
            "zones": [
                {"name": z.name, "points": z.points, "occupancy": z.occupancy}
                for z in (ov.zones if ov else [])
            ],
            "lines": [
                {"name": ln.name, "a": ln.a, "b": ln.b, "in": ln.count_in, "out": ln.count_out}
                for ln in (ov.lines if ov else [])
            ],
        }
