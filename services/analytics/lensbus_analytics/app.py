"""Analytics lifecycle: settings -> Runtime -> follow the pipeline, subscribe to the
detections -> wait for stop -> drain.

One analytics instance owns a camera's results (its tracks and counts need every result in
order), so one instance serves a group; sharding cameras across instances is for later.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.msg import Msg

from lensbus.codec import encode
from lensbus.runtime import Runtime
from lensbus.schemas.pipeline import Pipeline
from lensbus.stored import ResultSender
from lensbus.waiting import sleep_unless_stopped
from lensbus_analytics import metrics
from lensbus_analytics.analytics import Analytics, Out
from lensbus_analytics.config import AnalyticsSettings
from lensbus_analytics.desired import PipelineFollower
from lensbus_analytics.mqtt_out import MqttOut

log = logging.getLogger(__name__)

# The clock that gives up a seq gap checks this often (a fraction of the reorder wait).
FLUSH_FRACTION = 0.25
FLUSH_MIN_S = 0.01


async def publish(
    rt: Runtime, sender: ResultSender, out: Out, analytics: Analytics, mqtt: MqttOut | None
) -> None:
    for result in out.results:
        subject = rt.subjects.results(result.camera)
        await sender.send(subject, encode(result), result.camera, result.seq, result.capture_ns)
        metrics.RESULTS_OUT.labels(result.camera).inc()
    for event in out.events:
        await rt.nc.publish(rt.subjects.events(event.camera), encode(event))
    if mqtt is not None:
        for subject, data, kind in mqtt.messages(analytics.cameras, out.events):
            await rt.nc.publish(subject, data)
            metrics.MQTT_MESSAGES.labels(kind).inc()


async def flush_gaps(
    rt: Runtime,
    sender: ResultSender,
    analytics: Analytics,
    settings: AnalyticsSettings,
    mqtt: MqttOut | None,
) -> None:
    every = max(FLUSH_MIN_S, settings.reorder_wait_s * FLUSH_FRACTION)
    while not rt.stop.is_set():
        await sleep_unless_stopped(rt.stop, every)
        if rt.bus.connected:
            await publish(rt, sender, analytics.flush(time.monotonic()), analytics, mqtt)


async def run(settings: AnalyticsSettings) -> int:
    analytics = Analytics(settings)
    mqtt: MqttOut | None = None

    def counters() -> dict[str, float]:
        return {"rejected": analytics.rejected, "cameras": len(analytics.cameras)}

    def on_pipeline(pipeline: Pipeline | None) -> None:
        analytics.configure(pipeline)
        rt.detail["pipeline"] = "tracking" if analytics.track else "idle"
        if mqtt is not None:
            mqtt.announce()

    async with Runtime(settings, counters=counters) as rt:
        if rt.bus.nc is None:  # stopped before NATS was reachable
            return 0
        rt.detail.update({"group": settings.group, "pipeline": "idle"})
        mqtt = MqttOut(rt.subjects) if settings.mqtt else None
        sender = ResultSender(rt.nc, settings.results_acked)

        async def on_msg(msg: Msg) -> None:
            camera = rt.subjects.camera_of(msg.subject)
            out = analytics.on_detections(camera, msg.data, time.monotonic())
            await publish(rt, sender, out, analytics, mqtt)

        async def on_ha_status(msg: Msg) -> None:
            # Home Assistant's birth message: it has forgotten unretained discovery configs.
            if mqtt is not None and msg.data.strip() == b"online":
                log.info("Home Assistant is online: announcing the sensors again")
                mqtt.announce()

        follower = PipelineFollower(rt, settings.group, on_pipeline)
        tasks = [
            asyncio.create_task(follower.run(), name="pipeline"),
            asyncio.create_task(flush_gaps(rt, sender, analytics, settings, mqtt), name="flush"),
        ]
        cams = settings.camera_list
        subjects = (
            [rt.subjects.detections(c) for c in cams] if cams else [rt.subjects.all_detections()]
        )
        subs = [await rt.nc.subscribe(s, cb=on_msg) for s in subjects]
        if mqtt is not None:
            subs.append(await rt.nc.subscribe(rt.subjects.ha_status(), cb=on_ha_status))
        rt.set_state("running")
        log.info("analytics for group %s on %s", settings.group, ", ".join(subjects))
        await rt.stop.wait()
        for sub in subs:
            await sub.unsubscribe()
        await asyncio.gather(*tasks)
        # What waits for a gap goes out before the drain: no result is lost to a stop.
        await publish(rt, sender, analytics.flush(float("inf")), analytics, mqtt)
        await sender.close()
    return 0
