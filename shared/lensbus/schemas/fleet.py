"""A fleet: devices joined to a hub as NATS leaf nodes (:mod:`lensbus.natsleaf`).

The hub's KV ``<install>-fleet`` (``Subjects.fleet_bucket``) holds ``device.<D>``
(:class:`FleetDevice`: D was added), ``desired.<D>.<G>`` (:class:`FleetDesired`: the model
device D's camera group G must run, written by the hub deployer's ``fleet_deploy``) and
``seen.<D>`` (:class:`FleetSeen`: what D serves, written by D's deployer into D's own fleet
bucket and sourced into the hub's), and ``lease.watch`` (which hub deployer watches the
sources). The fleet verbs' requests and replies are here too.

A device group (``north``, ``roof``) is a name in devices' records (``FleetDevice.groups``),
nothing more: it exists while a device belongs to it, and a fleet deploy naming it
(``FleetDeployRequest.device_group``) reaches the devices the hub's deployer finds in it at
that moment, so every client, in any language, gets the same answer. Not to be confused with
a camera group (``group``): the cameras of one device that run one model.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import AfterValidator, Field, model_validator

from lensbus.schemas.base import WireMessage, WirePart
from lensbus.schemas.deploy import Group, ModelName, ModelVersion, ModelVersionRef, Reply
from lensbus.subjects import TOKEN_PATTERN, validate_device, validate_token


def validate_device_group(value: str) -> str:
    return validate_token(value, "device group")


Device = Annotated[str, Field(pattern=TOKEN_PATTERN), AfterValidator(validate_device)]
DeviceGroup = Annotated[str, Field(pattern=TOKEN_PATTERN), AfterValidator(validate_device_group)]


# The keys of the fleet bucket. Each helper also makes a watch pattern: ``ANY`` stands for
# every device (or group), e.g. ``device_key(ANY)`` is ``device.*``.
ANY = "*"
# The hub deployers' lease on the source watch (fleet_watch.py): its value is empty, its
# revision is the lease (renewed by the holder every round).
WATCH_LEASE_KEY = "lease.watch"


def device_key(device: str) -> str:
    return f"device.{device}"


def desired_key(device: str, group: str) -> str:
    return f"desired.{device}.{group}"


def seen_key(device: str) -> str:
    return f"seen.{device}"


class FleetDevice(WireMessage):
    """A device joined to the hub (KV ``device.<D>``): its results are sourced, it may be
    deployed to. Its name is its JetStream domain."""

    kind: ClassVar[str] = "fleet_device"

    device: Device
    added_ns: int = Field(ge=0)
    groups: list[DeviceGroup] = Field(
        default_factory=list,
        description="the device groups it belongs to, sorted (lensbus deploy --device-group)",
    )


class FleetDesired(WireMessage):
    """The model a device's camera group must run (KV ``desired.<D>.<G>``)."""

    kind: ClassVar[str] = "fleet_desired"

    device: Device
    group: Group
    model: ModelVersionRef
    sha256: str = Field(description="sha256 of the package (.tar.gz) in the hub's model store")
    content: str = Field(
        default="",
        description="sha256 of its manifest (every file's sha256): a device storing the same "
        "name and version with other content refuses it",
    )
    size: int = Field(ge=0, description="bytes of the package")
    set_ns: int = Field(ge=0)


class FleetGroupSeen(WirePart):
    """One camera group of a device as the device sees it."""

    group: Group
    desired: ModelVersionRef | None = Field(
        default=None, description="the device's own desired model of the group"
    )
    state: str = Field(default="", description="the device's deployment state (active, ...)")
    serving: list[str] = Field(
        default_factory=list, description="'name:version' served, one per inference instance"
    )
    applied: ModelVersionRef | None = Field(
        default=None, description="the hub's desired model the device applied last"
    )
    applied_ns: int = Field(
        default=0, ge=0, description="when the hub set the desired model applied (its set_ns)"
    )
    error: str = Field(default="", description="why the hub's desired model is not applied")


class FleetSeen(WireMessage):
    """What a device serves, written by its deployer every few seconds while the hub answers
    (KV ``seen.<D>`` of the device's fleet bucket, sourced into the hub's)."""

    kind: ClassVar[str] = "fleet_seen"

    device: Device
    time_ns: int = Field(ge=0, description="when the device wrote it (the device's clock)")
    groups: list[FleetGroupSeen] = Field(default_factory=list)
    failures: int = Field(default=0, ge=0, description="failed rounds since the device started")


# ---- request / reply -------------------------------------------------------------------------


class FleetDeviceRequest(WireMessage):
    """``fleet_add`` and ``fleet_remove``: the device, and for ``fleet_add`` its groups."""

    kind: ClassVar[str] = "fleet_device_request"
    device: Device
    groups: list[DeviceGroup] | None = Field(
        default=None,
        description="fleet_add: the device groups the device belongs to from now on (replacing "
        "those it had; [] for none); omitted: a new device has none, an added one keeps its own",
    )


class FleetDeviceReply(Reply):
    device: FleetDevice | None = None
    changes: list[str] = Field(default_factory=list)


class FleetDeployRequest(WireMessage):
    """To the devices named, or to every device of a device group: one or the other."""

    kind: ClassVar[str] = "fleet_deploy_request"
    devices: list[Device] = Field(default_factory=list)
    device_group: DeviceGroup | None = Field(
        default=None,
        description="every device of this device group, as the hub's deployer finds them when "
        "it writes the desired models (instead of devices)",
    )
    group: Group
    name: ModelName
    version: ModelVersion | None = Field(default=None, description="latest when omitted")

    @model_validator(mode="after")
    def _devices_or_device_group(self) -> FleetDeployRequest:
        # Both at once would leave a reader guessing whether they add up or narrow down.
        if bool(self.devices) == (self.device_group is not None):
            raise ValueError("give either devices (at least one) or device_group, not both")
        return self


class FleetDeployReply(Reply):
    desired: list[FleetDesired] = Field(default_factory=list)


class FleetStatusRequest(WireMessage):
    kind: ClassVar[str] = "fleet_status_request"
    device: Device | None = Field(default=None, description="only this device")


class FleetDeviceStatus(WirePart):
    """One device as the hub sees it: what it must run, what it said it serves, and how far
    behind the hub's copy of its results is."""

    device: Device
    added_ns: int = 0
    groups: list[DeviceGroup] = Field(default_factory=list, description="its device groups")
    desired: list[FleetDesired] = Field(default_factory=list)
    seen: FleetSeen | None = None
    results_lag: int | None = Field(
        default=None, description="results the hub has not sourced yet, as last known"
    )
    results_active_s: float | None = Field(
        default=None, description="seconds since the hub last heard from the results source"
    )
    results_error: str = ""


class FleetStatusReply(Reply):
    devices: list[FleetDeviceStatus] = Field(default_factory=list)
