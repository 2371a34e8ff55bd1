"""The hub's fleet resources: the KV ``<install>-fleet`` (devices, desired models, what each
device serves) and the stream ``<INSTALL>_FLEET_RESULTS`` (every device's results), each
with one JetStream source per device, through the device's domain (``$JS.<device>.API``).

JetStream's sourcing does the work: it copies what a device's stream holds, and after an
outage it resumes where it stopped (the last sourced sequence is kept in each stored
message's ``Nats-Stream-Source`` header, so a hub restart does not copy anything twice).
A subject transform puts the device in the subject (``<p>.results.<cam>`` ->
``<p>.fleet.<device>.results.<cam>``). The stream has no subjects of its own: nothing but a
device's stream can put a result in it. (nats-server gives a stream left with neither
subjects nor sources its own name as a subject: after the last device is removed.)

Both are created on first use (a single box never has them) through :mod:`lensbus.jetstream`,
with ``jetstream_replicas``; the stream's age and byte limits (``fleet_results_max_age_s``,
``fleet_results_max_bytes``) and its replica count are brought to the settings in place
whenever a device's source is added, and so every watch round while a device is recorded.
Its sources are never the helper's: they are changed here, one read-modify-write of the
stream's config per change.

Two hub deployers (one queue group) may change the sources at once (a verb each, or a verb
and the watch): ``update_stream`` takes the whole config and JetStream has no compare-and-set
on it, so the later write wins and a source the other added or removed meanwhile is undone.
The watch (``fleet_watch.py``, one deployer at a time) makes the sources match the
``device.*`` records every round, so such a lost update lasts one round.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from lensbus import metrics as shared_metrics
from lensbus.codec import DecodeError, decode, encode
from lensbus.jetstream import ensure_key_value, ensure_stream
from lensbus.jsperms import domain_api, domain_of, kv_stream, kv_subject, stream_info
from lensbus.schemas import FleetDesired, FleetDevice, FleetSeen
from lensbus.schemas.base import WireMessage
from lensbus.schemas.fleet import ANY, desired_key, device_key, seen_key
from lensbus.subjects import Subjects
from lensbus_deployer.config import DeployerSettings

log = logging.getLogger(__name__)

# Revisions kept per key of the fleet bucket.
FLEET_HISTORY = 5
# The fleet stream's fields the settings own (lensbus.jetstream): never its sources (ours,
# here) nor its subjects (none).
RESULTS_OWNED = ("max_age", "max_bytes")
# A scan's consumer goes this long after the scan ends (nats-py's default, 5 min, would keep
# one per watch round: 150 at a time on the fleet bucket).
SCAN_IDLE_S = 5.0
M = TypeVar("M", bound=WireMessage)
# The devices a stream sources -> the devices it must source.
Change = Callable[[set[str]], set[str]]


def results_source(s: Subjects, device: str) -> api.StreamSource:
    """The fleet stream's source of one device: its results stream, through its domain."""
    return api.StreamSource(
        name=s.results_stream,
        external=api.ExternalStream(api=domain_api(device)),
        subject_transforms=[
            api.SubjectTransform(src=src, dest=dest) for src, dest in s.fleet_transforms(device)
        ],
    )


def seen_source(s: Subjects, device: str) -> api.StreamSource:
    """The fleet bucket's source of one device: ``seen.<device>`` of the device's own bucket."""
    return api.StreamSource(
        name=kv_stream(s.fleet_bucket),
        external=api.ExternalStream(api=domain_api(device)),
        filter_subject=kv_subject(s.fleet_bucket, seen_key(device)),
    )


def _device_of(source: api.StreamSource) -> str | None:
    """The device a source reads from (its domain), or ``None`` for a source of ours."""
    return None if source.external is None else domain_of(source.external.api)


class FleetHub:
    """The fleet bucket and stream on the hub's JetStream; every call may raise NATS errors."""

    def __init__(self, js: JetStreamContext, nc: NATS, settings: DeployerSettings) -> None:
        self.js = js
        self.nc = nc
        self.s = settings
        self.names = Subjects(settings.prefix)
        self._kv: KeyValue | None = None
        results, bucket = self.names.fleet_results_stream, kv_stream(self.names.fleet_bucket)
        self._sources: dict[str, tuple[Callable[[Subjects, str], api.StreamSource], str]] = {
            results: (results_source, f"the hub's {results} sources its results"),
            bucket: (seen_source, f"the hub's {self.names.fleet_bucket} sources its seen report"),
        }

    async def kv(self) -> KeyValue:
        """The fleet bucket, created where missing."""
        if self._kv is None:
            self._kv = await ensure_key_value(
                self.js,
                api.KeyValueConfig(
                    bucket=self.names.fleet_bucket,
                    description="lensbus fleet: devices, their desired models, what they serve",
                    history=FLEET_HISTORY,
                    max_value_size=self.s.kv_max_value_bytes,
                    storage=api.StorageType.FILE,
                ),
                replicas=self.s.jetstream_replicas,
            )
        return self._kv

    # ---- sources -------------------------------------------------------------------------------

    async def add_sources(self, device: str) -> list[str]:
        """Source ``device``'s results and its ``seen`` key; what changed, one line each."""
        changes = []
        for stream, (_, added) in self._sources.items():
            if (await self._set_sources(stream, lambda have: have | {device}))[0]:
                changes.append(added)
        return changes

    async def remove_sources(self, device: str) -> list[str]:
        changes = []
        for stream in self._sources:
            if (await self._set_sources(stream, lambda have: have - {device}))[1]:
                changes.append(f"the hub's {stream} no longer sources it")
        return changes

    async def reconcile(self, devices: set[str]) -> list[str]:
        """Make both streams source exactly ``devices`` (the ``device.*`` records): a source
        lost (a restart whose second update failed, another hub deployer's write over ours) is
        added back, one of a device no longer recorded is removed; what changed."""
        changes = []
        for stream in self._sources:
            added, removed = await self._set_sources(stream, lambda _: set(devices))
            changes += [f"{stream}: source of {d} added back" for d in sorted(added)]
            changes += [f"{stream}: source of unrecorded {d} removed" for d in sorted(removed)]
        return changes

    async def restart_sources(self, device: str) -> None:
        """Make ``device``'s sources anew: nats-server retries a source it lost with a growing
        back-off (a 60 s outage left the hub 40 s behind after the link returned); a source
        made anew starts at once, where the stream's own record of what it sourced says (the
        ``Nats-Stream-Source`` headers: nothing twice).

        Two updates, removed then added: one update cannot restart a source. nats-server keeps
        a source whose identity (stream, external API, filter, transforms) is unchanged as it
        runs, whatever else changed; a changed identity is another source, and the headers
        name the old one, so it copies the device's stream again from its start (measured:
        every message twice). Should the second update fail, the next watch round adds the
        source back (:meth:`reconcile`)."""
        for stream in self._sources:
            if (await self._set_sources(stream, lambda have: have - {device}))[1]:
                await self._set_sources(stream, lambda have: have | {device})

    async def _set_sources(self, stream: str, change: Change) -> tuple[set[str], set[str]]:
        """One read-modify-write of the devices ``stream`` sources; (added, removed). Sources
        that are not a device's are kept as they are."""
        config = await self._config(stream, change)
        if config is None:
            return set(), set()
        sources = list(config.sources or [])
        have = {d for src in sources if (d := _device_of(src)) is not None}
        want = change(have)
        added, removed = want - have, have - want
        if added or removed:
            make = self._sources[stream][0]
            kept = [src for src in sources if _device_of(src) not in removed]
            config.sources = kept + [make(self.names, d) for d in sorted(added)]
            await self._update(config)
            log.info(
                "stream %s: sources added %s, removed %s", stream, added or "-", removed or "-"
            )
        return added, removed

    async def _config(self, stream: str, change: Change) -> api.StreamConfig | None:
        """The config of ``stream``; the results stream is created (its sources are added
        next, as to one that exists) or brought to the settings, or ``None`` where it is
        missing and nothing would be sourced."""
        if stream != self.names.fleet_results_stream:
            await self.kv()
            return (await self.js.stream_info(stream)).config
        if not change(set()):  # a removal: never create the stream for it
            try:
                return (await self.js.stream_info(stream)).config
            except NotFoundError:
                return None
        info = await ensure_stream(
            self.js, self._results_config(), RESULTS_OWNED, replicas=self.s.jetstream_replicas
        )
        return info.config

    async def _update(self, config: api.StreamConfig) -> None:
        if config.name == self.names.fleet_results_stream:
            # Never subjects of its own: the one nats-server gave it while it had no source
            # (its name) goes when a source comes back.
            config.subjects = None
        await self.js.update_stream(config)

    def _results_config(self) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.names.fleet_results_stream,
            description="lensbus: every device's results and events, sourced from each device",
            subjects=None,
            storage=api.StorageType.FILE,
            num_replicas=self.s.jetstream_replicas,
            max_age=self.s.fleet_results_max_age_s,  # 0: none, as JetStream's own
            max_bytes=self.s.fleet_results_max_bytes,  # -1: none, as JetStream's own
        )

    async def source_info(self) -> dict[str, dict[str, Any]]:
        """The fleet stream's sources by device: ``lag``, ``active`` (ns), ``error``; empty
        while there is no fleet stream. From the raw STREAM.INFO reply: nats-py's
        ``StreamSourceInfo`` drops ``external``, and every source has the same stream name."""
        subject = stream_info(self.names.fleet_results_stream)
        msg = await self.nc.request(subject, b"", timeout=self.s.request_timeout_s)
        reply = json.loads(msg.data)
        if "error" in reply:
            try:
                APIError.from_error(reply["error"])  # raises it
            except NotFoundError:
                return {}  # no device added yet
        out = {}
        for src in reply.get("sources") or []:
            device = domain_of((src.get("external") or {}).get("api", ""))
            if device is not None:
                out[device] = src
        return out

    # ---- records -------------------------------------------------------------------------------

    async def device(self, device: str) -> FleetDevice | None:
        return await self._get(device_key(device), FleetDevice)

    async def put_device(self, record: FleetDevice) -> None:
        await (await self.kv()).put(device_key(record.device), encode(record))

    async def forget(self, device: str) -> None:
        """Delete the device's record, its desired models and its seen report."""
        kv = await self.kv()
        keys = [device_key(device), seen_key(device)]
        keys += [desired_key(d.device, d.group) for d in await self.desired(device)]
        for key in keys:
            try:
                await kv.purge(key)
            except KeyNotFoundError:
                pass

    async def put_desired(self, record: FleetDesired) -> None:
        await (await self.kv()).put(desired_key(record.device, record.group), encode(record))

    async def devices(self) -> list[FleetDevice]:
        return await self._all(device_key(ANY), FleetDevice, lambda r: device_key(r.device))

    async def device_names(self) -> set[str]:
        """The devices with a ``device.*`` key, readable or not (the watch keeps sourcing a
        device whose record it cannot read: someone added it)."""
        prefix = device_key("")
        return {e.key[len(prefix) :] async for e in self._entries(device_key(ANY), meta_only=True)}

    async def desired(self, device: str = ANY) -> list[FleetDesired]:
        pattern = desired_key(device, ANY)
        return await self._all(pattern, FleetDesired, lambda r: desired_key(r.device, r.group))

    async def seen(self) -> dict[str, FleetSeen]:
        """Each device's report; one whose payload names another device than its key (which
        only that device's source can write) is refused."""
        records = await self._all(seen_key(ANY), FleetSeen, lambda r: seen_key(r.device))
        return {r.device: r for r in records}

    async def _get(self, key: str, cls: type[M]) -> M | None:
        try:
            entry = await (await self.kv()).get(key)
        except KeyNotFoundError:
            return None
        return self._decode(entry.value, cls)

    async def _all(self, pattern: str, cls: type[M], key_of: Callable[[M], str]) -> list[M]:
        found: list[M] = []
        async for entry in self._entries(pattern):
            record = self._decode(entry.value, cls)
            if record is not None and key_of(record) == entry.key:
                found.append(record)
            elif record is not None:
                shared_metrics.MESSAGES_REJECTED.labels("key_mismatch").inc()
        return found

    async def _entries(self, pattern: str, meta_only: bool = False) -> AsyncIterator[Any]:
        """The live (not deleted) entries of the keys ``pattern`` matches, as they are now."""
        kv = await self.kv()
        watcher = await kv.watch(
            pattern, ignore_deletes=True, meta_only=meta_only, inactive_threshold=SCAN_IDLE_S
        )
        try:
            while True:
                entry = await watcher.updates(timeout=self.s.request_timeout_s)
                if entry is None:
                    break
                if entry.operation is None:
                    yield entry
                if entry.delta == 0:
                    break
        finally:
            await watcher.stop()

    @staticmethod
    def _decode(value: bytes | None, cls: type[M]) -> M | None:
        if not value:
            return None
        try:
            return decode(value, cls)
        except DecodeError as exc:
            shared_metrics.MESSAGES_REJECTED.labels(exc.reason).inc()
            log.warning("unreadable %s record: %s", cls.kind, exc)
            return None
