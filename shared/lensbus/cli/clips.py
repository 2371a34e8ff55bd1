"""``lensbus clips list [--camera C] [--json]`` and ``lensbus clips export ID --out clip.avi``:
the clips the publisher keeps around events, in the object store ``lensbus-clips``.

``export`` writes the clip as stored (an MJPEG AVI: the camera's JPEGs, untouched) for
``.avi``, or re-encodes it with OpenCV's ``mp4v`` for ``.mp4`` (the wheels have no H.264).

Exit codes: 0 done, 1 no such clip (or no clips store), 2 usage, 3 NATS unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path

from nats.aio.client import Client as NATS
from nats.errors import NoServersError
from nats.js.errors import BucketNotFoundError
from nats.js.object_store import ObjectStore

from lensbus.bus import connect
from lensbus.cli.common import add_nats_options, checked, nats_user_options
from lensbus.clips import ClipError, export, list_clips, read_clip
from lensbus.schemas import ClipInfo, parse_clip_id
from lensbus.subjects import Subjects, validate_camera_id

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class Unreachable(Exception):
    pass


def _clip_id(value: str) -> str:
    parse_clip_id(value)
    return value


async def _store(args: argparse.Namespace) -> tuple[NATS, ObjectStore | None]:
    url = args.nats_url
    try:
        # The read-only client from --secrets, unless the URL names a user.
        user = nats_user_options(args, "client")
        nc = await connect(url, name="lensbus-clips", reconnect=False, timeout_s=5.0, **user)
    except (NoServersError, OSError, TimeoutError) as exc:
        raise Unreachable(f"NATS at {url} unreachable: {exc}") from None
    try:
        return nc, await nc.jetstream().object_store(Subjects(args.prefix).clips_bucket)
    except BucketNotFoundError:
        return nc, None


def _line(c: ClipInfo) -> str:
    when = datetime.fromtimestamp(c.event_capture_ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S")
    span = (c.end_ns - c.start_ns) / 1e9
    return (
        f"{c.id:<44} {when}Z  {c.rule}: {c.label}  {c.frames} frames, {span:.1f} s, "
        f"{c.width}x{c.height} ({c.ended})"
    )


async def _list(args: argparse.Namespace) -> int:
    nc, store = await _store(args)
    try:
        clips = [] if store is None else await list_clips(store, args.camera)
    finally:
        await nc.close()
    if args.json:
        for c in clips:
            print(c.model_dump_json())
    elif not clips:
        print("no clips" + (f" of {args.camera}" if args.camera else ""), file=sys.stderr)
    else:
        for c in clips:
            print(_line(c))
    return EXIT_OK


async def _export(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.suffix.lower() not in (".avi", ".mp4"):
        print(f"lensbus clips: --out {out}: use .avi or .mp4", file=sys.stderr)
        return EXIT_USAGE
    nc, store = await _store(args)
    try:
        if store is None:
            bucket = Subjects(args.prefix).clips_bucket
            print(f"lensbus clips: no clips store ({bucket}) on NATS", file=sys.stderr)
            return EXIT_FAILED
        info, data = await read_clip(store, args.id)
    except ClipError as exc:
        print(f"lensbus clips: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        await nc.close()
    try:
        frames = await asyncio.to_thread(export, data, out)
    except ClipError as exc:
        print(f"lensbus clips: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{out}: {frames} frames, {info.fps:.2f} fps, {info.width}x{info.height}")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    verb = _list if args.verb == "list" else _export
    try:
        return asyncio.run(verb(args))
    except Unreachable as exc:
        print(f"lensbus clips: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("clips", help="list and export the clips kept around events")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    ls = verbs.add_parser("list", help="the kept clips, oldest first")
    ls.add_argument("--camera", type=checked(validate_camera_id), help="only this camera's")
    ls.add_argument("--json", action="store_true", help="one JSON object per line (ClipInfo)")
    ex = verbs.add_parser("export", help="write a clip as a playable file")
    ex.add_argument("id", type=checked(_clip_id), help="clip id (<camera>-<capture_ns>-<seq>)")
    ex.add_argument("--out", type=Path, required=True, help="file to write: .avi or .mp4")
    for parser in (ls, ex):
        add_nats_options(parser)
        parser.set_defaults(func=_run)
