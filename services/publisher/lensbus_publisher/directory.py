"""The buckets the publisher follows. The cameras bucket (``lensbus-cameras``) as the page
shows it: the cameras asked for (``camera.<id>``) and what capture reports about them
(``state.<id>``: running, retrying and why), followed live through
:class:`lensbus.cameras.CamerasBucket`.

The publisher only reads the bucket (``lensbus cameras`` or capture create it): until it
exists the page lists the cameras whose frames come, as before.

The deployments bucket's ``pipeline.<group>`` keys (a :class:`PipelineDeployment` each):
the zones and lines the project stream draws (:mod:`lensbus_publisher.overlay`); until the
deployer makes the bucket, none. A record this version cannot read is counted, and the
zones drawn stay as they were.
"""

from __future__ import annotations

import contextlib
import logging

import nats.errors
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue

from lensbus.cameras import CamerasBucket
from lensbus.codec import DecodeError, decode
from lensbus.runtime import Runtime
from lensbus.schemas.deploy import PipelineDeployment, pipeline_key
from lensbus.waiting import sleep_unless_stopped
from lensbus_publisher.hub import Hub
from lensbus_publisher.overlay import Overlays

log = logging.getLogger(__name__)

BIND_RETRY_S = 3.0  # how often a missing bucket is looked for again


async def follow(rt: Runtime, hub: Hub) -> None:
    """Keep ``hub.directory`` the bucket's current picture, until stopped."""
    bucket: CamerasBucket | None = None
    while bucket is None and not rt.stop.is_set():
        try:
            bucket = await CamerasBucket.open(
                rt.nc.jetstream(), create=False, bucket=rt.subjects.cameras_bucket
            )
        except BucketNotFoundError:
            pass
        except Exception as exc:  # JetStream not answering yet: try again
            log.debug("cameras bucket %s not readable yet: %s", rt.subjects.cameras_bucket, exc)
        if bucket is None and await sleep_unless_stopped(rt.stop, BIND_RETRY_S):
            return
    if bucket is None:
        return
    log.info("following the cameras bucket %s", bucket.bucket)
    async for view in bucket.views(rt.stop):
        hub.directory = view


PIPELINE_PREFIX = pipeline_key("")  # "pipeline."
POLL_S = 1.0


async def follow_pipelines(rt: Runtime, hub: Hub, overlays: Overlays) -> None:
    """Keep ``overlays`` on the groups' current pipelines, until stopped; a watch lost with
    NATS or the bucket is started again."""
    while not rt.stop.is_set():
        try:
            kv = await rt.nc.jetstream().key_value(rt.subjects.deployments_bucket)
            await _watch(rt, hub, overlays, kv)
        except (BucketNotFoundError, nats.errors.Error, OSError) as exc:
            log.debug("pipelines not readable yet: %s", exc)
        if await sleep_unless_stopped(rt.stop, BIND_RETRY_S):
            return


async def _watch(rt: Runtime, hub: Hub, overlays: Overlays, kv: KeyValue) -> None:
    watcher = await kv.watch(f"{PIPELINE_PREFIX}*")
    try:
        while not rt.stop.is_set():
            try:
                entry = await watcher.updates(timeout=POLL_S)
            except nats.errors.TimeoutError:
                continue
            if entry is None:  # the end of the initial values
                continue
            group = entry.key[len(PIPELINE_PREFIX) :]
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                overlays.set_pipeline(group, None)
                continue
            try:
                overlays.set_pipeline(group, decode(entry.value, PipelineDeployment).pipeline)
            except DecodeError as exc:  # the last good one stays drawn
                hub.reject(exc.reason, "pipeline", exc)
                continue
            log.info("pipeline of group %s: drawing its zones and lines", group)
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()
