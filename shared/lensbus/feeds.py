"""Results and events as the SDK reads them: live from their subjects, or replayed from the
publisher's durable stream (``Subjects.results_stream``) from a time or a stream sequence.

A replay is an ordered, ephemeral consumer: nothing is left on the server when it ends, and
the read-only ``client`` NATS user may create it (``lensbus.natsauth``). A
:class:`Subscription` is an async iterator that may be stepped from anywhere (the async
:class:`lensbus.Client`, the thread of :class:`lensbus.SyncClient`): a step cancelled while
it waits loses nothing, and :meth:`Subscription.aclose` ends it on the server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from nats.aio.msg import Msg
from nats.js import api

from lensbus.codec import DecodeError, decode
from lensbus.errors import LensbusError
from lensbus.schemas import Event, Result

M = TypeVar("M", Result, Event)
# Where to start a replay: a time, that long ago, or a stream sequence (1 is the first).
Since = datetime | timedelta | int
# Messages read ahead of the program. A replay's buffer is small and blocking: a slow reader
# holds the consumer back (JetStream flow control) instead of growing a backlog in memory.
# Live messages cannot wait: past LIVE_BUFFER the oldest waiting one gives way.
REPLAY_BUFFER = 256
LIVE_BUFFER = 1000


class NotStored(LensbusError):
    """What was asked for is not kept: no results stream, no such snapshot or clip."""


def replay_config(since: Since | None) -> api.ConsumerConfig:
    """The consumer that starts at ``since`` (new messages only when ``None`` or ahead of
    now). A naive
    datetime is local time, as ``datetime.now()`` gives it."""
    if since is None:
        return api.ConsumerConfig(deliver_policy=api.DeliverPolicy.NEW)
    if isinstance(since, bool) or not isinstance(since, datetime | timedelta | int):
        raise TypeError(f"since: a datetime, a timedelta or a stream sequence, not {since!r}")
    if isinstance(since, int):
        if since < 1:
            raise ValueError(f"since: stream sequences start at 1, not {since}")
        return api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=since
        )
    when = datetime.now(UTC) - since if isinstance(since, timedelta) else since.astimezone(UTC)
    if when > datetime.now(UTC):  # a start ahead of now: live from now
        return api.ConsumerConfig(deliver_policy=api.DeliverPolicy.NEW)
    return api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_TIME, opt_start_time=when)


def live_box(size: int = LIVE_BUFFER) -> tuple[asyncio.Queue[Msg], Callable[[Msg], Any]]:
    """A buffer for a live subscription and its callback, which drops the oldest waiting
    message rather than block nats-py's delivery."""
    box: asyncio.Queue[Msg] = asyncio.Queue(maxsize=size)

    async def put(msg: Msg) -> None:
        if box.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                box.get_nowait()
        box.put_nowait(msg)

    return box, put


@dataclass(frozen=True)
class Delivery(Generic[M]):
    """A message and, when replayed from the stream, where it lies there (``since=stream_seq
    + 1`` resumes after it) and when the stream took it; both ``None`` when live."""

    message: M
    stream_seq: int | None = None
    stored_at: datetime | None = None


class Subscription(Generic[M]):
    """Decoded messages of one subscription, live or replayed: an async iterator of
    :class:`Delivery`. Unreadable messages go to ``reject`` and are skipped; with
    ``follow=False`` a replay ends once caught up."""

    def __init__(
        self,
        sub: Any,
        box: asyncio.Queue[Msg],
        schema: type[M],
        reject: Callable[[Exception], None],
        *,
        stored: bool,
        follow: bool = True,
    ) -> None:
        self._sub = sub
        self._box = box
        self._schema = schema
        self._reject = reject
        self._stored = stored
        self._follow = follow
        self._done = False

    def __aiter__(self) -> Subscription[M]:
        return self

    async def __anext__(self) -> Delivery[M]:
        while not self._done:
            msg = await self._box.get()
            seq, when = None, None
            if self._stored:
                meta = msg.metadata
                seq, when = meta.sequence.stream, meta.timestamp
                if not self._follow and meta.num_pending == 0:
                    self._done = True  # caught up: this one is the last
            try:
                message = decode(msg.data, self._schema)
            except DecodeError as exc:
                self._reject(exc)
                continue
            return Delivery(message, seq, when)
        raise StopAsyncIteration

    async def caught_up_already(self) -> bool:
        """For a new replay: whether it has nothing at all to deliver (then no message will
        come to say it caught up)."""
        info = await self._sub.consumer_info()
        delivered = info.delivered.consumer_seq if info.delivered else 0
        return bool(info.num_pending == 0 and not delivered)

    async def aclose(self) -> None:
        """End it: unsubscribed (a replay's ephemeral consumer then expires on the server)."""
        self._done = True
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()


@dataclass(frozen=True)
class Snapshot:
    """An event's snapshot in the snapshots bucket (``<camera>/<capture_ns>-<seq>.jpg``)."""

    name: str
    camera: str
    size: int
    capture_ns: int | None = None
    seq: int | None = None

    @classmethod
    def of(cls, name: str, size: int) -> Snapshot:
        camera, _, rest = name.partition("/")
        ns, _, seq = rest.removesuffix(".jpg").partition("-")
        if ns.isdigit() and seq.isdigit():
            return cls(name, camera, size, int(ns), int(seq))
        return cls(name, camera, size)  # a foreign object: listed as it is
