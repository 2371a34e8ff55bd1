"""The JetStream resources the publisher owns: the results stream (results and events, with
age and size limits, so a program that was offline can replay what it missed), the object
store of event snapshots and the object store of clips around events. They are created when
missing (file storage) and checked again from time to time, so a NATS server that lost its
store gets them back. Every few seconds the stream is also audited
(:mod:`~lensbus_publisher.store_audit`): results JetStream did not store are counted, and a
stream that vanished is made again at once rather than at the next check.
"""

from __future__ import annotations

import asyncio
import logging

from nats.js import api
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore

from lensbus.jetstream import ensure_object_store, ensure_stream
from lensbus.runtime import Runtime
from lensbus.waiting import sleep_unless_stopped
from lensbus_publisher import metrics
from lensbus_publisher.config import PublisherSettings
from lensbus_publisher.store_audit import StoreAudit

log = logging.getLogger(__name__)

CHECK_S = 30.0  # how often the stream's config is checked once in place
AUDIT_S = 5.0  # how often what it stored is compared with what was published
RETRY_S = 3.0  # how soon a failed set-up is tried again


class Durable:
    def __init__(self, settings: PublisherSettings, rt: Runtime) -> None:
        self.s = settings
        self.rt = rt
        self.snapshots: ObjectStore | None = None
        self.clips: ObjectStore | None = None
        self.ready = asyncio.Event()
        self.audit = StoreAudit()

    @property
    def subjects(self) -> list[str]:
        return [self.rt.subjects.all_results(), self.rt.subjects.all_events()]

    def stream_config(self) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.rt.subjects.results_stream,
            description="lensbus results and events, for replay (lensbus watch --since)",
            subjects=self.subjects,
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            discard=api.DiscardPolicy.OLD,
            max_age=self.s.stream_max_age_s,
            max_bytes=self.s.stream_max_bytes,
        )

    async def ensure(self) -> None:
        js = self.rt.nc.jetstream()
        owned = ("subjects", "max_age", "max_bytes")
        await ensure_stream(js, self.stream_config(), owned, replicas=self.s.jetstream_replicas)
        if self.snapshots is None:
            self.snapshots = await self._object_store(
                self.rt.subjects.snapshots_bucket,
                "lensbus event snapshots (<camera>/<capture_ns>-<seq>.jpg)",
                self.s.snapshots_max_bytes,
                self.s.snapshots_max_age_s,
            )

    async def ensure_clips(self) -> None:
        """The clips bucket, with age and byte limits. Its stream refuses new data when full
        (nats-py's object stores discard new), so :func:`lensbus.clips.put_clip` deletes the
        oldest clips to make room: the byte limit here is a backstop."""
        if self.clips is not None:
            return
        self.clips = await self._object_store(
            self.rt.subjects.clips_bucket,
            "lensbus clips around events (<camera>-<capture_ns>-<seq>, AVI)",
            self.s.clips_max_bytes,
            self.s.clips_max_age_s,
        )

    async def _object_store(
        self, bucket: str, description: str, max_bytes: int, max_age_s: float
    ) -> ObjectStore:
        """Bind ``bucket``, or create it with these limits (they apply at creation only:
        lowered in place they would make the server drop stored objects' chunks); its
        replica count follows the settings."""
        config = api.ObjectStoreConfig(
            description=description,
            storage=api.StorageType.FILE,
            max_bytes=max_bytes,
            ttl=max_age_s,
        )
        js = self.rt.nc.jetstream()
        return await ensure_object_store(js, bucket, config, replicas=self.s.jetstream_replicas)

    async def run(self) -> None:
        """Keep the stream and the buckets in place, and audit the stream, until stopped."""
        checked = float("-inf")
        try:
            while not self.rt.stop.is_set():
                wait = RETRY_S
                if self.rt.bus.connected:
                    if not self.audit.started:  # its subscriptions live on across reconnects
                        await self.audit.start(self.rt.nc, self.subjects)
                    now = asyncio.get_running_loop().time()
                    if now - checked >= CHECK_S or not self.ready.is_set():
                        wait = await self._check()
                        checked = now if self.ready.is_set() else float("-inf")
                    if self.ready.is_set() and not await self._audit():
                        checked = float("-inf")  # the stream vanished: make it again now
                        wait = 0.0
                    wait = min(wait, AUDIT_S)
                await sleep_unless_stopped(self.rt.stop, wait)
        finally:
            await self.audit.stop()

    async def _check(self) -> float:
        """Put the stream and buckets in place; how long to wait before the next step."""
        wait = CHECK_S
        try:
            await self.ensure()
        except Exception as exc:  # no JetStream, a clashing stream, a timeout
            self.snapshots = None
            self.ready.clear()
            metrics.STREAM_READY.set(0)
            self.rt.health.set("results_stream", f"{self.rt.subjects.results_stream}: {exc}")
            log.warning("results stream %s not in place: %s", self.rt.subjects.results_stream, exc)
            wait = RETRY_S
        else:
            self.ready.set()
            metrics.STREAM_READY.set(1)
            self.rt.health.set("results_stream", None)
        if self.s.rules:
            try:
                await self.ensure_clips()
            except Exception as exc:  # clips wait; results and events go on
                log.warning("clips store %s not in place: %s", self.rt.subjects.clips_bucket, exc)
                wait = RETRY_S
        return wait

    async def _audit(self) -> bool:
        """Compare what the stream stored with what was published; False if it is gone."""
        seen = self.audit.seen
        stream = self.rt.subjects.results_stream
        try:
            info = await self.rt.nc.jetstream().stream_info(stream)
        except NotFoundError:
            log.warning("results stream %s is gone; making it again", stream)
            self.ready.clear()
            self.audit.rebase(seen, 0)
            return False
        except Exception as exc:  # a timeout: the next audit tries again
            log.debug("results stream audit skipped: %s", exc)
            return True
        new = self.audit.check(seen, info.state.last_seq)
        if new:
            problem = f"{new} results not stored in {stream} (JetStream store full?)"
            log.warning("%s; %d in all", problem, self.audit.not_stored)
            self.rt.health.set("results_stream", problem)
        else:
            self.rt.health.set("results_stream", None)
        return True
