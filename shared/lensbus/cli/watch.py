"""``lensbus watch CAMERA [--since 10m] [--json]``: a camera's results, replayed from the
publisher's JetStream stream and then live, one line each.

An ordered, ephemeral consumer reads the stream from the start time: nothing is left on the
server when the command ends, and a program that was offline gets what it missed (as far
back as the stream's age and size limits keep). Light on purpose: nats-py and lensbus only.

Exit codes: 0 done (interrupted, ``--count`` reached, or caught up with ``--no-follow``),
1 no results stream (no publisher ever ran on this NATS), 2 usage, 3 NATS unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from nats.aio.msg import Msg
from nats.errors import NoServersError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from lensbus.bus import connect
from lensbus.cli.common import WrongUser, add_nats_options, nats_user_options
from lensbus.codec import DecodeError, decode
from lensbus.feeds import replay_config
from lensbus.schemas import Event, Result
from lensbus.subjects import (
    DEFAULT_PREFIX,
    InvalidName,
    Subjects,
    validate_camera_id,
)

EXIT_OK = 0
EXIT_NO_STREAM = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

CLOSE_TIMEOUT_S = 5.0  # a watch that was told to stop never hangs on the way out
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``90s``, ``10m``, ``2h``, ``1d``, ``1w`` ago, or an ISO 8601 time (UTC if no zone)."""
    now = now or datetime.now(UTC)
    m = _DURATION.match(value.strip())
    if m:
        return now - timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither a duration (90s, 10m, 2h, 1d, 1w) nor an ISO 8601 time"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _camera(value: str) -> str:
    if value == "*":
        return value
    try:
        return validate_camera_id(value)
    except InvalidName as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def as_json(message: Result | Event) -> dict[str, Any]:
    if isinstance(message, Result):
        out = message.model_dump(mode="json", exclude={"mask_png"})
        out["latency_s"] = round(message.latency_s, 6)
        return out
    return message.model_dump(mode="json")


def as_text(message: Result | Event) -> str:
    when = datetime.fromtimestamp(message.capture_ns / 1e9).astimezone().strftime("%H:%M:%S.%f")
    head = f"{when[:-3]} {message.camera} #{message.seq}"
    if isinstance(message, Event):
        what = f"{message.rule}: {message.label} {message.score:.2f}"
        return f"{head} EVENT {what} {message.snapshot}"
    items = [(d.label, d.score) for d in message.detections] + [
        (c.label, c.score) for c in message.classes[:3]
    ]
    items += [(s.label, s.area) for s in message.segments]
    labels = ", ".join(f"{label} {score:.2f}" for label, score in items) or "-"
    model = f"{message.model.name}:{message.model.version}"
    return f"{head} {model} {message.latency_s * 1000:.0f} ms  {labels}"


def _subject(prefix: str, camera: str, events: bool) -> str:
    subjects = Subjects(prefix)
    if events:
        return subjects.all_events() if camera == "*" else subjects.events(camera)
    return subjects.all_results() if camera == "*" else subjects.results(camera)


@contextlib.contextmanager
def _signals_end(done: asyncio.Event) -> Iterator[None]:
    """Ctrl-C or SIGTERM ends the watch like --count does: unsubscribe, close, exit 0.  (As a
    cancellation it could land inside nats-py's message handling and leave close() waiting.)"""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, done.set)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


@dataclass
class _Printer:
    """Prints each message as it comes and says when the watch is done."""

    schema: type[Result] | type[Event]
    json_lines: bool
    follow: bool
    count: int | None
    out: TextIO
    done: asyncio.Event = field(default_factory=asyncio.Event)
    printed: int = 0
    rejected: int = 0

    async def on_msg(self, msg: Msg) -> None:
        if self.done.is_set():  # already finished: what is still buffered is not wanted
            return
        try:
            message = decode(msg.data, self.schema)
        except DecodeError:
            self.rejected += 1
        else:
            line = json.dumps(as_json(message)) if self.json_lines else as_text(message)
            print(line, file=self.out, flush=True)
            self.printed += 1
        if self.count is not None and self.printed >= self.count:
            self.done.set()
        elif not self.follow and msg.metadata.num_pending == 0:
            self.done.set()


async def _follow(
    js: JetStreamContext, stream: str, subject: str, since: datetime | None, p: _Printer
) -> None:
    sub = await js.subscribe(
        subject,
        stream=stream,
        cb=p.on_msg,
        ordered_consumer=True,
        config=replay_config(since),
    )
    if not p.follow:
        # Nothing to replay at all: no message will come to say we caught up.
        info = await sub.consumer_info()
        delivered = info.delivered.consumer_seq if info.delivered else 0
        if info.num_pending == 0 and not delivered:
            p.done.set()
    await p.done.wait()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(sub.unsubscribe(), CLOSE_TIMEOUT_S)


async def watch(
    servers: list[str],
    camera: str,
    since: datetime | None,
    *,
    prefix: str = DEFAULT_PREFIX,
    events: bool = False,
    json_lines: bool = False,
    follow: bool = True,
    count: int | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    user: dict[str, Any] | None = None,
) -> int:
    try:
        # Reconnect forever once connected (a watch runs for hours); but the first
        # connection must fail fast, and nats-py would retry that one forever too.
        nc = await connect(
            servers, name="lensbus-watch", timeout_s=5.0, connect_timeout=2, **(user or {})
        )
    except (NoServersError, OSError, TimeoutError) as exc:
        print(
            f"lensbus watch: cannot reach NATS at {','.join(servers)} ({type(exc).__name__}): "
            "is nats-server running? Point to it with --nats-url or LENSBUS_NATS_URL",
            file=err,
        )
        return EXIT_UNREACHABLE
    printer = _Printer(Event if events else Result, json_lines, follow, count, out)
    try:
        with _signals_end(printer.done):
            js, stream = nc.jetstream(), Subjects(prefix).results_stream
            try:
                await js.stream_info(stream)
            except NotFoundError:
                print(
                    f"lensbus watch: no stream {stream} on this NATS (does a publisher run?)",
                    file=err,
                )
                return EXIT_NO_STREAM
            await _follow(js, stream, _subject(prefix, camera, events), since, printer)
    finally:
        if printer.rejected:
            print(f"lensbus watch: skipped {printer.rejected} unreadable messages", file=err)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT_S)
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    servers = [u.strip() for u in args.nats_url.split(",") if u.strip()]
    try:
        # The read-only client (its nkey and CA from --secrets), unless told otherwise.
        user = nats_user_options(args, "client")
    except WrongUser as exc:
        print(f"lensbus watch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(
            watch(
                servers,
                args.camera,
                args.since,
                prefix=args.prefix,
                events=args.events,
                json_lines=args.json,
                follow=not args.no_follow,
                count=args.count,
                user=user,
            )
        )
    except KeyboardInterrupt:
        return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "watch",
        help="print a camera's results (replayed from --since, then live)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("camera", type=_camera, metavar="CAMERA", help="camera id, or '*' for all")
    p.add_argument(
        "--since",
        type=parse_since,
        default=None,
        help="replay from this long ago (90s, 10m, 2h, 1d) or this ISO time; default: live only",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--events", action="store_true", help="the events rules raised, not results")
    p.add_argument(
        "--no-follow", action="store_true", help="stop once caught up instead of going live"
    )
    p.add_argument("--count", type=int, default=None, help="stop after this many messages")
    add_nats_options(p)
    p.set_defaults(func=_run)
