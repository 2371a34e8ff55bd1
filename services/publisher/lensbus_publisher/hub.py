"""The publisher's view of the bus: every camera it has seen and the heartbeats of every
service. Messages come in decoded here, bad ones are rejected (counted, logged); nothing
here does I/O.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from lensbus import metrics as shared_metrics
from lensbus.cameras import View
from lensbus.codec import DecodeError, decode
from lensbus.errors import InvalidName, Rejected
from lensbus.logs import RateLimit, log_limited
from lensbus.schemas import Event, FrameEnvelope, Result, Status, clip_id
from lensbus.schemas.project import Overlay
from lensbus.subjects import Subjects
from lensbus_publisher import metrics
from lensbus_publisher.camera import Camera, FrameItem, ResultItem
from lensbus_publisher.config import PublisherSettings
from lensbus_publisher.projects import ProjectFrame
from lensbus_publisher.sse import Subscribers, result_json, sse

log = logging.getLogger(__name__)

EVENTS_KEPT = 100  # recent events /api/events lists


class Hub:
    """Every camera the publisher has seen, and every service's last heartbeat."""

    def __init__(self, settings: PublisherSettings) -> None:
        self.s = settings
        self.cameras: dict[str, Camera] = {}
        self.statuses: dict[tuple[str, str], tuple[Status, float]] = {}
        self.all_results = Subscribers()  # SSE clients of every camera
        self.closing = False
        self.rejected = 0
        self.events: deque[Event] = deque(maxlen=EVENTS_KEPT)  # newest last, for the page
        self.directory: View | None = None  # the cameras bucket, once it is followed
        self._listed: set[str] = set()  # cameras the bucket has named
        self._limit = RateLimit(60.0)
        self._next_forget = 0.0
        # Called with a forgotten camera's id: the parts that keep state per camera free it.
        self.on_forget: list[Callable[[str], None]] = []

    # ---- bad input ---------------------------------------------------------------------

    def reject(self, reason: str, what: str, exc: Exception) -> None:
        self.rejected += 1
        shared_metrics.MESSAGES_REJECTED.labels(reason).inc()
        log_limited(
            log,
            self._limit,
            f"{what}:{reason}",
            logging.WARNING,
            "rejected a %s (%s): %s",
            what,
            reason,
            exc,
        )

    def camera(self, camera_id: str, create: bool = False) -> Camera | None:
        cam = self.cameras.get(camera_id)
        if cam is None and create:
            self.forget_silent(force=True)
            if len(self.cameras) >= self.s.max_cameras:
                self._evict()
            cam = Camera(camera_id, self.s.frame_ring, self.s.result_ring)
            self.cameras[camera_id] = cam
            for stream in metrics.STREAMS:
                metrics.VIEWERS.labels(camera_id, stream).set(0)
            log.info("new camera %s", camera_id)
        return cam

    # ---- bounded table: ids anyone can make up must not hold a slot for good ---------------

    def forget_silent(self, force: bool = False) -> None:
        """Forget the cameras silent for ``camera_forget_s`` (checked at most once a second
        unless ``force``d); a camera a stream holds stays."""
        now = time.monotonic()
        if not force and now < self._next_forget:
            return
        self._next_forget = now + 1.0
        limit = self.s.camera_forget_s
        for cid in [c for c, cam in self.cameras.items() if now - cam.heard > limit]:
            if not self.cameras[cid].watched:
                self._forget(cid, "silent")

    def _evict(self) -> None:
        """Make room in a full table: the longest silent camera no stream holds goes (a
        flood of made-up ids then costs the real cameras nothing while they send)."""
        idle = [cam for cam in self.cameras.values() if not cam.watched]
        if not idle:
            raise Rejected("too_many_cameras", f"over max_cameras={self.s.max_cameras}")
        self._forget(min(idle, key=lambda cam: cam.heard).id, "evicted")

    def _forget(self, camera_id: str, reason: str) -> None:
        cam = self.cameras.pop(camera_id)
        cam.frames.clear()
        cam.results.clear()
        for stream in metrics.STREAMS:  # its metric series go too: they are state as well
            for gauge in (metrics.VIEWERS, metrics.FRAMES_SERVED):
                with contextlib.suppress(KeyError):
                    gauge.remove(camera_id, stream)
        for per_camera in (metrics.FRAMES_RECEIVED, metrics.RESULTS_RECEIVED):
            with contextlib.suppress(KeyError):
                per_camera.remove(camera_id)
        for hook in self.on_forget:
            hook(camera_id)
        metrics.CAMERAS_FORGOTTEN.labels(reason).inc()
        log_limited(
            log,
            self._limit,
            f"forget:{reason}",
            logging.INFO,
            "forgot camera %s (%s, silent %.0f s); more are counted in "
            "lensbus_publisher_cameras_forgotten_total",
            camera_id,
            reason,
            time.monotonic() - cam.heard,
        )

    def _camera_of_message(self, camera: str, subject_camera: str) -> Camera:
        """The camera a message names (created when new); the subject must name it too."""
        if camera != subject_camera:
            raise Rejected("camera_mismatch", f"{camera!r} on {subject_camera!r}")
        cam = self.camera(camera, create=True)
        assert cam is not None
        return cam

    # ---- messages ----------------------------------------------------------------------

    def on_frame(self, subject_camera: str, data: bytes) -> tuple[Camera, bool] | None:
        """File a frame message; returns its camera and whether the capture restarted."""
        try:
            env = decode(data, FrameEnvelope)
            cam = self._camera_of_message(env.camera, subject_camera)
        except (DecodeError, Rejected) as exc:
            self.reject(exc.reason, "frame", exc)
            return None
        self.forget_silent()
        item = FrameItem(env.seq, env.capture_ns, env.width, env.height, env.data, time.monotonic())
        restarted = cam.add_frame(item)
        metrics.FRAMES_RECEIVED.labels(cam.id).inc()
        return cam, restarted

    def on_result(self, subject_camera: str, data: bytes) -> tuple[Camera, Result] | None:
        try:
            result = decode(data, Result)
            cam = self._camera_of_message(result.camera, subject_camera)
            body = result_json(result)
        except (DecodeError, Rejected) as exc:
            self.reject(exc.reason, "result", exc)
            return None
        item = ResultItem(result, time.monotonic(), sse("result", result.seq, body))
        cam.add_result(item)
        self.all_results.send(item.sse)
        metrics.RESULTS_RECEIVED.labels(cam.id).inc()
        return cam, result

    def _project_camera(self, subject: str, project: str, camera: str) -> Camera:
        """The camera of a project's message; its subject must name the same project."""
        on_project, on_camera, _ = Subjects(self.s.prefix).project_parts(subject)
        if project != on_project:
            raise Rejected("project_mismatch", f"{project!r} on {subject!r}")
        return self._camera_of_message(camera, on_camera)

    def on_overlay(self, subject: str, data: bytes) -> None:
        """File a project's overlay (``ctx.overlay``) for its camera's project streams."""
        try:
            overlay = decode(data, Overlay)
            cam = self._project_camera(subject, overlay.project, overlay.camera)
            cam.inputs.add_overlay(overlay, time.monotonic())
        except (DecodeError, Rejected, InvalidName) as exc:
            self.reject(getattr(exc, "reason", "subject_mismatch"), "overlay", exc)
            return
        metrics.PROJECT_OVERLAYS.labels(overlay.project).inc()

    def on_project_frame(self, subject: str, data: bytes) -> None:
        """A frame a project drew: shown at once by the streams of every project and of it."""
        try:
            env = decode(data, FrameEnvelope)
            project = Subjects(self.s.prefix).project_parts(subject)[0]
            cam = self._project_camera(subject, project, env.camera)
            now = time.monotonic()
            frame = ProjectFrame(env.seq, env.capture_ns, -1, env.data, now, drawn_by=project)
            cam.inputs.add_drawn(frame, now)
        except (DecodeError, Rejected, InvalidName) as exc:
            self.reject(getattr(exc, "reason", "subject_mismatch"), "project frame", exc)
            return
        metrics.PROJECT_FRAMES.labels(project).inc()
        for view in cam.views.values():
            if view.viewers > 0 and cam.inputs.drawn_for(view.key, now) is frame:
                view.out = frame
                view.signal.notify()
                metrics.PROJECT_FRAMES_SHOWN.labels(project).inc()

    def on_event(self, event: Event) -> None:
        """An event this publisher raised: to the SSE clients of its camera and of all."""
        self.events.append(event)
        item = sse("event", event.seq, event.model_dump(mode="json"))
        cam = self.cameras.get(event.camera)
        if cam is not None:
            cam.subscribers.send(item)
        self.all_results.send(item)

    def on_counts(self, camera: str, lines: dict[str, list[int]]) -> None:
        """A line's crossing count changed: ``counts`` to the SSE clients of its camera and
        of all (``{"camera", "lines": {name: {"in", "out"}}}``)."""
        body = {
            "camera": camera,
            "lines": {name: {"in": c[0], "out": c[1]} for name, c in lines.items()},
        }
        item = sse("counts", 0, body)
        cam = self.cameras.get(camera)
        if cam is not None:
            cam.subscribers.send(item)
        self.all_results.send(item)

    def on_status(self, data: bytes, subject: str) -> None:
        try:
            status = decode(data, Status)
        except DecodeError as exc:
            self.reject(exc.reason, "heartbeat", exc)
            return
        if not Subjects(self.s.prefix).status_matches(subject, status.service, status.instance):
            why = ValueError(f"{status.service}.{status.instance} on {subject}")
            self.reject("subject_mismatch", "heartbeat", why)
            return
        key = (status.service, status.instance)
        if key not in self.statuses and len(self.statuses) >= 4096:
            self.reject("too_many_services", "heartbeat", ValueError("over 4096 instances"))
            return
        self.statuses[key] = (status, time.monotonic())

    # ---- views -------------------------------------------------------------------------

    def status_view(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        for key in [k for k, (_, t) in self.statuses.items() if now - t > self.s.status_forget_s]:
            del self.statuses[key]
        out = []
        for _, (st, seen) in sorted(self.statuses.items(), key=lambda kv: kv[0]):
            age = now - seen
            item = st.model_dump(mode="json")
            item["age_s"] = round(age, 3)
            # Three missed heartbeats: the service is probably gone.
            item["stale"] = age > 3 * st.interval_s + 1.0
            out.append(item)
        return out

    def cameras_view(self) -> list[dict[str, Any]]:
        """The cameras whose frames came, joined with the cameras bucket: a camera asked for
        there shows its config and reported state (also before or without any frame); one
        removed from there leaves the list (its frames stop within seconds)."""
        self.forget_silent()
        now = time.monotonic()
        view = {cid: cam.summary(now) for cid, cam in self.cameras.items()}
        d = self.directory
        if d is not None:
            self._listed.update(d.configs)
            for cid in set(d.configs) | set(d.states):
                item = view.get(cid) or Camera(cid, 2, 2).summary(now)
                cfg, st = d.configs.get(cid), d.states.get(cid)
                item["config"] = None if cfg is None else cfg.model_dump(mode="json")
                item["state"] = None if st is None else st.model_dump(mode="json")
                view[cid] = item
            # Removed from the bucket: its state says stopped, or its keys are gone.
            for cid in list(view):
                st = d.states.get(cid)
                if cid not in d.configs and (st is None or st.state == "stopped"):
                    # (a capture of its own, with env settings, the bucket never named,
                    # stays listed)
                    if "config" in view[cid] or cid in self._listed:
                        del view[cid]
        return [view[cid] for cid in sorted(view)]

    def events_view(self, clip_states: dict[str, str]) -> list[dict[str, Any]]:
        """Recent events, newest first, with where their snapshot and clip are."""
        out = []
        for ev in reversed(self.events):
            item = ev.model_dump(mode="json")
            cid = clip_id(ev.camera, ev.seq, ev.capture_ns)
            item["snapshot_url"] = f"/snapshots/{ev.snapshot}" if ev.snapshot else None
            item["clip"] = {
                "id": cid,
                "state": clip_states.get(cid, "none"),
                "url": f"/clips/{cid}",
                "play": f"/clips/{cid}/play.mjpeg",
            }
            out.append(item)
        return out

    def close(self) -> None:
        """Wake every stream so that it ends."""
        self.closing = True
        for cam in self.cameras.values():
            cam.frame_signal.notify()
            cam.changed.notify()
            for view in cam.views.values():
                view.signal.notify()
            cam.subscribers.send(None)
        self.all_results.send(None)
