"""Following one key of the deployments bucket (``Subjects(prefix).deployments_bucket``): the
group's desired model (inference), its pipeline (inference's stages, analytics). A watcher's
consumer does not survive a NATS restart, so the key is also re-read every :data:`RECHECK_S`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import nats.errors
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from lensbus.runtime import Runtime
from lensbus.waiting import sleep_unless_stopped

log = logging.getLogger(__name__)

RECHECK_S = 1.0
# The revision of "no value" (deleted, purged or never written).
ABSENT = -1


class KeyFollower:
    """Follows one key of the deployments bucket: ``read(value)`` for each new revision,
    ``read(None)`` once when the key is deleted or absent.  A watcher's consumer does not
    survive a NATS restart, so the key is also re-read every :data:`RECHECK_S`."""

    def __init__(
        self, rt: Runtime, key: str, read: Callable[[bytes | None], Awaitable[None]]
    ) -> None:
        self.rt = rt
        self.key = key
        self.read = read
        self.last_revision = 0

    async def _deliver(self, value: bytes | None, revision: int) -> None:
        if revision == self.last_revision:  # a new watcher replays the last value
            return
        self.last_revision = revision
        await self.read(value)

    async def run(self) -> None:
        waiting_logged = False
        while not self.rt.stop.is_set():
            try:
                kv = await self.rt.nc.jetstream().key_value(self.rt.subjects.deployments_bucket)
                watcher = await kv.watch(self.key)
            except (BucketNotFoundError, NotFoundError, nats.errors.Error, OSError) as exc:
                if not waiting_logged:
                    log.info("waiting for the deployments bucket (%s)", exc)
                    waiting_logged = True
                await sleep_unless_stopped(self.rt.stop, RECHECK_S)
                continue
            try:
                await self._follow(kv, watcher)
            except (nats.errors.Error, OSError) as exc:
                log.debug("watch of %s interrupted: %s", self.key, exc)
                await sleep_unless_stopped(self.rt.stop, RECHECK_S)
            finally:
                with contextlib.suppress(Exception):
                    await watcher.stop()

    async def _follow(self, kv: KeyValue, watcher: KeyValue.KeyWatcher) -> None:
        while not self.rt.stop.is_set():
            try:
                entry = await watcher.updates(timeout=RECHECK_S)
            except nats.errors.TimeoutError:
                try:
                    entry = await kv.get(self.key)
                except KeyNotFoundError:  # deleted ones too (KeyDeletedError)
                    await self._deliver(None, ABSENT)
                    continue
                if entry.revision != self.last_revision and entry.value:
                    await self._deliver(entry.value, entry.revision or 0)
                    return  # the watch missed it: start a new one
                continue
            if entry is None:
                continue
            if entry.operation is not None or not entry.value:  # DEL or PURGE
                await self._deliver(None, ABSENT)
                continue
            await self._deliver(entry.value, entry.revision or 0)
