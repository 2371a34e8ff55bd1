"""One camera's analytics: its results in order through the tracker, then its zones.

``CameraAnalytics.apply`` takes one result (in seq order), sets each detection's track id,
consensus label and first-seen time, runs the camera's zones and lines on the tracked
objects' normalised boxes, and returns the result (with its ``track`` and ``zones`` stage
timings appended) and the zone events, as the messages to publish.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from lensbus.schemas import Event, Result
from lensbus.schemas.pipeline import CameraZones, TrackStage, ZonesStage
from lensbus.schemas.result import Detection, StageTiming
from lensbus_analytics import metrics
from lensbus_analytics.tracker import Observation, Tracker, TrackInfo
from lensbus_analytics.zone_metrics import ZoneMetrics
from lensbus_analytics.zones import CameraZoneState, TrackPoint, ZoneEvent


@dataclass
class Seen:
    """A track's newest detection: what a 'leave' event names after the track is gone."""

    detection: Detection
    t: float


def observation(det: Detection, width: int, height: int) -> Observation:
    b = det.box
    box = (b.xmin * width, b.ymin * height, b.xmax * width, b.ymax * height)
    return Observation(box=box, score=det.score, label=det.label, class_id=det.class_id)


class CameraAnalytics:
    def __init__(self, camera: str, track: TrackStage, zones: ZonesStage | None) -> None:
        self.camera = camera
        self.track = track
        self.tracker = Tracker(track)
        self.zones: CameraZoneState | None = None
        self.zone_metrics = ZoneMetrics(camera)
        self.seen: dict[int, Seen] = {}  # live tracks' newest detections
        self.configure(track, zones)

    def configure(self, track: TrackStage, zones: ZonesStage | None) -> None:
        """A pipeline change: the tracker keeps its tracks, the zones their counts."""
        if track != self.track:
            self.tracker.reconfigure(track)
            self.track = track
        mine: CameraZones | None = zones.cameras.get(self.camera) if zones else None
        if zones is None or mine is None:
            if self.zones is not None:
                self.zone_metrics.remove()
            self.zones = None
        elif self.zones is None:
            self.zones = CameraZoneState(mine, zones.anchor)
        else:
            self.zones.reconfigure(mine, zones.anchor)

    def close(self) -> None:
        """The pipeline no longer tracks: this camera's series go."""
        self.zone_metrics.remove()
        with contextlib.suppress(KeyError):  # no result applied yet: no series
            metrics.TRACKS_ACTIVE.remove(self.camera)

    def apply(self, result: Result, stages: tuple[str, str]) -> tuple[Result, list[Event]]:
        """Track and zone one result (in order); ``stages`` names the track and zones stages."""
        t = result.capture_ns / 1e9
        t0 = time.perf_counter()
        dets = self._track(result, t)
        track_s = time.perf_counter() - t0
        tracked = sum(d.track_id is not None for d in dets)
        timings = [StageTiming(stage=stages[0], kind="track", ms=track_s * 1e3, items=tracked)]
        metrics.STAGE_SECONDS.labels(self.camera, "track").observe(track_s)
        metrics.TRACKS_ACTIVE.labels(self.camera).set(len(self.tracker.active))
        events: list[ZoneEvent] = []
        if self.zones is not None:
            t1 = time.perf_counter()
            events = self._zone(dets, t)
            zones_s = time.perf_counter() - t1
            metrics.STAGE_SECONDS.labels(self.camera, "zones").observe(zones_s)
            timings.append(
                StageTiming(stage=stages[1], kind="zones", ms=zones_s * 1e3, items=len(events))
            )
        out = result.model_copy(update={"detections": dets, "stages": [*result.stages, *timings]})
        messages = [self._event(out, ev) for ev in events]
        self.expire(t)
        return out, messages

    def _track(self, result: Result, t: float) -> list[Detection]:
        w, h = result.width, result.height
        infos = self.tracker.update([observation(d, w, h) for d in result.detections], t)
        dets = []
        for det, info in zip(result.detections, infos, strict=True):
            dets.append(det if info is None else self._tracked(det, info, t))
        return dets

    def _tracked(self, det: Detection, info: TrackInfo, t: float) -> Detection:
        out = det.model_copy(
            update={
                "track_id": info.track_id,
                "track_label": info.label,
                "track_since_ns": max(0, round(info.since * 1e9)),
            }
        )
        self.seen[info.track_id] = Seen(out, t)
        return out

    def _zone(self, dets: list[Detection], t: float) -> list[ZoneEvent]:
        assert self.zones is not None
        points = [
            TrackPoint(d.track_id, d.track_label, (d.box.xmin, d.box.ymin, d.box.xmax, d.box.ymax))
            for d in dets
            if d.track_id is not None
        ]
        events = self.zones.update(points, t) + self._forget(t)
        self.zone_metrics.export(self.zones)
        return events

    def _forget(self, t: float) -> list[ZoneEvent]:
        """Tracks unseen for longer than the tracker keeps a lost one have ended: their
        'leave' events (and the memory of them) go."""
        assert self.zones is not None
        gone = [tid for tid, s in self.seen.items() if t - s.t > self.track.lost_s]
        events: list[ZoneEvent] = []
        for tid in gone:
            events += self.zones.forget(tid, t)
        return events

    def expire(self, t: float) -> None:
        """Forget tracks gone for good (after their 'leave' events were made)."""
        for tid in [tid for tid, s in self.seen.items() if t - s.t > self.track.lost_s]:
            del self.seen[tid]

    def _event(self, result: Result, ev: ZoneEvent) -> Event:
        seen = self.seen.get(ev.track_id)
        det = seen.detection if seen else None
        metrics.EVENTS.labels(self.camera, ev.trigger).inc()
        return Event(
            rule=ev.zone,
            camera=self.camera,
            label=ev.label,
            score=det.score if det else 0.0,
            seq=result.seq,
            capture_ns=result.capture_ns,
            event_ns=time.time_ns(),
            model=result.model,
            box=det.box if det else None,
            trigger=ev.trigger,
            zone=ev.zone,
            direction=ev.direction,
            track_id=ev.track_id,
            dwell_s=ev.dwell_s,
        )
