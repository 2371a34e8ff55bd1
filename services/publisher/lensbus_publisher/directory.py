"""The cameras bucket (``lensbus-cameras``) as the page shows it: the cameras asked for
(``camera.<id>``) and what capture reports about them (``state.<id>``: running, retrying and
why), followed live through :class:`lensbus.cameras.CamerasBucket`.

The publisher only reads the bucket (``lensbus cameras`` or capture create it): until it
exists the page lists the cameras whose frames come, as before.
"""

from __future__ import annotations

import logging

from nats.js.errors import BucketNotFoundError

from lensbus.cameras import CamerasBucket
from lensbus.runtime import Runtime
from lensbus.subjects import CAMERAS_BUCKET
from lensbus.waiting import sleep_unless_stopped
from lensbus_publisher.hub import Hub

log = logging.getLogger(__name__)

BIND_RETRY_S = 3.0  # how often a missing bucket is looked for again


async def follow(rt: Runtime, hub: Hub) -> None:
    """Keep ``hub.directory`` the bucket's current picture, until stopped."""
    bucket: CamerasBucket | None = None
    while bucket is None and not rt.stop.is_set():
        try:
            bucket = await CamerasBucket.open(rt.nc.jetstream(), create=False)
        except BucketNotFoundError:
            pass
        except Exception as exc:  # JetStream not answering yet: try again
            log.debug("cameras bucket %s not readable yet: %s", CAMERAS_BUCKET, exc)
        if bucket is None and await sleep_unless_stopped(rt.stop, BIND_RETRY_S):
            return
    if bucket is None:
        return
    log.info("following the cameras bucket %s", CAMERAS_BUCKET)
    async for view in bucket.views(rt.stop):
        hub.directory = view
