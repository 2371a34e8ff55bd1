"""The group's cameras: decode a result, put it in order, track and zone it.

``Analytics.on_detections`` files one message from ``detections.<camera>`` and returns what
to publish now (results in seq order with their events); ``flush`` releases what waited for
a seq that never came. ``configure`` follows the group's pipeline: a change keeps every
camera's tracks and counts; a pipeline without a track stage (or none) stops the work, and
results read meanwhile are counted and not published (inference publishes them itself).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from lensbus import metrics as shared_metrics
from lensbus.codec import decode
from lensbus.errors import DecodeError, Rejected
from lensbus.logs import RateLimit, log_limited
from lensbus.schemas import Event, Result
from lensbus.schemas.pipeline import Pipeline, TrackStage
from lensbus_analytics import metrics
from lensbus_analytics.camera import CameraAnalytics
from lensbus_analytics.config import AnalyticsSettings
from lensbus_analytics.reorder import Reorder, Step

log = logging.getLogger(__name__)


@dataclass
class Out:
    """Messages to publish, in order."""

    results: list[Result] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


class Analytics:
    def __init__(self, settings: AnalyticsSettings) -> None:
        self.s = settings
        self.pipeline: Pipeline | None = None
        self.cameras: dict[str, CameraAnalytics] = {}
        self.order: dict[str, Reorder[Result]] = {}
        self.rejected = 0
        self.published = 0
        self._limit = RateLimit(60.0)

    @property
    def track(self) -> TrackStage | None:
        return self.pipeline.tracker if self.pipeline else None

    def configure(self, pipeline: Pipeline | None) -> None:
        self.pipeline = pipeline
        track = self.track
        if track is None:
            # Nothing to follow: tracks end (a later track stage starts afresh).
            for cam in self.cameras.values():
                cam.close()
            self.cameras.clear()
            self.order.clear()
            return
        for cam in self.cameras.values():
            cam.configure(track, pipeline.zones if pipeline else None)

    def reject(self, reason: str, exc: Exception) -> None:
        self.rejected += 1
        shared_metrics.MESSAGES_REJECTED.labels(reason).inc()
        log_limited(
            log, self._limit, reason, logging.WARNING, "rejected a result (%s): %s", reason, exc
        )

    def on_detections(self, subject_camera: str, data: bytes, now: float) -> Out:
        out = Out()
        if self.track is None:
            metrics.RESULTS_IGNORED.inc()
            return out
        try:
            result = decode(data, Result)
            if result.camera != subject_camera:
                raise Rejected("camera_mismatch", f"{result.camera!r} on {subject_camera!r}")
            order = self._order(result.camera)
        except (DecodeError, Rejected) as exc:
            self.reject(exc.reason, exc)
            return out
        metrics.RESULTS_IN.labels(result.camera).inc()
        step = order.push(result.seq, result, now)
        if step.late:
            metrics.RESULTS_LATE.labels(result.camera).inc()
            out.results.append(result)  # untracked: the tracker has moved past its frame
        if step.held:
            metrics.RESULTS_REORDERED.labels(result.camera).inc()
        self._apply(result.camera, step, out)
        return out

    def flush(self, now: float) -> Out:
        out = Out()
        for camera, order in self.order.items():
            if len(order):
                self._apply(camera, order.flush(now), out)
        return out

    def _order(self, camera: str) -> Reorder[Result]:
        order = self.order.get(camera)
        if order is None:
            if len(self.order) >= self.s.max_cameras:
                raise Rejected("too_many_cameras", f"over max_cameras={self.s.max_cameras}")
            order = self.order[camera] = Reorder(self.s.reorder_frames, self.s.reorder_wait_s)
        return order

    def _apply(self, camera: str, step: Step[Result], out: Out) -> None:
        if step.gaps:
            metrics.GAPS.labels(camera).inc(step.gaps)
        if not step.ready:
            return
        pipeline, track = self.pipeline, self.track
        assert pipeline is not None and track is not None
        zones = pipeline.zones
        cam = self.cameras.get(camera)
        if cam is None:
            cam = self.cameras[camera] = CameraAnalytics(camera, track, zones)
        names = (track.name, zones.name if zones else "zones")
        for result in step.ready:
            tracked, events = cam.apply(result, names)
            out.results.append(tracked)
            out.events += events
