"""The zones' counts and occupancy as Prometheus metrics (labels: camera, line or zone,
direction, label: all bounded by the pipeline's configuration and the model's labels).

:class:`CameraZoneState` keeps the counts itself (they survive a reconfigure); a
:class:`ZoneMetrics` per camera mirrors them after each update: counters advance by what
was counted since the last export, gauges are set, and the series of zones and lines that
left the configuration are removed.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from lensbus_analytics.zones import CameraZoneState

LINE_CROSSINGS = Counter(
    "lensbus_analytics_line_crossings_total",
    "Crossings of a line by tracked objects, per direction (in: from the left of a->b to its "
    "right as drawn on the image)",
    ["camera", "line", "direction", "label"],
)
ZONE_OCCUPANCY = Gauge(
    "lensbus_analytics_zone_occupancy",
    "Tracked objects inside a zone now",
    ["camera", "zone", "label"],
)
ZONE_POINTS_SKIPPED = Counter(
    "lensbus_analytics_zone_points_skipped_total",
    "Tracked objects the zones could not place (e.g. a box that is not finite)",
    ["camera", "reason"],
)


class ZoneMetrics:
    """One camera's zone and line series."""

    def __init__(self, camera: str) -> None:
        self.camera = camera
        self._counts: dict[tuple[str, str, str], int] = {}
        self._occupancy: set[tuple[str, str]] = set()
        self._skipped: dict[str, int] = {}

    def export(self, state: CameraZoneState) -> None:
        """Mirror the state's counts, occupancy and skipped points (after an update)."""
        for key, n in state.counts.items():
            done = self._counts.get(key, 0)
            if n > done:
                LINE_CROSSINGS.labels(self.camera, *key).inc(n - done)
            elif n < done:
                # Only a line removed and added back under its name starts over: its
                # counter restarts with it (Prometheus reads a drop as a reset).
                LINE_CROSSINGS.remove(self.camera, *key)
                LINE_CROSSINGS.labels(self.camera, *key).inc(n)
        for key in self._counts.keys() - state.counts.keys():
            LINE_CROSSINGS.remove(self.camera, *key)
        self._counts = dict(state.counts)
        for zkey, occupied in state.occupancy.items():
            ZONE_OCCUPANCY.labels(self.camera, *zkey).set(occupied)
        for zkey in self._occupancy - state.occupancy.keys():
            ZONE_OCCUPANCY.remove(self.camera, *zkey)
        self._occupancy = set(state.occupancy)
        for reason, n in state.skipped.items():
            done = self._skipped.get(reason, 0)
            if n > done:
                ZONE_POINTS_SKIPPED.labels(self.camera, reason).inc(n - done)
        self._skipped = dict(state.skipped)

    def remove(self) -> None:
        """The camera has no zones any more: its series go."""
        for key in self._counts:
            LINE_CROSSINGS.remove(self.camera, *key)
        for zkey in self._occupancy:
            ZONE_OCCUPANCY.remove(self.camera, *zkey)
        self._counts, self._occupancy = {}, set()
