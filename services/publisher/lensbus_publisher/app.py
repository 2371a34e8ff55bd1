"""Publisher lifecycle: one HTTP server (the Runtime's, with the page and streams added),
subscriptions to frames, results and heartbeats, the durable stream, rules and webhooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from lensbus.demand import Wanter
from lensbus.runtime import Runtime
from lensbus_publisher.clips import Clips
from lensbus_publisher.config import PublisherSettings
from lensbus_publisher.directory import follow, follow_pipelines
from lensbus_publisher.durable import Durable
from lensbus_publisher.events import Events
from lensbus_publisher.hub import Hub
from lensbus_publisher.overlay import Overlays
from lensbus_publisher.project import ProjectRenderer
from lensbus_publisher.web import Web
from lensbus_publisher.webhooks import Webhooks

log = logging.getLogger(__name__)

# A subscription may hold this much undelivered data before NATS drops it for us (frames
# are ~0.3 MB at 1080p; the callbacks only file them, so this is never reached in practice).
FRAME_PENDING_BYTES = 64 * 1024 * 1024


class Publisher:
    def __init__(self, settings: PublisherSettings) -> None:
        self.s = settings
        self.hub = Hub(settings)
        self.overlays = Overlays(settings, self.hub)
        self.hub.on_forget.append(self.overlays.forget)
        self.renderer = ProjectRenderer(settings, self.hub)
        self.renderer.overlays = self.overlays
        self.web = Web(settings, self.hub, self.renderer)
        self.webhooks = Webhooks(settings)
        self.subs: list[Subscription] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.events: Events | None = None
        self.clips: Clips | None = None
        self.wanter: Wanter | None = None

    def counters(self) -> dict[str, float]:
        cams = self.hub.cameras.values()
        return {
            "cameras": len(self.hub.cameras),
            "frames_received": sum(c.frames_received for c in cams),
            "results_received": sum(c.results_received for c in cams),
            "frames_rendered": sum(c.frames_rendered for c in cams),
            "open_streams": self.web.open_streams,
            "events": self.events.raised if self.events else 0,
            "zone_events": self.events.zone_events if self.events else 0,
            "project_events": self.events.project_events if self.events else 0,
            "clips": self.clips.kept if self.clips else 0,
            "webhook_failures": self.webhooks.dropped,
            "rejected": self.hub.rejected,
        }

    def wanted_cameras(self) -> set[str]:
        """The cameras whose every device-stream frame the publisher needs (lensbus.demand):
        those someone watches, and those a rule may fire for (its snapshot and clip are cut
        from the device stream)."""
        cams = {c.id for c in self.hub.cameras.values() if c.watched}
        for rule in self.s.rules:
            cams |= set(rule.cameras) if rule.cameras else set(self.hub.cameras)
        return cams

    async def _on_frame(self, msg: Msg) -> None:
        got = self.hub.on_frame(self.rt.subjects.camera_of(msg.subject), msg.data)
        if got is None:
            return
        cam, restarted = got
        if restarted and self.events is not None:
            self.events.engine.forget(cam.id)
        if self.clips is not None and cam.newest is not None:
            self.clips.on_frame(cam.id, cam.newest)

    async def _on_result(self, msg: Msg) -> None:
        got = self.hub.on_result(self.rt.subjects.camera_of(msg.subject), msg.data)
        if got is not None and self.events is not None:
            cam, result = got
            self.events.check(result, cam.frames.get(result.seq))

    async def _on_event(self, msg: Msg) -> None:
        if self.events is not None:
            self.events.on_bus_event(self.rt.subjects.camera_of(msg.subject), msg.data)

    async def _on_project_event(self, msg: Msg) -> None:
        if self.events is not None:
            self.events.on_project_event(msg.subject, msg.data)

    async def _on_overlay(self, msg: Msg) -> None:
        self.hub.on_overlay(msg.subject, msg.data)

    async def _on_project_frame(self, msg: Msg) -> None:
        self.hub.on_project_frame(msg.subject, msg.data)

    async def _on_status(self, msg: Msg) -> None:
        self.hub.on_status(msg.data, msg.subject)

    async def start(self, rt: Runtime) -> None:
        self.rt = rt
        durable = Durable(self.s, rt)
        self.clips = Clips(self.s, rt, durable) if self.s.rules else None
        self.web.media.bind(durable, self.clips)
        self.events = Events(
            self.s, rt, self.hub, durable, self.webhooks, self.clips, self.overlays
        )
        self.hub.on_forget.append(self.events.engine.forget)
        if self.clips is not None:
            self.hub.on_forget.append(self.clips.forget)
        self.webhooks.start(rt)
        self.tasks = [
            asyncio.create_task(durable.run(), name="durable"),
            asyncio.create_task(self.events.run(), name="events"),
            asyncio.create_task(follow(rt, self.hub), name="cameras"),
            asyncio.create_task(follow_pipelines(rt, self.hub, self.overlays), name="pipelines"),
        ]
        if self.clips is not None:
            self.tasks.append(asyncio.create_task(self.clips.run(), name="clips"))
        nc, subjects = rt.nc, rt.subjects
        self.subs = [
            await nc.subscribe(
                subjects.all_frames(), cb=self._on_frame, pending_bytes_limit=FRAME_PENDING_BYTES
            ),
            await nc.subscribe(subjects.all_results(), cb=self._on_result),
            await nc.subscribe(subjects.all_events(), cb=self._on_event),
            await nc.subscribe(subjects.all_status(), cb=self._on_status),
            await nc.subscribe(subjects.all_project_overlays(), cb=self._on_overlay),
            await nc.subscribe(subjects.all_project_events(), cb=self._on_project_event),
            await nc.subscribe(
                subjects.all_project_frames(),
                cb=self._on_project_frame,
                pending_bytes_limit=FRAME_PENDING_BYTES,
            ),
        ]
        by = f"publisher.{rt.settings.instance}"
        self.wanter = Wanter(nc, subjects, self.wanted_cameras, by).start()
        log_rules(self.s)

    async def stop(self) -> None:
        """Stop taking messages, end every stream, finish what is queued (briefly)."""
        for sub in self.subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self.wanter is not None:
            await self.wanter.stop()
        self.hub.close()
        await self.renderer.close()
        if self.events is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.events.queue.join(), 2.0)
        if self.clips is not None:  # keep what the clips in progress have so far
            self.clips.expire(float("inf"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.clips.queue.join(), 3.0)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.webhooks.close()
        await asyncio.sleep(0)  # let the stream handlers see the end


def log_rules(settings: PublisherSettings) -> None:
    """What each rule watches, once at start (a misread rule shows here)."""
    for rule in settings.rules:
        zone_triggers = sorted(t for t in rule.triggers if t not in ("rule", "project"))
        if zone_triggers:
            log.info(
                "rule %s: zone events %s of %s, cooldown %.0f s%s",
                rule.name,
                ",".join(zone_triggers),
                ",".join(sorted(rule.zones)) or "every zone and line",
                rule.cooldown_s,
                " -> clip, webhook" if rule.webhook else " -> clip",
            )
        if "project" in rule.triggers:
            log.info(
                "rule %s: events of projects %s, cooldown %.0f s%s",
                rule.name,
                ",".join(sorted(rule.projects)) or "(all)",
                rule.cooldown_s,
                " -> clip, webhook" if rule.webhook else " -> clip",
            )
        if not rule.on_results:
            continue
        log.info(
            "rule %s: %s score >= %.2f, %d in a row, cooldown %.0f s%s",
            rule.name,
            ",".join(sorted(rule.labels)),
            rule.min_score,
            rule.consecutive,
            rule.cooldown_s,
            " -> webhook" if rule.webhook else "",
        )


async def run(settings: PublisherSettings) -> int:
    pub = Publisher(settings)
    rt = Runtime(settings, counters=pub.counters)
    # The Runtime's server is the publisher's web server: one port for the page, the
    # streams, the API, /metrics and /healthz.
    pub.web.install(rt.server.app)
    async with rt:
        log.info("publisher page on http://%s:%d/", settings.host, rt.port)
        if rt.bus.nc is None:  # stopped before NATS was reachable
            return 0
        await pub.start(rt)
        rt.set_state("running")
        await rt.stop.wait()
        await pub.stop()
    return 0
