"""Raising events: snapshot the frame into the object store, publish the event on
``<prefix>.events.<camera>``, hand it to the SSE clients and the webhooks.

Rules are checked on the event loop as results arrive (cheap); the I/O of raising an event
runs in its own task from a bounded queue, so it never holds up the streams.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from lensbus.codec import encode
from lensbus.logs import RateLimit, log_limited
from lensbus.runtime import Runtime
from lensbus.schemas import Event, Result, snapshot_name
from lensbus_publisher import metrics
from lensbus_publisher.camera import FrameItem
from lensbus_publisher.clips import Clips
from lensbus_publisher.config import PublisherSettings
from lensbus_publisher.durable import Durable
from lensbus_publisher.hub import Hub
from lensbus_publisher.rules import Firing, RuleEngine
from lensbus_publisher.webhooks import Webhooks

log = logging.getLogger(__name__)


class Events:
    def __init__(
        self,
        settings: PublisherSettings,
        rt: Runtime,
        hub: Hub,
        durable: Durable,
        webhooks: Webhooks,
        clips: Clips | None = None,
    ) -> None:
        self.s = settings
        self.rt = rt
        self.hub = hub
        self.durable = durable
        self.webhooks = webhooks
        self.clips = clips
        self.engine = RuleEngine(settings.rules)
        self.queue: asyncio.Queue[tuple[Firing, Result, FrameItem | None, int]] = asyncio.Queue(
            maxsize=settings.event_queue
        )
        self.raised = 0
        self._limit = RateLimit(60.0)

    def check(self, result: Result, frame: FrameItem | None) -> None:
        """Feed a result through the rules; queue what fires (never blocks)."""
        if not self.engine.rules:
            return
        for firing in self.engine.feed(result):
            try:
                self.queue.put_nowait((firing, result, frame, time.time_ns()))
            except asyncio.QueueFull:
                metrics.EVENTS_DROPPED.labels("queue_full").inc()
                log_limited(
                    log,
                    self._limit,
                    "queue_full",
                    logging.WARNING,
                    "event of rule %s dropped: queue full",
                    firing.rule.name,
                )

    async def _snapshot(self, result: Result, frame: FrameItem | None) -> str:
        if frame is None:
            metrics.SNAPSHOTS.labels("no_frame").inc()
            return ""
        store = self.durable.snapshots
        if store is None:
            metrics.SNAPSHOTS.labels("no_store").inc()
            return ""
        name = snapshot_name(result.camera, frame.seq, frame.capture_ns)
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
            snapshot=await self._snapshot(result, frame),
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
            firing, result, frame, event_ns = await self.queue.get()
            try:
                await self.raise_event(firing, result, frame, event_ns)
            except Exception:  # one bad event must not end event raising
                log.exception("raising an event of rule %s failed", firing.rule.name)
            finally:
                self.queue.task_done()
