"""A hub's deployer watches its devices' sources: one silent for a while (the device cut off,
or never reached since ``fleet add``) whose device answers again through its domain is made
anew at once, rather than when nats-server's own growing back-off next retries it.

While the link holds, a source hears from its device about every second (the sourcing
consumer's heartbeats: ``active`` stayed under 1 s with nothing to copy), so silence longer
than :data:`STALLED_S` means the link was lost. Measured (``bench/fleet.py``): without this,
the first result reached the hub 10 s after the link returned from a short outage and 40 s
after a 60 s one (nats-server's back-off grows with the outage); with it, a round of this
watch (``fleet_check_s``) after the link returns.

Each round also makes the fleet stream and bucket source exactly the devices recorded
(``device.*``): a source lost (a restart whose second update failed, two hub deployers
writing the sources at once) is back a round later. Only one of a hub's deployers changes
sources from here: the one holding the lease (:class:`WatchLease`); every one keeps the
fleet gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from lensbus.logs import RateLimit, log_limited
from lensbus.runtime import Runtime
from lensbus.schemas.fleet import WATCH_LEASE_KEY
from lensbus.waiting import sleep_unless_stopped
from lensbus_deployer import metrics
from lensbus_deployer.config import DeployerSettings
from lensbus_deployer.fleet_hub import FleetHub

log = logging.getLogger(__name__)

# A source not heard from for this long has lost its device.
STALLED_S = 3.0
# A device's sources are made anew at most this often.
RESTART_EVERY_S = 30.0
# How long a device's JetStream is given to answer the probe.
PROBE_TIMEOUT_S = 2.0
# The lease passes to another hub deployer once its holder missed this many rounds (plus
# the longest a round waits for its devices' probes).
LEASE_ROUNDS = 5


def _heard_lately(active: object) -> bool:
    """Whether a source's ``active`` (ns since its device was last heard, -1: never) is
    recent enough for the link to be up."""
    return isinstance(active, int) and 0 <= active < STALLED_S * 1e9


class WatchLease:
    """Which of a hub's deployers (one queue group) changes the sources each round: the one
    that last renewed the empty KV key ``lease.watch``, whose revision is the lease. The
    holder writes it anew every round (a compare-and-set on the revision it wrote); another
    takes it over, also by compare-and-set (one wins), once the revision has not moved for
    ``expire_s`` of its own clock, so no two clocks are compared. A holder that stalls longer
    than that may run one round beside the new one: the rounds converge on the records, so
    that costs at most a source made anew once more."""

    def __init__(self, hub: FleetHub, instance: str, expire_s: float) -> None:
        self.hub = hub
        self.instance = instance
        self.expire_s = expire_s
        self.mine = 0  # the revision this instance wrote last
        self.seen = (0, 0.0)  # the revision seen last, and since when (monotonic)
        self.held = False

    async def renew(self) -> bool:
        """Hold the lease for this round (renewing or taking it), or learn another holds it."""
        kv = await self.hub.kv()
        try:
            revision = (await kv.get(WATCH_LEASE_KEY)).revision
        except KeyNotFoundError:  # never written, or deleted: the first to create it holds it
            revision = 0
        now = time.monotonic()
        if revision != self.seen[0]:
            self.seen = (revision, now)
        if revision and revision != self.mine and now - self.seen[1] < self.expire_s:
            return self._held(False)  # another's, renewed lately
        try:
            if revision:
                self.mine = await kv.update(WATCH_LEASE_KEY, b"", last=revision)
            else:
                self.mine = await kv.create(WATCH_LEASE_KEY, b"")
        except KeyWrongLastSequenceError:  # another renewed or took it first
            return self._held(False)
        self.seen = (self.mine, now)
        return self._held(True)

    def _held(self, held: bool) -> bool:
        if held != self.held:
            who = f"this deployer ({self.instance})" if held else "another hub deployer"
            log.info("fleet: %s runs the source watch", who)
        self.held = held
        return held


class FleetWatch:
    """The rounds of a hub's deployer over its devices' sources."""

    def __init__(
        self, settings: DeployerSettings, rt: Runtime, hub: FleetHub, lock: asyncio.Lock
    ) -> None:
        self.s = settings
        self.rt = rt
        self.hub = hub
        self.lock = lock
        expire_s = LEASE_ROUNDS * settings.fleet_check_s + 2 * PROBE_TIMEOUT_S
        self.lease = WatchLease(hub, settings.instance, expire_s)
        self.restarted: dict[str, float] = {}
        self._lagged: set[str] = set()  # devices with a lag gauge
        self._limit = RateLimit(60.0)

    async def run(self) -> None:
        while not self.rt.stop.is_set():
            await sleep_unless_stopped(self.rt.stop, self.s.fleet_check_s)
            try:
                await self.round()
            except Exception as exc:  # JetStream away or slow: the next round tries again
                cause = f"{type(exc).__name__}: {exc}"
                log_limited(
                    log,
                    self._limit,
                    type(exc).__name__,
                    logging.WARNING,
                    "fleet watch round failed (next in %g s): %s",
                    self.s.fleet_check_s,
                    cause,
                )

    async def round(self) -> None:
        held = await self.lease.renew()
        async with self.lock:  # not while a fleet verb changes the sources
            devices = await self.hub.device_names()
            changes = await self.hub.reconcile(devices) if held else []
        for change in changes:
            log.warning("fleet: %s", change)
        sources = await self.hub.source_info()
        self._gauges(devices, sources)
        if held:
            await self._restart_stalled(sources)

    def _gauges(self, devices: set[str], sources: dict[str, dict[str, Any]]) -> None:
        metrics.FLEET_DEVICES.set(len(devices))
        lags = {d: info["lag"] for d, info in sources.items() if isinstance(info.get("lag"), int)}
        for device in self._lagged - set(lags):
            with contextlib.suppress(KeyError):  # fleet_remove took it already
                metrics.FLEET_RESULTS_LAG.remove(device)
                metrics.FLEET_SOURCE_ACTIVE.remove(device)
        for device, lag in lags.items():
            metrics.FLEET_RESULTS_LAG.labels(device).set(lag)
            active = sources[device].get("active")
            if isinstance(active, int):  # nanoseconds since it was last heard; -1: never
                metrics.FLEET_SOURCE_ACTIVE.labels(device).set(active / 1e9 if active >= 0 else -1)
        self._lagged = set(lags)

    async def _restart_stalled(self, sources: dict[str, dict[str, Any]]) -> None:
        now = time.monotonic()
        stalled = [
            device
            for device, info in sources.items()
            if not _heard_lately(info.get("active"))
            and now - self.restarted.get(device, -RESTART_EVERY_S) >= RESTART_EVERY_S
        ]
        # Probed at once: a round lasts one probe however many devices are away.
        answers = await asyncio.gather(*(self._answers(device) for device in stalled))
        for device, answers_again in zip(stalled, answers, strict=True):
            if not answers_again:
                continue
            self.restarted[device] = now
            async with self.lock:
                await self.hub.restart_sources(device)
            metrics.FLEET_SOURCE_RESTARTS.inc()
            log.info("fleet: device %s answers again: its sources made anew", device)

    async def _answers(self, device: str) -> bool:
        js = self.rt.nc.jetstream(domain=device, timeout=PROBE_TIMEOUT_S)
        try:
            await js.account_info()
        except Exception:
            return False
        return True
