"""Zones and lines (pure logic): crossings per direction, segments, dropped frames,
hysteresis, concave zones, enter/leave/loiter timing, label filters, reconfigure, forget, and
their Prometheus series."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from lensbus.schemas.pipeline import CameraZones, Line, Zone
from lensbus.shapes import anchor_point, inside_polygon, side
from lensbus_analytics.zone_metrics import ZoneMetrics
from lensbus_analytics.zones import (
    LINE_BAND,
    STALE_S,
    ZONE_BAND,
    CameraZoneState,
    TrackPoint,
    ZoneEvent,
)

# A horizontal line drawn left to right across the middle: its right (as drawn, y down) is
# BELOW it, so walking down the image crosses it 'in'.
DOOR = Line(name="door", a=(0.2, 0.5), b=(0.8, 0.5))
SQUARE = [(0.2, 0.2), (0.6, 0.2), (0.6, 0.6), (0.2, 0.6)]
# A U open at the top: the notch x 0.4..0.6, y 0.1..0.6 is outside.
U_SHAPE = [
    (0.2, 0.1),
    (0.4, 0.1),
    (0.4, 0.6),
    (0.6, 0.6),
    (0.6, 0.1),
    (0.8, 0.1),
    (0.8, 0.9),
    (0.2, 0.9),
]


def at(track_id: int, x: float, y: float, label: str = "person") -> TrackPoint:
    """A track whose bottom centre is (x, y)."""
    return TrackPoint(track_id, label, (x - 0.02, y - 0.1, x + 0.02, y))


def lines(*ls: Line) -> CameraZoneState:
    return CameraZoneState(CameraZones(lines=list(ls)), "bottom_center")


def zones(*zs: Zone) -> CameraZoneState:
    return CameraZoneState(CameraZones(zones=list(zs)), "bottom_center")


def walk(state: CameraZoneState, track_id: int, path: list[tuple[float, float]], t0=0.0):
    events: list[ZoneEvent] = []
    for i, (x, y) in enumerate(path):
        events += state.update([at(track_id, x, y)], t0 + i * 0.1)
    return events


# --- lines -----------------------------------------------------------------------------


def test_walking_down_across_a_left_to_right_line_is_in_and_up_is_out():
    state = lines(DOOR)
    events = walk(state, 1, [(0.5, 0.3), (0.5, 0.45), (0.5, 0.55), (0.5, 0.7)])
    assert events == [ZoneEvent("cross", "door", 1, "person", direction="in")]
    events = walk(state, 2, [(0.4, 0.7), (0.4, 0.3)])
    assert events == [ZoneEvent("cross", "door", 2, "person", direction="out")]
    assert state.counts == {("door", "in", "person"): 1, ("door", "out", "person"): 1}


def test_direction_follows_how_the_line_is_drawn():
    # Drawn top to bottom: its right as drawn is the image's LEFT (x smaller).
    down = lines(Line(name="gate", a=(0.5, 0.1), b=(0.5, 0.9)))
    assert walk(down, 1, [(0.7, 0.5), (0.3, 0.5)])[0].direction == "in"
    assert walk(down, 2, [(0.3, 0.5), (0.7, 0.5)])[0].direction == "out"
    # The same door drawn right to left: walking down is now 'out'.
    flipped = lines(Line(name="door", a=DOOR.b, b=DOOR.a))
    assert walk(flipped, 1, [(0.5, 0.3), (0.5, 0.7)])[0].direction == "out"


def test_side_sign_is_right_of_a_to_b_as_drawn_with_y_down():
    assert side((0.0, 0.5), (1.0, 0.5), (0.5, 0.9)) > 0  # below a rightward line: its right
    assert side((0.0, 0.5), (1.0, 0.5), (0.5, 0.1)) < 0
    assert side((0.0, 0.5), (1.0, 0.5), (0.3, 0.5)) == 0


def test_a_line_crossed_beyond_its_segment_does_not_count():
    state = lines(DOOR)
    assert walk(state, 1, [(0.9, 0.3), (0.9, 0.7)]) == []  # right of b
    assert walk(state, 2, [(0.1, 0.7), (0.1, 0.3)]) == []  # left of a
    # A jump whose straight path passes beyond the end, then back through the line.
    assert walk(state, 3, [(0.75, 0.3), (0.95, 0.7)]) == []
    assert walk(state, 3, [(0.6, 0.3)], t0=1.0)[0].direction == "out"
    assert state.counts == {("door", "out", "person"): 1}


def test_the_ends_of_the_segment_count():
    state = lines(DOOR)
    assert len(walk(state, 1, [(0.2, 0.4), (0.2, 0.6)])) == 1
    assert len(walk(state, 2, [(0.8, 0.4), (0.8, 0.6)])) == 1


def test_a_jump_across_the_line_over_dropped_frames_counts_once():
    state = lines(DOOR)
    events = state.update([at(1, 0.5, 0.1), at(2, 0.3, 0.9)], 0.0)
    # Frames 1..9 dropped or without these tracks (others still seen).
    for i in range(1, 10):
        events += state.update([at(3, 0.9, 0.9)], i * 0.1)
    events += state.update([at(1, 0.5, 0.9), at(2, 0.3, 0.2)], 1.0)
    assert sorted((e.track_id, e.direction) for e in events) == [(1, "in"), (2, "out")]


def test_back_and_forth_counts_each_crossing():
    state = lines(DOOR)
    events = walk(state, 1, [(0.5, 0.4), (0.5, 0.6), (0.5, 0.4), (0.5, 0.6), (0.5, 0.4)])
    assert [e.direction for e in events] == ["in", "out", "in", "out"]
    assert state.counts == {("door", "in", "person"): 2, ("door", "out", "person"): 2}


def test_jitter_on_the_line_does_not_count():
    state = lines(DOOR)
    d = LINE_BAND * 0.8
    path = [(0.5, 0.3), (0.5, 0.5), (0.5, 0.5 + d), (0.5, 0.5 - d), (0.5, 0.5), (0.5, 0.5 + d)]
    assert walk(state, 1, path) == []  # came from above, never left the band
    assert walk(state, 1, [(0.5, 0.3)], t0=1.0) == []  # and went back: nothing crossed
    # Standing exactly on the line, then going on: one crossing.
    assert len(walk(state, 2, [(0.5, 0.3), (0.5, 0.5), (0.5, 0.5), (0.5, 0.7)])) == 1
    # A new track first seen on the line commits to no side until it leaves the band.
    assert walk(state, 3, [(0.5, 0.5), (0.5, 0.7), (0.5, 0.5)]) == []
    assert state.counts == {("door", "in", "person"): 1}


def test_line_labels_filter_and_events_switch():
    state = lines(
        Line(name="cars", a=(0.2, 0.5), b=(0.8, 0.5), labels=["car"]),
        Line(name="quiet", a=(0.2, 0.5), b=(0.8, 0.5), events=False),
    )
    events = state.update([at(1, 0.5, 0.3, "car"), at(2, 0.4, 0.3, "person")], 0.0)
    events += state.update([at(1, 0.5, 0.7, "car"), at(2, 0.4, 0.7, "person")], 0.1)
    assert events == [ZoneEvent("cross", "cars", 1, "car", direction="in")]
    assert state.counts == {
        ("cars", "in", "car"): 1,
        ("quiet", "in", "car"): 1,
        ("quiet", "in", "person"): 1,
    }


def test_anchor_bottom_center_or_center():
    box = (0.4, 0.4, 0.6, 0.7)
    assert anchor_point(box, "bottom_center") == (0.5, 0.7)
    assert anchor_point(box, "center") == pytest.approx((0.5, 0.55))
    # A box straddling the door: its feet are past it, its centre is not.
    cfg = CameraZones(lines=[DOOR])
    for anchor, crossed in (("bottom_center", 1), ("center", 0)):
        state = CameraZoneState(cfg, anchor)
        state.update([TrackPoint(1, "person", (0.45, 0.1, 0.55, 0.3))], 0.0)
        assert len(state.update([TrackPoint(1, "person", (0.45, 0.35, 0.55, 0.62))], 0.1)) == (
            crossed
        )


def test_random_drops_still_count_every_walker():
    """The issue's figure: 30 % of frames dropped at random; walkers straight through the
    door still count exactly (their last anchor before the gap is on their side)."""
    rng = random.Random(7)
    state = lines(DOOR)
    truth = {"in": 0, "out": 0}
    walkers = []
    for tid in range(1, 41):
        x = rng.uniform(0.25, 0.75)
        down = rng.random() < 0.5
        truth["in" if down else "out"] += 1
        ys = [0.1 + 0.8 * k / 30 for k in range(31)]
        walkers.append((tid, x, ys if down else ys[::-1], rng.randrange(0, 20)))
    for frame in range(60):
        if rng.random() < 0.3:
            continue
        pts = [at(tid, x, ys[frame - s]) for tid, x, ys, s in walkers if 0 <= frame - s < 31]
        state.update(pts, frame / 10)
    got = {d: state.counts.get(("door", d, "person"), 0) for d in ("in", "out")}
    assert abs(got["in"] - truth["in"]) <= 1 and abs(got["out"] - truth["out"]) <= 1
    assert got == truth


def _orient(p, q, r) -> float:
    return (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])


def _reference_crossings(line: Line, path) -> list[str]:
    """The textbook orientation test for two segments, between successive anchors seen off
    the line's band: an independent check of the state's parametric one."""
    a, b = line.a, line.b
    dirs, last = [], None
    for p in path:
        s = side(a, b, p)
        if abs(s) <= LINE_BAND:
            continue
        if last is not None and (side(a, b, last) > 0) != (s > 0):
            o1, o2 = _orient(last, p, a), _orient(last, p, b)
            # A path through an end of the line, to rounding: either answer is right.
            assume(min(abs(o1), abs(o2)) > 1e-7)
            if o1 * o2 < 0:
                dirs.append("in" if s > 0 else "out")
        last = p
    return dirs


coords = st.floats(0.0, 1.0)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(coords, coords), min_size=2, max_size=12), coords, coords)
def test_crossings_match_a_reference_on_any_path(path, ax, by):
    line = Line(name="l", a=(ax, 0.3), b=(0.7, by))
    state = lines(line)
    events = walk(state, 1, path)
    assert [e.direction for e in events] == _reference_crossings(line, path)
    # Crossings around the ends aside, in and out alternate: the net is where it ended up.
    ins, outs = (sum(e.direction == d for e in events) for d in ("in", "out"))
    assert abs(ins - outs) <= len(path)


# --- zones -----------------------------------------------------------------------------


def test_concave_polygon_inside_and_outside():
    assert inside_polygon(U_SHAPE, (0.3, 0.3))  # left arm
    assert inside_polygon(U_SHAPE, (0.7, 0.3))  # right arm
    assert inside_polygon(U_SHAPE, (0.5, 0.8))  # base
    assert not inside_polygon(U_SHAPE, (0.5, 0.3))  # the notch
    assert not inside_polygon(U_SHAPE, (0.9, 0.5))
    assert not inside_polygon(U_SHAPE, (0.5, 0.05))
    state = zones(Zone(name="u", points=U_SHAPE))
    assert walk(state, 1, [(0.5, 0.05), (0.5, 0.3), (0.5, 0.5)]) == []  # down the notch
    events = walk(state, 1, [(0.5, 0.8)], t0=1.0)
    assert [e.trigger for e in events] == ["enter"]


def test_enter_leave_loiter_timing():
    state = zones(Zone(name="lobby", points=SQUARE, loiter_s=2.0))
    out: list[tuple[float, list[ZoneEvent]]] = []
    for t, x in ((0.0, 0.1), (1.0, 0.4), (2.9, 0.4), (3.0, 0.4), (4.0, 0.4), (6.0, 0.9)):
        out.append((t, state.update([at(1, x, 0.4)], t)))
    got = [(t, e.trigger, e.dwell_s) for t, evs in out for e in evs]
    assert got == [(1.0, "enter", None), (3.0, "loiter", 2.0), (6.0, "leave", 5.0)]
    # A new visit loiters again (once per visit).
    evs = state.update([at(1, 0.4, 0.4)], 7.0) + state.update([at(1, 0.4, 0.4)], 9.5)
    assert [(e.trigger, e.dwell_s) for e in evs] == [("enter", None), ("loiter", 2.5)]


def test_loiter_while_the_detection_flickers():
    state = zones(Zone(name="lobby", points=SQUARE, loiter_s=1.0))
    assert [e.trigger for e in state.update([at(1, 0.4, 0.4)], 0.0)] == ["enter"]
    assert state.update([], 0.5) == []
    assert [(e.trigger, e.track_id) for e in state.update([], 1.2)] == [("loiter", 1)]
    assert state.occupancy == {("lobby", "person"): 1}


def test_occupancy_per_zone_and_label():
    state = zones(
        Zone(name="a", points=SQUARE), Zone(name="b", points=[(0.5, 0.5), (0.9, 0.5), (0.9, 0.9)])
    )
    state.update([at(1, 0.3, 0.3), at(2, 0.4, 0.4), at(3, 0.3, 0.5, "car"), at(4, 0.8, 0.6)], 0)
    assert state.occupancy == {("a", "person"): 2, ("a", "car"): 1, ("b", "person"): 1}
    state.update([at(1, 0.95, 0.95), at(4, 0.58, 0.55)], 1)  # 1 leaves; 4 is in both
    assert state.occupancy == {("a", "person"): 2, ("a", "car"): 1, ("b", "person"): 1}
    state.update([at(2, 0.95, 0.95), at(3, 0.95, 0.95, "car"), at(4, 0.95, 0.1)], 2)
    # Emptied zones read 0 rather than vanishing.
    assert state.occupancy == {("a", "person"): 0, ("a", "car"): 0, ("b", "person"): 0}


def test_zone_labels_filter_and_listed_events_only():
    state = zones(
        Zone(name="cars", points=SQUARE, labels=["car"]),
        Zone(name="quiet", points=SQUARE, events=["loiter"], loiter_s=1.0),
    )
    events = state.update([at(1, 0.4, 0.4, "car"), at(2, 0.3, 0.3)], 0.0)
    assert [(e.trigger, e.zone, e.track_id) for e in events] == [("enter", "cars", 1)]
    assert state.occupancy == {("cars", "car"): 1, ("quiet", "car"): 1, ("quiet", "person"): 1}
    events = state.update([at(1, 0.4, 0.4, "car"), at(2, 0.3, 0.3)], 1.0)
    assert sorted((e.trigger, e.zone, e.track_id) for e in events) == [
        ("loiter", "quiet", 1),
        ("loiter", "quiet", 2),
    ]
    events = state.update([at(1, 0.9, 0.9, "car")], 2.0)
    assert [(e.trigger, e.zone) for e in events] == [("leave", "cars")]


def test_label_change_moves_the_object_or_ends_its_visit():
    state = zones(Zone(name="lot", points=SQUARE, labels=["car", "truck"]))
    state.update([at(1, 0.4, 0.4, "car")], 0.0)
    assert state.update([at(1, 0.4, 0.4, "truck")], 0.1) == []
    assert state.occupancy == {("lot", "car"): 0, ("lot", "truck"): 1}
    events = state.update([at(1, 0.4, 0.4, "person")], 0.2)  # no longer counted here
    assert [(e.trigger, e.label) for e in events] == [("leave", "truck")]


def test_zone_edge_jitter_does_not_leave():
    state = zones(Zone(name="lobby", points=SQUARE))
    edge = 0.6
    events = walk(
        state,
        1,
        [
            (0.4, 0.4),
            (edge - 0.001, 0.4),
            (edge + ZONE_BAND * 0.8, 0.4),
            (edge - 0.001, 0.4),
            (edge + ZONE_BAND * 0.8, 0.4),
        ],
    )
    assert [e.trigger for e in events] == ["enter"]
    assert [e.trigger for e in walk(state, 1, [(edge + 0.05, 0.4)], t0=1.0)] == ["leave"]


def test_forget_gives_leave_with_dwell_and_clears_the_track():
    state = CameraZoneState(
        CameraZones(zones=[Zone(name="lobby", points=SQUARE)], lines=[DOOR]), "bottom_center"
    )
    state.update([at(1, 0.4, 0.45)], 10.0)
    assert state.forget(1, 13.5) == [ZoneEvent("leave", "lobby", 1, "person", dwell_s=3.5)]
    assert state.occupancy == {("lobby", "person"): 0}
    assert state.forget(1, 14.0) == []
    assert state.forget(99, 14.0) == []
    # Its line side went too: the id seen again below the door is a new start, no crossing.
    assert [e.trigger for e in state.update([at(1, 0.4, 0.7)], 15.0)] == []


def test_stale_tracks_are_dropped_when_never_forgotten():
    state = zones(Zone(name="lobby", points=SQUARE))
    state.update([at(1, 0.4, 0.4)], 0.0)
    events = state.update([at(2, 0.9, 0.9)], STALE_S + 20.0)
    assert [(e.trigger, e.track_id) for e in events] == [("leave", 1)]


def test_reconfigure_keeps_counts_of_kept_lines_and_zones():
    side_door = Line(name="side", a=(0.5, 0.2), b=(0.5, 0.8))
    lobby = Zone(name="lobby", points=SQUARE)
    state = CameraZoneState(CameraZones(zones=[lobby], lines=[DOOR, side_door]), "bottom_center")
    state.update([at(2, 0.3, 0.3)], 0.0)  # stays in the lobby
    walk(state, 1, [(0.4, 0.4), (0.4, 0.7), (0.6, 0.7)])  # through the lobby, door, side
    assert state.counts == {("door", "in", "person"): 1, ("side", "out", "person"): 1}
    moved = Line(name="door", a=(0.2, 0.8), b=(0.8, 0.8))  # now below the track
    state.reconfigure(
        CameraZones(zones=[lobby, Zone(name="new", points=SQUARE)], lines=[moved]), "center"
    )
    assert state.counts == {("door", "in", "person"): 1}
    assert state.occupancy == {("lobby", "person"): 1}
    # Moving the line under a standing track is no crossing; walking across it is.
    assert state.update([at(1, 0.6, 0.7)], 1.0) == []
    assert [e.direction for e in walk(state, 1, [(0.6, 0.95)], t0=2.0)] == ["in"]
    assert state.counts == {("door", "in", "person"): 2}
    state.reconfigure(CameraZones(), "center")
    assert state.counts == {} and state.occupancy == {}


def test_non_finite_boxes_are_skipped_and_counted():
    state = lines(DOOR)
    assert state.update([TrackPoint(1, "person", (math.nan, 0.1, 0.2, 0.3))], 0.0) == []
    assert state.skipped == {"non_finite": 1}
    assert len(walk(state, 2, [(0.5, 0.3), (0.5, 0.7)])) == 1


# --- metrics ---------------------------------------------------------------------------


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_metrics_mirror_counts_and_occupancy():
    cam = "zones-metrics-cam"
    state = CameraZoneState(
        CameraZones(zones=[Zone(name="lobby", points=SQUARE)], lines=[DOOR]), "bottom_center"
    )
    exporter = ZoneMetrics(cam)
    crossings = "lensbus_analytics_line_crossings_total"
    occupancy = "lensbus_analytics_zone_occupancy"
    walk(state, 1, [(0.4, 0.4), (0.4, 0.7)])
    exporter.export(state)
    assert sample(crossings, camera=cam, line="door", direction="in", label="person") == 1
    assert sample(occupancy, camera=cam, zone="lobby", label="person") == 0
    walk(state, 1, [(0.4, 0.3), (0.4, 0.7)], t0=1.0)
    state.update([TrackPoint(2, "person", (math.inf, 0.3, 0.4, 0.4))], 2.0)
    exporter.export(state)
    assert sample(crossings, camera=cam, line="door", direction="in", label="person") == 2
    assert sample(crossings, camera=cam, line="door", direction="out", label="person") == 1
    assert sample(occupancy, camera=cam, zone="lobby", label="person") == 0
    assert (
        sample("lensbus_analytics_zone_points_skipped_total", camera=cam, reason="non_finite") == 1
    )
    state.update([at(3, 0.3, 0.3)], 3.0)
    exporter.export(state)
    assert sample(occupancy, camera=cam, zone="lobby", label="person") == 1
    state.reconfigure(CameraZones(lines=[DOOR]), "bottom_center")
    exporter.export(state)
    assert sample(occupancy, camera=cam, zone="lobby", label="person") is None
    assert sample(crossings, camera=cam, line="door", direction="in", label="person") == 2
    exporter.remove()
    assert sample(crossings, camera=cam, line="door", direction="in", label="person") is None
