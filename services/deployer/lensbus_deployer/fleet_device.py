"""A device's side of a fleet: its deployer (``fleet_device=D``) follows the hub's
``desired.D.*`` keys through the hub's JetStream domain and applies each one here, by relay:
the model is copied from the hub's store into the local one when missing
(:mod:`~lensbus_deployer.fleet_copy`, the checks of an upload), then activated through the
``activate`` verb's own code, then ``seen.D`` is written.

Relay, not two JetStream sources (model store and desired state): a device must hold the model
before its desired state names it, and two independent sources cannot be ordered. ``seen.D``
goes into the device's own fleet bucket, which the hub sources (the leaf link carries no
``$KV.>``: a write to the hub's bucket from here would not cross it). It is written every
``fleet_seen_s`` while the hub answers, and after each change.

Everything here retries: with the hub unreachable (the link cut, the hub down, no fleet
bucket yet) the device keeps running what it has, counts the failure, and tries again with
back-off up to ``fleet_retry_max_s``; the watch is made anew when the link returns, so what
was deployed meanwhile is applied then. A desired model is applied once per ``fleet deploy``
(its ``set_ns``), so a local automatic rollback of it is not undone by the next round.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import nats.errors
from nats.js import api
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from lensbus.codec import DecodeError, decode, encode
from lensbus.jetstream import ensure_key_value
from lensbus.jsperms import kv_stream
from lensbus.logs import RateLimit, log_limited
from lensbus.runtime import Runtime
from lensbus.schemas import (
    ActivateRequest,
    DeploymentReply,
    FleetDesired,
    FleetGroupSeen,
    FleetSeen,
    GroupStatus,
    ModelVersionRef,
    StatusReply,
    StatusRequest,
)
from lensbus.schemas.fleet import ANY, desired_key, seen_key
from lensbus.subjects import Subjects
from lensbus.waiting import sleep_unless_stopped
from lensbus_deployer import metrics
from lensbus_deployer.config import DeployerSettings
from lensbus_deployer.errors import Refused
from lensbus_deployer.fleet_copy import copy_model
from lensbus_deployer.jetstream import JetStream
from lensbus_deployer.upload_verbs import UploadVerbs

log = logging.getLogger(__name__)

# A watch is made anew this often even while the link holds (a missed update is read then).
RESYNC_S = 60.0
# Longest wait for the hub's answer: an unreachable hub should be noticed soon.
HUB_TIMEOUT_S = 5.0
FIRST_RETRY_S = 1.0

Activate = Callable[[ActivateRequest], Awaitable[DeploymentReply]]
Status = Callable[[StatusRequest], Awaitable[StatusReply]]


class DeviceFleet:
    """The device's follower of the hub's desired models, and its ``seen`` reports."""

    def __init__(
        self,
        settings: DeployerSettings,
        rt: Runtime,
        jetstream: JetStream,
        upload_verbs: UploadVerbs,
        activate: Activate,
        status: Status,
    ) -> None:
        assert settings.fleet_device is not None
        self.s = settings
        self.rt = rt
        self.device = settings.fleet_device
        self.names = Subjects(settings.prefix)
        self.jetstream = jetstream
        self.upload_verbs = upload_verbs
        self.activate = activate
        self.status = status
        timeout = min(settings.request_timeout_s, HUB_TIMEOUT_S)
        self.hub_js = rt.nc.jetstream(domain=settings.fleet_hub_domain, timeout=timeout)
        self.desired: dict[str, FleetDesired] = {}
        # Per group: the hub's desired model applied here, and when the hub set it.
        self.applied: dict[str, tuple[ModelVersionRef, int]] = {}
        self.errors: dict[str, str] = {}
        self.retry_at: dict[str, tuple[float, float]] = {}  # group -> (monotonic, back-off)
        self.failures = 0
        self._local: KeyValue | None = None
        self._loaded = False
        self._limit = RateLimit(60.0)

    async def run(self) -> None:
        backoff = FIRST_RETRY_S
        while not self.rt.stop.is_set():
            beats = 0
            try:
                beats = await self._session()
            except Exception as exc:  # the hub unreachable, or anything else: never crash
                self._fail("link", exc)
            metrics.FLEET_HUB_UP.set(0)
            backoff = FIRST_RETRY_S if beats else min(backoff * 2, self.s.fleet_retry_max_s)
            await sleep_unless_stopped(self.rt.stop, backoff)

    def _fail(self, stage: str, exc: BaseException) -> str:
        self.failures += 1
        metrics.FLEET_FAILURES.labels(stage).inc()
        if isinstance(exc, BucketNotFoundError):
            text = f"the hub has no fleet yet (on the hub: lensbus fleet add {self.device})"
        elif isinstance(exc, Refused):
            text = exc.message
        else:
            text = f"{type(exc).__name__}: {exc}"
        log_limited(log, self._limit, stage, logging.WARNING, "fleet %s failed: %s", stage, text)
        return text

    # ---- one session: a watch of the hub's desired keys while the link holds -----------------

    async def _session(self) -> int:
        """Follow the hub until the link fails (raises) or a resync is due (returns the
        reports written)."""
        kv = await self.hub_js.key_value(self.names.fleet_bucket)
        watcher = await kv.watch(desired_key(self.device, ANY))
        beats, next_beat = 0, 0.0
        resync_at = time.monotonic() + RESYNC_S
        try:
            while not self.rt.stop.is_set() and time.monotonic() < resync_at:
                wait = max(0.05, next_beat - time.monotonic())
                try:
                    entry = await watcher.updates(timeout=wait)
                except nats.errors.TimeoutError:
                    entry = None
                if entry is not None:
                    self._take(entry)
                    continue  # read what else is there before applying
                changed = await self._apply_all()
                if changed or time.monotonic() >= next_beat:
                    await self._beat()
                    beats += 1
                    next_beat = time.monotonic() + self.s.fleet_seen_s
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
        return beats

    def _take(self, entry: KeyValue.Entry) -> None:
        group = entry.key.rsplit(".", 1)[-1]
        if entry.operation is not None or not entry.value:  # deleted: keep what runs
            self.desired.pop(group, None)
            return
        try:
            want = decode(entry.value, FleetDesired)
        except DecodeError as exc:
            self._fail("read", exc)
            return
        if desired_key(want.device, want.group) != entry.key:
            self._fail("read", ValueError(f"{entry.key} names {want.device}/{want.group}"))
            return
        self.desired[group] = want

    async def _beat(self) -> None:
        """Check the hub answers (else raise: the session ends), then write ``seen``."""
        await self.hub_js.stream_info(kv_stream(self.names.fleet_bucket))
        metrics.FLEET_HUB_UP.set(1)
        try:
            await self._write_seen()
        except Exception as exc:
            self._fail("seen", exc)

    # ---- applying the hub's desired models -----------------------------------------------------

    async def _apply_all(self) -> bool:
        try:
            await self._load_applied()
        except Exception as exc:  # the local JetStream not ready yet: next round
            self._fail("seen", exc)
            return False
        changed = False
        for group, want in sorted(self.desired.items()):
            if self.applied.get(group) == (want.model, want.set_ns):
                continue
            if time.monotonic() < self.retry_at.get(group, (0.0, 0.0))[0]:
                continue
            changed |= await self._apply(group, want)
        return changed

    async def _apply(self, group: str, want: FleetDesired) -> bool:
        """Copy (if missing) and activate ``want``; False (retried later) when that failed."""
        ref = want.model
        stage = "copy"
        try:
            store = self.jetstream.require_store()
            local = await store.model(ref.name, ref.version)
            if local is None:
                log.info("fleet: copying %s from the hub's store", ref.ref)
                await copy_model(
                    self.hub_js, self.s.prefix, self.upload_verbs, want, self.s.request_timeout_s
                )
            elif want.content and local[1] and local[1] != want.content:
                raise Refused(
                    "conflict",
                    f"{ref.ref} is stored here with other content than the hub's: "
                    "give the package another version",
                )
            stage = "activate"
            current = (await store.deployment(group)).deployment
            if current is None or current.model != ref:
                await self.activate(
                    ActivateRequest(group=group, name=ref.name, version=ref.version)
                )
        except Exception as exc:
            self.errors[group] = f"{stage}: {self._fail(stage, exc)}"
            _, backoff = self.retry_at.get(group, (0.0, FIRST_RETRY_S / 2))
            backoff = min(backoff * 2, self.s.fleet_retry_max_s)
            self.retry_at[group] = (time.monotonic() + backoff, backoff)
            return True  # the error is news for the report
        self.applied[group] = (ref, want.set_ns)
        self.errors.pop(group, None)
        self.retry_at.pop(group, None)
        metrics.FLEET_APPLIED.inc()
        log.info("fleet: group %s runs %s as the hub asked", group, ref.ref)
        return True

    # ---- seen: what this device serves ---------------------------------------------------------

    async def _local_kv(self) -> KeyValue:
        if self._local is None:
            self._local = await ensure_key_value(
                self.jetstream.require_store().js,
                api.KeyValueConfig(
                    bucket=self.names.fleet_bucket,
                    description="lensbus fleet: what this device serves (the hub sources it)",
                    history=1,
                    storage=api.StorageType.FILE,
                ),
                replicas=self.s.jetstream_replicas,
            )
        return self._local

    async def _load_applied(self) -> None:
        """What an earlier run applied (its last report), so it is not applied again."""
        if self._loaded:
            return
        try:
            entry = await (await self._local_kv()).get(seen_key(self.device))
            seen = decode(entry.value or b"", FleetSeen)
        except KeyNotFoundError:
            seen = None
        except DecodeError as exc:
            self._fail("read", exc)
            seen = None
        for g in seen.groups if seen else []:
            if g.applied is not None:
                self.applied.setdefault(g.group, (g.applied, g.applied_ns))
        self._loaded = True

    async def _write_seen(self) -> None:
        groups = {g.group: g for g in (await self.status(StatusRequest())).groups}
        names = sorted(set(groups) | set(self.desired) | set(self.applied))
        report = FleetSeen(
            device=self.device,
            time_ns=time.time_ns(),
            groups=[self._group_seen(name, groups.get(name)) for name in names],
            failures=self.failures,
        )
        await (await self._local_kv()).put(seen_key(self.device), encode(report))

    def _group_seen(self, group: str, status: GroupStatus | None) -> FleetGroupSeen:
        dep = status.deployment if status else None
        applied = self.applied.get(group)
        serving = [i.serving.ref for i in (status.instances if status else []) if i.serving]
        return FleetGroupSeen(
            group=group,
            desired=dep.model if dep else None,
            state=dep.state if dep else "",
            serving=sorted(serving),
            applied=applied[0] if applied else None,
            applied_ns=applied[1] if applied else 0,
            error=self.errors.get(group, ""),
        )
