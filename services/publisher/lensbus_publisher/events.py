"""Raising events: snapshot the frame into the object store, publish the event on
``<prefix>.events.<camera>``, hand it to the SSE clients and the webhooks.

Rules are checked on the event loop as results arrive (cheap); the I/O of raising an event
runs in its own task from a bounded queue, so it never holds up the streams.

The analytics service's zone and line events (trigger enter, leave, loiter, cross) come in
on the same subjects and get the same treatment, without a second event: the frame's JPEG
is stored under :func:`snapshot_name` of the event's camera, seq and capture time (a reader
derives it; the page's list shows it), the rules that select the event
(:meth:`Rule.selects`) start its clip and queue their webhook. The events projects raise
(``ctx.event``: trigger ``project``, the project's name in ``project``) come on the project's
own ``<prefix>.projects.<project>.<camera>._event``, which only that project's NATS user may
publish: one whose payload names another project or camera, or another trigger, is refused;
the rest are taken the same way and republished (with their snapshot) on the events
subjects for programs, the results stream and MQTT. Rule and project events coming back on
the events subjects (ours, or another publisher's) are left alone, and malformed ones are
counted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from functools import partial

from lensbus.codec import DecodeError, decode, encode
from lensbus.errors import InvalidName, Rejected
from lensbus.logs import RateLimit, log_limited
from lensbus.runtime import Runtime
from lensbus.schemas import Event, Result, snapshot_name
from lensbus_publisher import metrics
from lensbus_publisher.camera import FrameItem
from lensbus_publisher.clips import Clips
from lensbus_publisher.config import PublisherSettings
from lensbus_publisher.durable import Durable
from lensbus_publisher.hub import Hub
from lensbus_publisher.overlay import Overlays
from lensbus_publisher.rules import Firing, RuleEngine
from lensbus_publisher.webhooks import Webhooks

log = logging.getLogger(__name__)

SNAPSHOTS_REMEMBERED = 256  # names stored lately: events of one frame share one snapshot
Job = tuple[str, Callable[[], Awaitable[object]]]  # what for (logs), the work


class Events:
    def __init__(
        self,
        settings: PublisherSettings,
        rt: Runtime,
        hub: Hub,
        durable: Durable,
        webhooks: Webhooks,
        clips: Clips | None = None,
        overlays: Overlays | None = None,
    ) -> None:
        self.s = settings
        self.rt = rt
        self.hub = hub
        self.durable = durable
        self.webhooks = webhooks
        self.clips = clips
        self.overlays = overlays
        self.engine = RuleEngine(settings.rules)
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=settings.event_queue)
        self.raised = 0
        self.zone_events = 0
        self.project_events = 0
        self._stored: OrderedDict[str, None] = OrderedDict()
        self._limit = RateLimit(60.0)

    def check(self, result: Result, frame: FrameItem | None) -> None:
        """Feed a result through the rules; queue what fires (never blocks)."""
        if not self.engine.rules:
            return
        for firing in self.engine.feed(result):
            raising = partial(self.raise_event, firing, result, frame, time.time_ns())
            self._queue(f"rule {firing.rule.name}", raising)

    def _queue(self, what: str, work: Callable[[], Awaitable[object]]) -> None:
        try:
            self.queue.put_nowait((what, work))
        except asyncio.QueueFull:
            metrics.EVENTS_DROPPED.labels("queue_full").inc()
            log_limited(
                log,
                self._limit,
                "queue_full",
                logging.WARNING,
                "event of %s dropped: queue full",
                what,
            )

    def on_bus_event(self, subject_camera: str, data: bytes) -> None:
        """An event on ``<prefix>.events.<camera>``: a zone or project event is counted and
        queued for its snapshot, clip and webhooks; a rule event (this publisher's own coming
        back, or another's) is left alone."""
        try:
            event = decode(data, Event)
            if event.camera != subject_camera:
                raise Rejected("camera_mismatch", f"{event.camera!r} on {subject_camera!r}")
        except (DecodeError, Rejected) as exc:
            self.hub.reject(exc.reason, "event", exc)
            return
        if event.trigger in ("rule", "project"):
            # a project's event was taken on its own subject and is republished here
            metrics.ZONE_EVENTS_IGNORED.labels(f"own_{event.trigger}").inc()
            return
        what = self._zone(event)
        if what:
            self._queue(what, partial(self.take_zone_event, event, self._frame_of(event)))

    def on_project_event(self, subject: str, data: bytes) -> None:
        """An event on ``<prefix>.projects.<project>.<camera>._event`` (``ctx.event``): the
        subject names its sender (NATS lets only that project's user publish there), so one
        whose payload says otherwise is refused; the rest are counted and queued for their
        snapshot, clip and webhooks, then republished on ``<prefix>.events.<camera>``."""
        try:
            project, camera, _ = self.rt.subjects.project_parts(subject)
            event = decode(data, Event)
            if event.trigger != "project":
                raise Rejected("not_project_event", f"trigger {event.trigger!r} on {subject!r}")
            if event.project != project:
                raise Rejected("project_mismatch", f"{event.project!r} on {subject!r}")
            if event.camera != camera:
                raise Rejected("camera_mismatch", f"{event.camera!r} on {subject!r}")
        except (DecodeError, Rejected) as exc:
            self.hub.reject(exc.reason, "project event", exc)
            return
        except InvalidName as exc:
            self.hub.reject("subject_mismatch", "project event", exc)
            return
        self.project_events += 1
        metrics.PROJECT_EVENTS.labels(project).inc()
        take = partial(self.take_project_event, event, self._frame_of(event))
        self._queue(f"project {project}", take)

    def _frame_of(self, event: Event) -> FrameItem | None:
        cam = self.hub.cameras.get(event.camera)
        frame = None if cam is None else cam.frames.get(event.seq)
        if frame is not None and frame.capture_ns != event.capture_ns:
            frame = None  # the camera restarted: that seq is another frame now
        return frame

    def _zone(self, event: Event) -> str:
        """Count a zone event (and its line's crossing); what it is, '' if refused."""
        if not event.zone:
            self.hub.reject("no_zone", "event", ValueError(f"{event.trigger} event names no zone"))
            return ""
        self.zone_events += 1
        metrics.ZONE_EVENTS.labels(event.camera, event.zone, event.trigger).inc()
        if self.overlays is not None and self.overlays.on_event(event):
            self.hub.on_counts(event.camera, self.overlays.crossings.get(event.camera, {}))
        return f"zone {event.zone}"

    async def take_zone_event(self, event: Event, frame: FrameItem | None) -> Event:
        """Snapshot, page, clip and webhooks of a zone or project event; returns it as the
        page has it (with the snapshot's name; the event on the bus is not changed)."""
        name = snapshot_name(event.camera, event.seq, event.capture_ns)
        if name not in self._stored:
            name = await self._snapshot(event.camera, frame)
            if name:
                self._stored[name] = None
                while len(self._stored) > SNAPSHOTS_REMEMBERED:
                    self._stored.popitem(last=False)
        where = {"snapshot": name, "snapshot_bucket": self.rt.subjects.snapshots_bucket}
        shown = event.model_copy(update=where) if name else event
        self.hub.on_event(shown)
        rules = self.engine.select(event)
        if rules and self.clips is not None:
            self.clips.start(event)
        body = json.dumps(shown.model_dump(mode="json"), separators=(",", ":")).encode()
        for rule in rules:
            if rule.webhook is not None:
                await self.webhooks.submit(rule, body)
        return shown

    async def take_project_event(self, event: Event, frame: FrameItem | None) -> Event:
        """A project's event taken like a zone event, then republished (with its snapshot)
        on the events subjects."""
        shown = await self.take_zone_event(event, frame)
        try:
            await self.rt.nc.publish(self.rt.subjects.events(shown.camera), encode(shown))
        except Exception as exc:
            metrics.EVENTS_DROPPED.labels("publish_error").inc()
            log_limited(log, self._limit, "publish", logging.WARNING, "event not sent: %s", exc)
        return shown

    async def _snapshot(self, camera: str, frame: FrameItem | None) -> str:
        if frame is None:
            metrics.SNAPSHOTS.labels("no_frame").inc()
            return ""
        store = self.durable.snapshots
        if store is None:
            metrics.SNAPSHOTS.labels("no_store").inc()
            return ""
        name = snapshot_name(camera, frame.seq, frame.capture_ns)
        try:
            await store.put(name, frame.jpeg)
        except Exception as exc:  # JetStream away or full: the event still goes out
            metrics.SNAPSHOTS.labels("failed").inc()
            log_limited(
                log, self._limit, "snapshot", logging.WARNING, "snapshot not stored: %s", exc
            )
            return ""
        metrics.SNAPSHOTS.labels("stored").inc()
        return name

    async def raise_event(
        self, firing: Firing, result: Result, frame: FrameItem | None, event_ns: int
    ) -> Event:
        event = Event(
            rule=firing.rule.name,
            camera=result.camera,
            label=firing.match.label,
            score=firing.match.score,
            seq=result.seq,
            capture_ns=result.capture_ns,
            event_ns=event_ns,
            consecutive=firing.consecutive,
            model=result.model,
            box=firing.match.box,
            snapshot=await self._snapshot(result.camera, frame),
            snapshot_bucket=self.rt.subjects.snapshots_bucket,
        )
        try:
            await self.rt.nc.publish(self.rt.subjects.events(event.camera), encode(event))
        except Exception as exc:
            metrics.EVENTS_DROPPED.labels("publish_error").inc()
            log_limited(log, self._limit, "publish", logging.WARNING, "event not sent: %s", exc)
        else:
            self.raised += 1
            metrics.EVENTS_RAISED.labels(event.rule).inc()
            log.info(
                "event %s: %s %.2f on %s #%d",
                event.rule,
                event.label,
                event.score,
                event.camera,
                event.seq,
            )
        if self.clips is not None:
            self.clips.start(event)
        self.hub.on_event(event)
        if firing.rule.webhook is not None:
            body = json.dumps(event.model_dump(mode="json"), separators=(",", ":")).encode()
            await self.webhooks.submit(firing.rule, body)
        return event

    async def run(self) -> None:
        while True:
            what, work = await self.queue.get()
            try:
                await work()
            except Exception:  # one bad event must not end event raising
                log.exception("raising an event of %s failed", what)
            finally:
                self.queue.task_done()
