"""The consumer SDK: read a camera's frames and results from any Python program.

::

    async with Client("nats://127.0.0.1:4222") as client:
        async for frame in client.frames("cam1"):
            print(frame.seq, frame.image.shape)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from lensbus import metrics
from lensbus.bus import connect
from lensbus.codec import DecodeError, decode
from lensbus.images import ImageError, decode_jpeg
from lensbus.logs import RateLimit, log_limited
from lensbus.schemas import FrameEnvelope, Result
from lensbus.subjects import DEFAULT_PREFIX, Subjects

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Frame:
    """A decoded frame: the BGR image and the envelope it came in."""

    image: np.ndarray
    envelope: FrameEnvelope

    @property
    def camera(self) -> str:
        return self.envelope.camera

    @property
    def seq(self) -> int:
        return self.envelope.seq

    @property
    def capture_ns(self) -> int:
        return self.envelope.capture_ns

    @property
    def jpeg(self) -> bytes:
        return self.envelope.data


class Client:
    """Reads frames and results from a lensbus installation over NATS."""

    def __init__(
        self,
        servers: str | list[str] = "nats://127.0.0.1:4222",
        *,
        prefix: str = DEFAULT_PREFIX,
        **connect_options: Any,
    ) -> None:
        self.servers = [servers] if isinstance(servers, str) else servers
        self.subjects = Subjects(prefix)
        self._options = connect_options
        self._nc: NATS | None = None
        self.rejected = 0
        self._log_limit = RateLimit()

    async def connect(self) -> None:
        self._nc = await connect(self.servers, **{"name": "lensbus-client", **self._options})

    async def close(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()
        self._nc = None

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def nc(self) -> NATS:
        if self._nc is None:
            raise RuntimeError("Client is not connected: use 'async with Client(...)'")
        return self._nc

    async def _messages(self, subject: str, newest_only: bool) -> AsyncIterator[Msg]:
        # A reader slower than the camera should see the newest frame, not a growing
        # backlog: a mailbox of one replaces the waiting message.
        box: asyncio.Queue[Msg] = asyncio.Queue(maxsize=1 if newest_only else 1000)

        async def put(msg: Msg) -> None:
            if box.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    box.get_nowait()
            box.put_nowait(msg)

        sub = await self.nc.subscribe(subject, cb=put)
        try:
            while True:
                yield await box.get()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _reject(self, exc: Exception) -> None:
        # A bad message is the producer's fault, not the program's: count it, say why once
        # a minute per reason (not once per frame), and let the program's loop go on.
        self.rejected += 1
        reason = getattr(exc, "reason", "image")
        metrics.MESSAGES_REJECTED.labels(reason).inc()
        log_limited(
            log, self._log_limit, reason, logging.WARNING, "skipped a message (%s): %s", reason, exc
        )

    async def frames(self, camera: str, *, newest_only: bool = True) -> AsyncIterator[Frame]:
        """Decoded frames of ``camera``. Unreadable messages are counted and skipped; fields
        this version does not know are ignored."""
        async for msg in self._messages(self.subjects.frames(camera), newest_only):
            try:
                env = decode(msg.data, FrameEnvelope)
                image = decode_jpeg(env.data, size=(env.width, env.height))
            except (DecodeError, ImageError) as exc:
                self._reject(exc)
                continue
            yield Frame(image=image, envelope=env)

    async def latest_frame(self, camera: str, wait_s: float = 5.0) -> Frame:
        """The next frame ``camera`` publishes (the newest there is); TimeoutError after
        ``wait_s`` seconds without one."""
        async with asyncio.timeout(wait_s):
            async for frame in self.frames(camera):
                return frame
        raise RuntimeError("frame stream ended")

    async def results(self, camera: str) -> AsyncIterator[Result]:
        """Validated results for ``camera`` (``*`` for every camera), in arrival order.
        Unreadable messages are counted and skipped; fields this version does not know are
        ignored."""
        subject = self.subjects.all_results() if camera == "*" else self.subjects.results(camera)
        async for msg in self._messages(subject, newest_only=False):
            try:
                result = decode(msg.data, Result)
            except DecodeError as exc:
                self._reject(exc)
                continue
            yield result
