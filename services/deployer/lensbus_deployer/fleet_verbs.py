"""The hub's fleet verbs: ``fleet_add`` and ``fleet_remove`` (a device's sources and record,
with its device groups), ``fleet_deploy`` (``desired.<device>.<group>`` for the devices named
or a device group's, once the model is in the hub's store) and
``fleet_status`` (each device: desired vs served, last seen, results lag)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from lensbus.schemas import (
    ActivateRequest,
    FleetDeployReply,
    FleetDeployRequest,
    FleetDesired,
    FleetDevice,
    FleetDeviceReply,
    FleetDeviceRequest,
    FleetDeviceStatus,
    FleetStatusReply,
    FleetStatusRequest,
    ModelVersionRef,
)
from lensbus_deployer import metrics
from lensbus_deployer.config import DeployerSettings
from lensbus_deployer.errors import Refused
from lensbus_deployer.fleet_hub import FleetHub
from lensbus_deployer.jetstream import JetStream

log = logging.getLogger(__name__)

# The version an ``activate`` request names, or the latest one stored (Api._version).
Resolve = Callable[[ActivateRequest], Awaitable[str]]


class FleetVerbs:
    """The fleet verbs of a hub's deployer, on the hub's fleet resources."""

    def __init__(self, settings: DeployerSettings, jetstream: JetStream, resolve: Resolve) -> None:
        self.s = settings
        self.jetstream = jetstream
        self.resolve = resolve
        self.hub = FleetHub(jetstream.store.js, jetstream.rt.nc, settings)
        # One change of the streams' sources at a time (a read-modify-write of the config).
        self.lock = asyncio.Lock()

    def _hub(self) -> FleetHub:
        if not self.s.fleet_hub:
            raise Refused(
                "bad_request",
                "this deployer is not a fleet hub's: run the fleet verbs against the hub, whose "
                "deployer has LENSBUS_DEPLOYER_FLEET_HUB=true"
                + (f" (this one is device {self.s.fleet_device}'s)" if self.s.fleet_device else ""),
            )
        self.jetstream.require_store()  # a refusal naming JetStream's problem
        return self.hub

    async def fleet_add(self, req: FleetDeviceRequest) -> FleetDeviceReply:
        hub = self._hub()
        await self._not_the_hub(req.device)
        groups = None if req.groups is None else sorted(set(req.groups))
        changes = []
        async with self.lock:
            # The record first: should the sources fail, the watch adds them (its records).
            record = await hub.device(req.device)
            if record is None:
                record = FleetDevice(
                    device=req.device, added_ns=time.time_ns(), groups=groups or []
                )
                await hub.put_device(record)
                changes.append(f"device {req.device} recorded" + _in_groups(record.groups))
            elif groups is not None and groups != record.groups:
                # Adding an added device again with --groups is how its groups change.
                was = ", ".join(record.groups) or "none"
                record = record.model_copy(update={"groups": groups})
                await hub.put_device(record)
                changes.append(f"device groups now {', '.join(groups) or 'none'} (were {was})")
            changes += await hub.add_sources(req.device)
        metrics.FLEET_CHANGES.labels("add", "ok").inc()  # the gauges: the watch's next round
        log.info("fleet: device %s added (%s)", req.device, "; ".join(changes) or "no change")
        return FleetDeviceReply(device=record, changes=changes)

    async def _not_the_hub(self, device: str) -> None:
        """Refuse the hub's own JetStream domain as a device: its results stream would source
        itself, and its deployer would take the hub's desired models for a device's."""
        domain = (await self.hub.js.account_info()).domain
        if domain is not None and device == domain:
            metrics.FLEET_CHANGES.labels("add", "bad_request").inc()
            raise Refused(
                "bad_request",
                f"{device!r} is this hub's own JetStream domain, not a device: a device is "
                "another nats-server, a leaf node of the hub whose JetStream domain is the "
                "device's name (python -m lensbus.natsleaf device-config NAME --hub "
                "nats-leaf://HUB:7422)",
            )

    async def fleet_remove(self, req: FleetDeviceRequest) -> FleetDeviceReply:
        hub = self._hub()
        record = await hub.device(req.device)
        if record is None:
            metrics.FLEET_CHANGES.labels("remove", "not_found").inc()
            raise Refused("not_found", await self._unknown(req.device))
        async with self.lock:
            changes = await hub.remove_sources(req.device)
            await hub.forget(req.device)
        changes.append(f"device {req.device}, its desired models and its report forgotten")
        metrics.FLEET_CHANGES.labels("remove", "ok").inc()
        log.info("fleet: device %s removed", req.device)
        return FleetDeviceReply(device=record, changes=changes)

    async def fleet_deploy(self, req: FleetDeployRequest) -> FleetDeployReply:
        hub = self._hub()
        store = self.jetstream.require_store()
        try:
            request = ActivateRequest(group=req.group, name=req.name, version=req.version)
            version = await self.resolve(request)
            devices = await self._targets(req)
        except Refused as exc:
            metrics.FLEET_CHANGES.labels("deploy", exc.code).inc()
            raise
        stored = await store.model(req.name, version)
        if stored is None:  # deleted meanwhile
            raise Refused("not_found", f"{req.name}:{version} is no longer in the hub's store")
        info, content = stored
        now = time.time_ns()
        records = [
            FleetDesired(
                device=device,
                group=req.group,
                model=ModelVersionRef(name=req.name, version=version),
                sha256=info.sha256,
                content=content,
                size=info.size,
                set_ns=now,
            )
            for device in devices
        ]
        for record in records:
            await hub.put_desired(record)
        metrics.FLEET_CHANGES.labels("deploy", "ok").inc()
        log.info(
            "fleet: group %s of %s%s: desired %s:%s",
            req.group,
            ", ".join(r.device for r in records),
            "" if req.device_group is None else f" (device group {req.device_group})",
            req.name,
            version,
        )
        return FleetDeployReply(desired=records)

    async def _targets(self, req: FleetDeployRequest) -> list[str]:
        """The devices a deploy reaches: those named, each added, or those of the device group
        as the records say now (here, not in the client, so every client gets this answer)."""
        records = await self.hub.devices()
        if req.device_group is None:
            known = {d.device for d in records}
            for device in dict.fromkeys(req.devices):
                if device not in known:
                    raise Refused("not_found", await self._unknown(device))
            return list(dict.fromkeys(req.devices))
        members = sorted(d.device for d in records if req.device_group in d.groups)
        if not members:
            raise Refused("not_found", _unknown_group(req.device_group, records))
        return members

    async def _unknown(self, device: str) -> str:
        known = sorted(d.device for d in await self.hub.devices())
        listed = f"devices: {', '.join(known)}" if known else "no device added yet"
        return f"unknown device {device!r} ({listed}); add it first: lensbus fleet add {device}"

    async def fleet_status(self, req: FleetStatusRequest) -> FleetStatusReply:
        hub = self._hub()
        devices = await hub.devices()
        if req.device is not None:
            devices = [d for d in devices if d.device == req.device]
            if not devices:
                raise Refused("not_found", await self._unknown(req.device))
        desired, seen = await hub.desired(), await hub.seen()
        try:
            sources = await hub.source_info()
        except Exception as exc:  # JetStream slow: status still answers, lag unknown
            log.debug("fleet stream info: %s", exc)
            sources = {}
        out = []
        for d in sorted(devices, key=lambda d: d.device):
            src = sources.get(d.device, {})
            lag = src.get("lag")
            active = src.get("active")
            error = src.get("error") or {}
            out.append(
                FleetDeviceStatus(
                    device=d.device,
                    added_ns=d.added_ns,
                    groups=d.groups,
                    desired=sorted(
                        (r for r in desired if r.device == d.device), key=lambda r: r.group
                    ),
                    seen=seen.get(d.device),
                    results_lag=lag,
                    results_active_s=None if active is None else active / 1e9,
                    results_error=str(error.get("description", "")) if error else "",
                )
            )
        return FleetStatusReply(devices=out)


def _in_groups(groups: list[str]) -> str:
    return f" in device groups {', '.join(groups)}" if groups else ""


def _unknown_group(name: str, records: list[FleetDevice]) -> str:
    """Why a deploy to device group ``name`` reaches nobody, with the groups there are: a group
    exists only while a device belongs to it, so unknown and empty are one case."""
    members: dict[str, list[str]] = {}
    for record in sorted(records, key=lambda r: r.device):
        for group in record.groups:
            members.setdefault(group, []).append(record.device)
    listed = ", ".join(f"{g} ({' '.join(ds)})" for g, ds in sorted(members.items()))
    known = f"device groups: {listed}" if listed else "no device is in a device group yet"
    return (
        f"unknown device group {name!r}: no device belongs to it ({known}); put a device "
        f"in it with: lensbus fleet add DEVICE --groups {name} (naming its other groups too)"
    )
