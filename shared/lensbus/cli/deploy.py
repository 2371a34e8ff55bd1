"""``lensbus models upload|list``, ``lensbus deploy``, ``lensbus rollback``, ``lensbus status``:
the deployer's API from the command line.

Exit codes: 0 done, 1 refused or failed (a conflict, an invalid package, nothing to roll
back to), 2 usage, 3 the deployer or NATS cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import TextIO

from lensbus.cli.common import (
    SubParsers,
    WrongUser,
    add_nats_options,
    models_verbs,
    nats_user_options,
)
from lensbus.deployclient import UNREACHABLE, DeployClient, DeployError
from lensbus.schemas import Deployment, GroupStatus, ModelInfo
from lensbus.schemas.manifest import _check_name, _check_version
from lensbus.subjects import InvalidName, validate_token

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

# Commands that change nothing: the read-only NATS user ``client`` may run them.
READ_COMMANDS = (
    "models list",
    "status",
    "pipeline show",
    "pipeline history",
    "project list",
    "project status",
    "project watch",
    "fleet list",
)

Command = Callable[[DeployClient, argparse.Namespace], Awaitable[int]]


# ---- argument types (a bad value is a usage error: exit 2) -----------------------------------


def _group(value: str) -> str:
    try:
        return validate_token(value, "group")
    except InvalidName as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _devices(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    try:
        if not names:
            raise InvalidName("give at least one device name: --devices D1,D2")
        return [validate_token(name, "device name") for name in names]
    except InvalidName as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _device_group(value: str) -> str:
    try:
        return validate_token(value, "device group")
    except InvalidName as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _model_ref(value: str) -> tuple[str, str | None]:
    """``NAME`` or ``NAME:VERSION``."""
    name, _, version = value.partition(":")
    try:
        _check_name(name)
        if version:
            _check_version(version)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME[:VERSION]: {exc}") from None
    return name, version or None


# ---- output ------------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def when(ns: int) -> str:
    if ns <= 0:
        return "-"
    return datetime.fromtimestamp(ns / 1e9).astimezone().strftime("%Y-%m-%d %H:%M:%S")


class ProgressBar:
    """``[#####.....]  50%  17.0/34.0 MiB  120.0 MiB/s`` on stderr: redrawn in place on a
    terminal, one line per tenth otherwise (logs, CI)."""

    WIDTH = 30

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.monotonic()
        self._last_draw = 0.0
        self._last_tenth = -1

    def __call__(self, done: int, total: int) -> None:
        frac = done / total if total else 1.0
        now = time.monotonic()
        rate = done / max(now - self.t0, 1e-6)
        filled = int(frac * self.WIDTH)
        line = (
            f"{self.label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {frac * 100:3.0f}% "
            f"{human_bytes(done)}/{human_bytes(total)} {human_bytes(rate)}/s"
        )
        if self.tty:
            if done >= total or now - self._last_draw >= 0.1:
                self._last_draw = now
                self.stream.write("\r" + line + ("\n" if done >= total else ""))
                self.stream.flush()
        else:
            tenth = int(frac * 10)
            if tenth != self._last_tenth:
                self._last_tenth = tenth
                self.stream.write(line + "\n")
                self.stream.flush()


def _print_models(models: list[ModelInfo]) -> None:
    if not models:
        print("no models stored; upload one with: lensbus models upload PATH")
        return
    rows = [("NAME", "VERSION", "FRAMEWORK", "TASK", "SIZE", "UPLOADED", "SHA256")]
    for m in models:
        rows.append(
            (
                m.name,
                m.version,
                m.framework,
                m.task,
                human_bytes(m.size),
                when(m.uploaded_ns),
                m.sha256[:12],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _describe(dep: Deployment) -> str:
    text = f"group {dep.group}: desired model is now {dep.model.ref}"
    if dep.reason:
        text += f" ({dep.reason})"
    elif dep.history:
        text += f" (previous: {dep.history[-1].ref})"
    return text


def _print_status(groups: list[GroupStatus]) -> None:
    if not groups:
        print("no groups yet: deploy a model with: lensbus deploy NAME[:VERSION] --group GROUP")
        return
    for g in groups:
        print(f"group {g.group}")
        dep = g.deployment
        if dep is None:
            print("  desired   (none: lensbus deploy NAME --group " + g.group + ")")
        else:
            print(f"  desired   {dep.model.ref}  [{dep.state}] since {when(dep.activated_ns)}")
            if dep.reason:
                print(f"  reason    {dep.reason}")
            if dep.history:
                print(f"  history   {', '.join(h.ref for h in reversed(dep.history))}")
            if dep.pipeline_revision:
                print(
                    f"  pipeline  revision {dep.pipeline_revision} (lensbus pipeline show "
                    f"--group {g.group})"
                )
        if not g.instances:
            print("  instances (none reporting)")
        for inst in g.instances:
            serving = inst.serving.ref if inst.serving else "nothing"
            match = ""
            if dep is not None and inst.serving is not None:
                match = "up to date" if inst.serving == dep.model else f"wants {dep.model.ref}"
            line = f"  instance  {inst.instance}  {inst.state}  serving {serving}"
            line += f"  {match}" if match else ""
            print(line)
            if inst.reason:
                print(f"            reason: {inst.reason}")
        if g.last_failure:
            print(f"  last failure: {g.last_failure}")


# ---- commands ------------------------------------------------------------------------------


async def _upload(dc: DeployClient, args: argparse.Namespace) -> int:
    path = Path(args.path)
    bar = None if args.quiet else ProgressBar(f"uploading {path.name}")
    t0 = time.monotonic()
    reply = await dc.upload(path, progress=bar)
    m = reply.model
    assert m is not None
    took = time.monotonic() - t0
    if reply.created:
        print(
            f"stored {m.name}:{m.version} ({m.framework} {m.task}, {human_bytes(m.size)}, "
            f"sha256 {m.sha256[:12]}) in {took:.1f} s"
        )
    else:
        print(f"{m.name}:{m.version} was already stored with identical content; nothing changed")
    return EXIT_OK


async def _list(dc: DeployClient, args: argparse.Namespace) -> int:
    models = await dc.list(args.name)
    if args.json:
        print(json.dumps([m.model_dump(mode="json") for m in models], indent=2))
    else:
        _print_models(models)
    return EXIT_OK


async def _deploy(dc: DeployClient, args: argparse.Namespace) -> int:
    if args.devices or args.device_group:  # a hub's devices (lensbus.cli.fleet imports this)
        from lensbus.cli.fleet import fleet_deploy

        return await fleet_deploy(dc, args)
    name, version = args.model
    dep = await dc.activate(args.group, name, version)
    print(_describe(dep))
    print(
        f"inference instances of group {dep.group} swap to it live; watch with: "
        f"lensbus status --group {dep.group}"
    )
    return EXIT_OK


async def _rollback(dc: DeployClient, args: argparse.Namespace) -> int:
    print(_describe(await dc.rollback(args.group)))
    return EXIT_OK


async def _status(dc: DeployClient, args: argparse.Namespace) -> int:
    if args.fleet:  # the hub's devices (lensbus.cli.fleet imports this module)
        from lensbus.cli.fleet import fleet_status

        return await fleet_status(dc, args)
    groups = await dc.status(args.group)
    if args.json:
        print(json.dumps([g.model_dump(mode="json") for g in groups], indent=2))
    else:
        _print_status(groups)
    return EXIT_OK


# A check before connecting: (message, exit code) when the command must not go on.
Precheck = Callable[[argparse.Namespace], tuple[str, int] | None]


def _package_exists(args: argparse.Namespace) -> tuple[str, int] | None:
    if Path(args.path).exists():
        return None
    return f"{args.path}: no such package folder or .tar.gz file", EXIT_USAGE


def deployer_command(
    command: Command, title: str, precheck: Precheck | None = None
) -> Callable[[argparse.Namespace], int]:
    """A `lensbus <title>` verb talking to the deployer: connects as ``client`` for the
    READ_COMMANDS and ``operator`` otherwise, and turns refusals into messages and exit codes
    (the models, pipeline and project verbs share it)."""

    async def run(args: argparse.Namespace) -> int:
        user = "client" if title in READ_COMMANDS else "operator"
        options = nats_user_options(args, user)
        dc = await DeployClient.connect(
            args.nats_url, args.prefix, timeout_s=args.timeout, **options
        )
        async with dc:
            return await command(dc, args)

    def main(args: argparse.Namespace) -> int:
        refused = precheck(args) if precheck is not None else None
        if refused is not None:
            print(f"lensbus {title}: {refused[0]}", file=sys.stderr)
            return refused[1]
        try:
            return asyncio.run(run(args))
        except WrongUser as exc:
            print(f"lensbus {title}: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except DeployError as exc:
            if exc.code == UNREACHABLE:
                print(f"lensbus {title}: {exc.message}", file=sys.stderr)
                return EXIT_UNREACHABLE
            print(f"lensbus {title}: refused ({exc.code}): {exc.message}", file=sys.stderr)
            return EXIT_FAILED

    return main


# ---- registration ----------------------------------------------------------------------------


def deployer_options(p: argparse.ArgumentParser) -> None:
    add_nats_options(p)
    p.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the deployer (default 10)"
    )


def _fleet_options(p: argparse.ArgumentParser) -> None:
    """``deploy``'s targets on a hub: devices by name or a device group, one or the other."""
    fleet = p.add_mutually_exclusive_group()
    fleet.add_argument(
        "--devices",
        type=_devices,
        help="D1,D2: on these devices of the hub's fleet (each copies the model from the hub's "
        "store and activates it), not on this installation's own group",
    )
    fleet.add_argument(
        "--device-group",
        type=_device_group,
        metavar="NAME",
        help="on every device of this device group (lensbus fleet add D --groups NAME), as the "
        "hub finds them now; a device put in it later gets the next deploy",
    )


def register(sub: SubParsers) -> None:
    verbs = models_verbs(sub)

    p = verbs.add_parser(
        "upload",
        help="upload a model package (folder or .tar.gz) to the deployer's store",
        description="Upload a model package: a folder with model.json (packed on the fly) "
        "or a .tar.gz. The deployer checks every file's sha256 and the manifest; a version "
        "already stored is refused unless identical.",
    )
    p.add_argument("path", metavar="PATH", help="package folder or .tar.gz")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    deployer_options(p)
    p.set_defaults(func=deployer_command(_upload, "models upload", _package_exists))

    p = verbs.add_parser("list", help="list the stored model versions")
    p.add_argument("--name", help="only this model's versions")
    p.add_argument("--json", action="store_true", help="JSON (a list of ModelInfo)")
    deployer_options(p)
    p.set_defaults(func=deployer_command(_list, "models list"))

    p = sub.add_parser(
        "deploy",
        help="set the model a camera group runs (inference swaps live)",
        description="Make NAME:VERSION (the latest uploaded version if VERSION is left out) "
        "the desired model of a camera group; the previous one is kept for rollback.",
    )
    p.add_argument("model", metavar="NAME[:VERSION]", type=_model_ref, help="a stored model")
    p.add_argument("--group", "-g", required=True, type=_group, help="camera group")
    _fleet_options(p)
    deployer_options(p)
    p.set_defaults(func=deployer_command(_deploy, "deploy"))

    p = sub.add_parser("rollback", help="return a camera group to its previous model")
    p.add_argument("--group", "-g", required=True, type=_group, help="camera group")
    deployer_options(p)
    p.set_defaults(func=deployer_command(_rollback, "rollback"))

    p = sub.add_parser("status", help="desired vs served model of each camera group")
    p.add_argument("--group", "-g", type=_group, help="only this group")
    p.add_argument(
        "--fleet",
        action="store_true",
        help="the hub's devices instead: desired vs served per group, last seen, results lag",
    )
    p.add_argument(
        "--json", action="store_true", help="JSON (a list of GroupStatus, or FleetDeviceStatus)"
    )
    deployer_options(p)
    p.set_defaults(func=deployer_command(_status, "status"))
