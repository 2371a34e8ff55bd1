"""``lensbus fleet add|remove|list``, and what ``lensbus deploy --devices|--device-group`` and
``lensbus status --fleet`` do: a hub's devices (leaf nodes, :mod:`lensbus.natsleaf`) and their
device groups through the hub's deployer. Exit codes as the other deployer commands (0 done,
1 refused, 2 usage, 3 unreachable)."""

from __future__ import annotations

import argparse
import json
import time

from lensbus.cli.common import SubParsers
from lensbus.cli.deploy import EXIT_OK, deployer_command, deployer_options, when
from lensbus.deployclient import DeployClient
from lensbus.schemas import FleetDesired, FleetDeviceStatus, FleetGroupSeen
from lensbus.schemas.fleet import validate_device_group
from lensbus.subjects import InvalidName, validate_device


def _device_arg(value: str) -> str:
    try:
        return validate_device(value)
    except InvalidName as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _groups_arg(value: str) -> list[str]:
    """``north,roof``; ``''`` for none (the device leaves every device group)."""
    try:
        names = [v.strip() for v in value.split(",") if v.strip()]
        return sorted({validate_device_group(name) for name in names})
    except InvalidName as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _groups(groups: list[str]) -> str:
    return ", ".join(groups) or "none"


def ago(ns: int | None, now_ns: int | None = None) -> str:
    if not ns:
        return "never"
    seconds = max(0.0, ((now_ns or time.time_ns()) - ns) / 1e9)
    return f"{when(ns)} ({seconds:.0f} s ago)"


# ---- deploy --devices, status --fleet ----------------------------------------------------------


async def fleet_deploy(dc: DeployClient, args: argparse.Namespace) -> int:
    name, version = args.model
    # A device group is resolved by the hub: the reply names the devices it found.
    devices, device_group = args.devices or [], args.device_group
    desired = await dc.fleet_deploy(devices, args.group, name, version, device_group)
    if device_group is not None:
        print(f"device group {device_group}: {', '.join(d.device for d in desired)}")
    for d in desired:
        print(f"device {d.device}, group {d.group}: desired model is now {d.model.ref}")
    print(
        "each device copies it from the hub's store and activates it when it reaches the hub; "
        "watch with: lensbus status --fleet"
    )
    return EXIT_OK


async def fleet_status(dc: DeployClient, args: argparse.Namespace) -> int:
    devices = await dc.fleet_status(getattr(args, "device", None))
    if args.json:
        print(json.dumps([d.model_dump(mode="json") for d in devices], indent=2))
    else:
        print_fleet(devices)
    return EXIT_OK


def print_fleet(devices: list[FleetDeviceStatus]) -> None:
    if not devices:
        print("no devices yet: join one with: lensbus fleet add DEVICE")
        return
    now = time.time_ns()
    for d in devices:
        seen = d.seen
        print(f"device {d.device}  (device groups: {_groups(d.groups)})")
        print(f"  last seen {ago(seen.time_ns if seen else None, now)}")
        lag = "unknown" if d.results_lag is None else str(d.results_lag)
        active = "" if d.results_active_s is None else f", heard {d.results_active_s:.1f} s ago"
        print(
            f"  results   lag {lag}{active}" + (f"  ({d.results_error})" if d.results_error else "")
        )
        groups = {g.group: g for g in (seen.groups if seen else [])}
        wanted = {w.group: w for w in d.desired}
        for group in sorted(set(groups) | set(wanted)):
            print("  " + _group_line(group, wanted.get(group), groups.get(group)))
        if seen and seen.failures:
            print(f"  failures  {seen.failures} since the device's deployer started")


def _group_line(group: str, want: FleetDesired | None, seen: FleetGroupSeen | None) -> str:
    desired = want.model.ref if want else "-"
    serving = ", ".join(seen.serving) if seen and seen.serving else "nothing reported"
    line = f"group {group}: desired {desired}, serving {serving}"
    if want is not None and seen is not None:
        if seen.error:
            line += f"  error: {seen.error}"
        elif all(ref == want.model.ref for ref in seen.serving) and seen.serving:
            line += "  up to date"
        else:
            line += f"  wants {want.model.ref}"
    elif want is not None:
        line += "  not applied yet"
    return line


# ---- fleet add|remove|list ---------------------------------------------------------------------


async def _add(dc: DeployClient, args: argparse.Namespace) -> int:
    reply = await dc.fleet_add(args.device, args.groups)
    for change in reply.changes or ["already added: nothing changed"]:
        print(f"device {args.device}: {change}")
    return EXIT_OK


async def _remove(dc: DeployClient, args: argparse.Namespace) -> int:
    reply = await dc.fleet_remove(args.device)
    for change in reply.changes:
        print(f"device {args.device}: {change}")
    return EXIT_OK


async def _list(dc: DeployClient, args: argparse.Namespace) -> int:
    devices = await dc.fleet_status()
    if args.json:
        print(json.dumps([d.model_dump(mode="json") for d in devices], indent=2))
        return EXIT_OK
    if not devices:
        print("no devices yet: join one with: lensbus fleet add DEVICE")
    now = time.time_ns()
    for d in devices:
        seen = ago(d.seen and d.seen.time_ns, now)
        groups = f"device groups: {_groups(d.groups)}"
        print(f"{d.device}  added {when(d.added_ns)}  last seen {seen}  {groups}")
    return EXIT_OK


def register(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "fleet",
        help="devices joined to this hub as NATS leaf nodes",
        description="A hub's devices: each runs its own nats-server (a leaf node of the hub, "
        "its JetStream domain its name); the hub sources its results and deploys models to it "
        "(lensbus deploy NAME --group G --devices D1,D2, or --device-group NAME for every "
        "device of a device group; lensbus status --fleet).",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser(
        "add",
        help="join a device (the hub sources its results), or change its device groups",
        description="Join a device: the hub sources its results. Run again on an added "
        "device with --groups to change its device groups.",
    )
    p.add_argument("device", type=_device_arg, help="the device's name (its JetStream domain)")
    p.add_argument(
        "--groups",
        type=_groups_arg,
        metavar="G1,G2",
        help="the device groups it belongs to from now on, replacing those it had ('' for "
        "none; left out: kept); lensbus deploy --device-group G deploys to a group's devices",
    )
    deployer_options(p)
    p.set_defaults(func=deployer_command(_add, "fleet add"))
    p = verbs.add_parser("remove", help="stop sourcing a device and forget it")
    p.add_argument("device", type=_device_arg, help="the device's name")
    deployer_options(p)
    p.set_defaults(func=deployer_command(_remove, "fleet remove"))
    p = verbs.add_parser("list", help="the devices joined, their groups, when each was last seen")
    p.add_argument("--json", action="store_true", help="JSON (a list of FleetDeviceStatus)")
    deployer_options(p)
    p.set_defaults(func=deployer_command(_list, "fleet list"))
