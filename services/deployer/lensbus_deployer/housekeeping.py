"""The deployer's background round, every ``jetstream_check_s`` until stopped: check
JetStream, expire idle uploads, sweep the work dir, purge the chunks of puts that never
completed, forget old heartbeats."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from lensbus.waiting import sleep_unless_stopped
from lensbus_deployer import metrics
from lensbus_deployer.config import DeployerSettings
from lensbus_deployer.jetstream import JetStream
from lensbus_deployer.uploads import Uploads, human_bytes

log = logging.getLogger(__name__)


class Housekeeping:
    """What keeps one deployer's JetStream view, work dir and store tidy."""

    def __init__(
        self,
        settings: DeployerSettings,
        stop: asyncio.Event,
        jetstream: JetStream,
        uploads: Uploads,
        forget_heartbeats: Callable[[], None],
    ) -> None:
        self.s = settings
        self.stop = stop
        self.jetstream = jetstream
        self.uploads = uploads
        self.forget_heartbeats = forget_heartbeats

    async def run(self) -> None:
        last_sweep = 0.0
        last_orphans = float("-inf")
        while not self.stop.is_set():
            await self.jetstream.check()
            now = time.monotonic()
            for upload in self.uploads.expire():
                metrics.UPLOADS.labels("expired").inc()
                log.debug("expired %s", upload.id)
            metrics.UPLOADS_IN_PROGRESS.set(len(self.uploads))
            if now - last_sweep > self.s.upload_idle_timeout_s / 2:
                last_sweep = now
                await asyncio.to_thread(self.uploads.sweep)
            if self.jetstream.problem is None and now - last_orphans >= self.s.orphan_grace_s:
                last_orphans = now
                await self._purge_orphans()
            self.forget_heartbeats()
            await sleep_unless_stopped(self.stop, self.s.jetstream_check_s)

    async def _purge_orphans(self) -> None:
        try:
            purged, freed = await self.jetstream.store.purge_orphans(self.s.orphan_grace_s)
            if purged:
                metrics.ORPHAN_CHUNKS_PURGED.inc(purged)
                metrics.LEFTOVER_BYTES.labels("orphan_chunks").inc(freed)
                log.info(
                    "purged %d incomplete object(s) from the model store: %s freed",
                    purged,
                    human_bytes(freed),
                )
                await self.jetstream.update_gauges()
        except Exception as exc:
            log.warning("could not check the store for incomplete objects: %s", exc)
