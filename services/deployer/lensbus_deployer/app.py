"""Deployer lifecycle: connect, serve the API while the background round binds (or creates)
the buckets and keeps /healthz honest about JetStream, wait for the stop, drain, close.

The work lives in modules named for it: :mod:`~lensbus_deployer.api` (dispatch and the model
and deployment verbs), :mod:`~lensbus_deployer.upload_verbs`, :mod:`~lensbus_deployer.jetstream`
(availability, buckets), :mod:`~lensbus_deployer.auto_rollback` (swap reports) and
:mod:`~lensbus_deployer.housekeeping` (the background round).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from lensbus.runtime import Runtime
from lensbus.secrecy import hide_environment
from lensbus_deployer import metrics
from lensbus_deployer.api import Api
from lensbus_deployer.auto_rollback import AutoRollback
from lensbus_deployer.config import DeployerSettings
from lensbus_deployer.fleet_device import DeviceFleet
from lensbus_deployer.fleet_watch import FleetWatch
from lensbus_deployer.housekeeping import Housekeeping
from lensbus_deployer.jetstream import JetStream
from lensbus_deployer.store import Store
from lensbus_deployer.upload_verbs import UploadVerbs
from lensbus_deployer.uploads import Uploads

log = logging.getLogger(__name__)


class Deployer:
    """One deployer instance: its parts, wired together."""

    def __init__(self, settings: DeployerSettings, rt: Runtime) -> None:
        self.counts = {"uploads": 0, "activations": 0, "rollbacks": 0, "models": 0, "pipelines": 0}
        self.counts["projects"] = 0
        store = Store(rt.nc.jetstream(timeout=settings.request_timeout_s), settings)
        self.uploads = Uploads(
            settings.work_dir,
            settings.instance,
            settings.max_uploads,
            settings.max_package_bytes,
            settings.upload_idle_timeout_s,
        )
        self.auto_rollback = AutoRollback(store, self.counts)
        self.jetstream = JetStream(settings, rt, store, self.auto_rollback, self.counts)
        upload_verbs = UploadVerbs(settings, self.jetstream, self.uploads, self.counts)
        self.api = Api(settings, rt, self.jetstream, upload_verbs, self.counts)
        self.housekeeping = Housekeeping(
            settings, rt.stop, self.jetstream, self.uploads, self.api.forget_heartbeats
        )
        # A hub watches its devices' sources; a device follows the hub's desired models for it
        # (lensbus.natsleaf).
        fleet = self.api.fleet
        self.fleet_watch = FleetWatch(settings, rt, fleet.hub, fleet.lock)
        self.fleet = None
        if settings.fleet_device is not None:
            self.fleet = DeviceFleet(
                settings, rt, self.jetstream, upload_verbs, self.api.activate, self.api.status
            )

    async def start(self) -> None:
        await asyncio.to_thread(self.uploads.prepare)
        await self.api.start()

    async def stop(self) -> None:
        """Stop taking requests, let those in hand finish (within the drain limit)."""
        await self.api.stop()
        await self.auto_rollback.stop()
        self.uploads.close()
        metrics.UPLOADS_IN_PROGRESS.set(0)


async def run(settings: DeployerSettings) -> int:
    hide_environment()  # a project's import check runs in a child of ours
    deployer: Deployer | None = None

    def counters() -> dict[str, float]:
        return {k: float(v) for k, v in deployer.counts.items()} if deployer else {}

    async with Runtime(settings, counters=counters) as rt:
        if rt.bus.nc is None:  # stopped before NATS was reached
            return 0
        deployer = Deployer(settings, rt)
        await deployer.start()
        rt.set_state("running")
        tasks = [asyncio.create_task(deployer.housekeeping.run(), name="deployer")]
        if settings.fleet_hub:
            tasks.append(asyncio.create_task(deployer.fleet_watch.run(), name="fleet-watch"))
        if deployer.fleet is not None:
            tasks.append(asyncio.create_task(deployer.fleet.run(), name="fleet"))
        try:
            await rt.stop.wait()
        finally:
            log.info("stopping: finishing requests in hand")
            await deployer.stop()
            for task in tasks:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
    return 0
