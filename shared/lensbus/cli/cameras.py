"""``lensbus cameras add|update|remove|list``: the cameras capture runs, as desired state in
the KV bucket ``lensbus-cameras`` (see :mod:`lensbus.cameras`). Capture instances with
``cameras_from`` ``bucket`` or ``both`` follow it: a camera added here starts within a
second or two, one removed stops, without a restart and without touching the others.

Exit codes: 0 done, 1 refused or failed (no such camera, JetStream not answering, not
allowed), 2 usage or invalid input (the message names the field: unknown keys, a duplicate
id on add, bad id characters, fps 0), 3 NATS unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats.errors
import yaml
from nats.errors import NoServersError
from nats.js.errors import BucketNotFoundError, KeyWrongLastSequenceError
from pydantic import ValidationError

from lensbus.bus import connect
from lensbus.cameras import CameraExists, CamerasBucket, NoSuchCamera, View
from lensbus.cli.common import SubParsers, WrongUser, add_nats_options, nats_user_options
from lensbus.cli.deploy import when
from lensbus.errors import DecodeError
from lensbus.schemas.camera import CameraConfig
from lensbus.subjects import Subjects

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
# Attempts at an update that others keep changing under us (compare-and-set on the revision).
UPDATE_ATTEMPTS = 5

Command = Callable[[CamerasBucket, argparse.Namespace], Awaitable[int]]


class Invalid(Exception):
    """Input that cannot make a CameraConfig; the message names the field (exit 2)."""


# ---- input -> CameraConfig -------------------------------------------------------------------


def _size(value: str) -> tuple[int, int]:
    w, sep, h = value.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not WIDTHxHEIGHT, e.g. 1920x1080")
    return int(w), int(h)


def given_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The CameraConfig fields the command line gives (options left out are absent)."""
    top: tuple[str, ...] = ("source", "fps", "group", "width", "height", "model_height")
    top += ("jpeg_quality", "device_stream", "idle_fps")
    out: dict[str, Any] = {k: getattr(args, k) for k in top if getattr(args, k, None) is not None}
    for name in ("loop", "node"):
        if getattr(args, name, None) is not None:
            out[name] = getattr(args, name)
    options: dict[str, Any] = {}
    for arg, name in (
        ("rtsp_transport", "rtsp_transport"),
        ("fourcc", "fourcc"),
        ("open_timeout", "open_timeout_s"),
        ("read_timeout", "read_timeout_s"),
    ):
        if getattr(args, arg, None) is not None:
            options[name] = getattr(args, arg)
    if args.capture_size is not None:
        options["capture_width"], options["capture_height"] = args.capture_size
    if options:
        out["options"] = options
    return out


def validated(data: dict[str, Any]) -> CameraConfig:
    try:
        return CameraConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise Invalid(f"invalid camera: {problems}") from None


def read_file(path: str) -> dict[str, Any]:
    """A CameraConfig as JSON or YAML (chosen by the suffix; YAML reads JSON too)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise Invalid(f"--from-file {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise Invalid(f"--from-file {path}: not JSON/YAML: {exc}") from None
    if not isinstance(data, dict):
        raise Invalid(f"--from-file {path}: expected a mapping of CameraConfig fields")
    return data


def config_to_add(args: argparse.Namespace) -> CameraConfig:
    data = read_file(args.from_file) if args.from_file else {}
    if args.id is not None:
        data["id"] = args.id
    data.update(given_fields(args))
    for name in ("id", "source"):
        if name not in data:
            raise Invalid(f"{name}: required (give ID SOURCE, or --from-file with {name})")
    return validated(data)


# ---- output ------------------------------------------------------------------------------------


def rows(view: View) -> list[dict[str, Any]]:
    """One row per camera with a config or a state (a camera from a capture's own settings
    has a state but no config)."""
    out = []
    for camera in sorted(set(view.configs) | set(view.states)):
        config, state = view.configs.get(camera), view.states.get(camera)
        out.append(
            {
                "id": camera,
                "config": config.model_dump(mode="json") if config else None,
                "state": state.model_dump(mode="json") if state else None,
            }
        )
    return out


def print_table(view: View) -> None:
    if not view.configs and not view.states:
        print("no cameras; add one with: lensbus cameras add ID SOURCE")
        return
    table = [("ID", "STATE", "FPS", "GROUP", "NODE", "INSTANCE", "SINCE", "SOURCE")]
    reasons: list[tuple[str, str]] = []
    for camera in sorted(set(view.configs) | set(view.states)):
        c, s = view.configs.get(camera), view.states.get(camera)
        source = c.source if c else "(a capture's own settings)"
        state = s.state if s else "pending"  # no capture instance has reported it yet
        table.append(
            (
                camera,
                state,
                f"{c.fps:g}" if c else "-",
                (c.group or "-") if c else "-",
                c.node if c else (s.node if s else "-"),
                s.instance if s else "-",
                when(s.since_ns) if s else "-",
                source,
            )
        )
        if s and s.reason:
            reasons.append((camera, s.reason))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for camera, reason in reasons:
        print(f"{camera}: {reason}")


# ---- commands ------------------------------------------------------------------------------


async def _add(bucket: CamerasBucket, args: argparse.Namespace) -> int:
    config = config_to_add(args)
    try:
        await bucket.add(config)
    except CameraExists as exc:
        raise Invalid(f"id: {exc}") from None
    print(f"added camera {config.id} ({config.source}, {config.fps:g} fps, node {config.node})")
    return EXIT_OK


async def _update(bucket: CamerasBucket, args: argparse.Namespace) -> int:
    changes = given_fields(args)
    if not changes:
        raise Invalid("nothing to change: give at least one option (see --help)")
    for _ in range(UPDATE_ATTEMPTS):
        current, revision = await bucket.config(args.id)
        if current is None:
            raise NoSuchCamera(f"no camera {args.id!r}; add it with: lensbus cameras add")
        data = current.model_dump(mode="python", exclude={"v"})
        data["options"] = {**data["options"], **changes.pop("options", {})}
        config = validated({**data, **changes})
        if config == current:
            print(f"camera {args.id}: nothing changed")
            return EXIT_OK
        try:
            await bucket.update(config, revision)
        except KeyWrongLastSequenceError:
            continue  # changed meanwhile: apply ours to the new value
        print(f"updated camera {args.id}")
        return EXIT_OK
    print(f"camera {args.id} kept changing; try again", file=sys.stderr)
    return EXIT_FAILED


async def _remove(bucket: CamerasBucket, args: argparse.Namespace) -> int:
    await bucket.remove(args.id)
    print(f"removed camera {args.id}")
    return EXIT_OK


async def _list(bucket: CamerasBucket, args: argparse.Namespace) -> int:
    view = await bucket.view(timeout_s=args.timeout)
    if args.json:
        print(json.dumps(rows(view), indent=2))
    else:
        print_table(view)
    return EXIT_OK


def _runner(command: Command, title: str, create: bool) -> Callable[[argparse.Namespace], int]:
    async def run(args: argparse.Namespace) -> int:
        try:
            nc = await connect(
                args.nats_url,
                name="lensbus-cameras",
                reconnect=False,
                timeout_s=args.timeout,
                **nats_user_options(args, "client" if command is _list else "operator"),
            )
        except (NoServersError, OSError, TimeoutError) as exc:
            print(f"lensbus {title}: NATS at {args.nats_url} unreachable ({exc})", file=sys.stderr)
            return EXIT_UNREACHABLE
        try:
            js = nc.jetstream(timeout=args.timeout)
            try:
                name = Subjects(args.prefix).cameras_bucket
                replicas = getattr(args, "replicas", None)  # only `add` creates
                bucket = await CamerasBucket.open(js, create=create, bucket=name, replicas=replicas)
            except BucketNotFoundError:
                if command is _list:  # nothing added yet anywhere
                    return await _list_empty(args)
                raise NoSuchCamera(f"no camera {args.id!r} (no cameras at all yet)") from None
            return await command(bucket, args)
        finally:
            await nc.close()

    def main(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(run(args))
        except Invalid as exc:
            print(f"lensbus {title}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except (NoSuchCamera, WrongUser) as exc:
            print(f"lensbus {title}: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except (nats.errors.Error, TimeoutError, DecodeError) as exc:
            print(
                f"lensbus {title}: failed ({type(exc).__name__}: {exc}); is JetStream enabled "
                "and is this NATS user allowed to use the cameras bucket?",
                file=sys.stderr,
            )
            return EXIT_FAILED

    return main


async def _list_empty(args: argparse.Namespace) -> int:
    print("[]" if args.json else "no cameras; add one with: lensbus cameras add ID SOURCE")
    return EXIT_OK


# ---- registration ----------------------------------------------------------------------------


def _camera_options(p: argparse.ArgumentParser, update: bool) -> None:
    p.add_argument("--fps", type=float, help="frames per second, at most (default 15)")
    p.add_argument("--group", help="camera group (the deployer's group whose model serves it)")
    p.add_argument("--width", type=int, help="output width")
    p.add_argument("--height", type=int, help="output height")
    p.add_argument("--model-height", type=int, help="also publish the model stream at this height")
    p.add_argument("--jpeg-quality", type=int, help="JPEG quality 1-100 (default 85)")
    p.add_argument(
        "--device-stream",
        choices=("on_demand", "always"),
        help="with a model stream: every device-stream frame only while wanted (on_demand, "
        "the default) or always",
    )
    p.add_argument("--idle-fps", type=float, help="on_demand, unwanted: frames a second (1)")
    loop = "restart a video file or folder at its end"
    if update:
        p.add_argument("--loop", action=argparse.BooleanOptionalAction, help=loop)
    else:
        p.add_argument("--loop", action="store_const", const=True, help=loop)
    p.add_argument("--node", help="the capture instances (their 'node' setting) that run it")
    p.add_argument("--rtsp-transport", choices=("tcp", "udp"), help="RTSP transport")
    p.add_argument("--fourcc", help="V4L2 pixel format to ask for, e.g. MJPG")
    p.add_argument("--capture-size", type=_size, metavar="WxH", help="V4L2 size to ask for")
    p.add_argument("--open-timeout", type=float, metavar="S", help="network open timeout (s)")
    p.add_argument("--read-timeout", type=float, metavar="S", help="reopen after S s silent")
    add_nats_options(p)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for NATS")


def register(sub: SubParsers) -> None:
    group = sub.add_parser(
        "cameras",
        help="add, update, remove and list the cameras capture runs (live, no restart)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = group.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("add", help="add a camera (capture instances of its node start it)")
    p.add_argument("id", metavar="ID", nargs="?", help="camera id (A-Z a-z 0-9 _ -)")
    p.add_argument(
        "source", metavar="SOURCE", nargs="?", help="camera index, /dev/videoN, URL, ..."
    )
    p.add_argument("--from-file", metavar="FILE", help="a CameraConfig as JSON or YAML")
    _camera_options(p, update=False)
    p.add_argument(
        "--replicas",
        type=int,
        choices=range(1, 6),
        metavar="N",
        help="JetStream replicas of the cameras bucket (3 on a cluster; like the services' "
        "jetstream_replicas): it is created so, or updated in place (default: as it is; 1 "
        "when created)",
    )
    p.set_defaults(func=_runner(_add, "cameras add", create=True))

    p = verbs.add_parser("update", help="change a camera's settings (only the options given)")
    p.add_argument("id", metavar="ID", help="camera id")
    p.add_argument("--source", help="a new source")
    _camera_options(p, update=True)
    p.set_defaults(func=_runner(_update, "cameras update", create=False))

    p = verbs.add_parser("remove", help="remove a camera (its capture stops it)")
    p.add_argument("id", metavar="ID", help="camera id")
    add_nats_options(p)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for NATS")
    p.set_defaults(func=_runner(_remove, "cameras remove", create=False))

    p = verbs.add_parser("list", help="every camera: config, state and why it is not running")
    p.add_argument("--json", action="store_true", help="JSON: [{id, config, state}]")
    add_nats_options(p)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for NATS")
    p.set_defaults(func=_runner(_list, "cameras list", create=False))
