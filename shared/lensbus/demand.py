"""Frames made only for someone: consumers of a camera's device stream say they are there.

With a model stream (``model_height``), inference reads the small copy, and the full-size
device stream is for people and programs: the page, the project stream, clip buffers, event
snapshots, a project's handler, an SDK or raw subscriber. Encoding it costs capture most of
its CPU (a 1080p JPEG is ~5 ms a frame), so with ``device_stream: on_demand`` (the default)
capture encodes every frame of it only while a consumer says it is there, and otherwise an
idle frame now and then (``idle_fps``, 1 a second) so that a plain subscriber, the page's
camera list and a snapshot still see the camera.

A consumer says so by publishing on ``<prefix>.want.frames.<camera>`` (one message per
camera it reads) at least every :data:`RENEW_S` seconds. An empty message holds for
:data:`WANT_FOR_S` seconds: ``nats pub lensbus.want.frames.cam1 ""`` from any language. A
:class:`~lensbus.schemas.FramesWanted` says for how long and by whom.

- :class:`Leases`: capture's side, which camera is wanted until when.
- :class:`Wanter`: a consumer's side, a task that says it for the cameras it reads (the
  publisher, a project's host and ``Client.frames`` run one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from lensbus.codec import decode, encode
from lensbus.schemas import FramesWanted
from lensbus.subjects import Subjects

log = logging.getLogger(__name__)

WANT_FOR_S = FramesWanted.model_fields["for_s"].default  # an empty message holds this long
RENEW_S = WANT_FOR_S / 3  # how often a Wanter says it again (two may be lost)
LOOK_S = 0.25  # how often a Wanter looks for a camera newly wanted


def parse_want(data: bytes) -> FramesWanted:
    """What a message on ``want.frames.<camera>`` says; raises
    :class:`lensbus.errors.DecodeError`."""
    return FramesWanted() if not data else decode(data, FramesWanted)


class Leases:
    """Until when each camera's device stream is wanted (monotonic seconds)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.until: dict[str, float] = {}

    def grant(self, camera: str, for_s: float) -> bool:
        """Record a want; True when the camera was not wanted until now."""
        now = self.clock()
        was = self.wanted(camera)
        self.until[camera] = max(self.until.get(camera, 0.0), now + for_s)
        return not was

    def wanted(self, camera: str) -> bool:
        return self.until.get(camera, 0.0) > self.clock()


class Wanter:
    """Says every :data:`RENEW_S` that ``cameras()`` are wanted, and within :data:`LOOK_S`
    for a camera that joins them (a viewer arrived: capture goes to every frame at once
    instead of within seconds). ``cameras`` is called on the event loop; keep it cheap."""

    def __init__(
        self, nc: Any, subjects: Subjects, cameras: Callable[[], Iterable[str]], by: str
    ) -> None:
        self.nc, self.subjects, self.cameras = nc, subjects, cameras
        self.body = encode(FramesWanted(by=by[:128]))
        self._task: asyncio.Task[None] | None = None
        self.said = 0

    def start(self) -> Wanter:
        self._task = asyncio.create_task(self._run(), name="want-frames")
        return self

    async def say(self, cameras: Iterable[str]) -> None:
        for camera in sorted(cameras):
            try:
                await self.nc.publish(self.subjects.frames_wanted(camera), self.body)
                self.said += 1
            except Exception as exc:  # NATS away: said again at the next round
                log.debug("want frames of %s: %s", camera, exc)

    async def _run(self) -> None:
        told: set[str] = set()
        renew_at = 0.0
        while True:
            now = time.monotonic()
            wanted = set(self.cameras())
            if now >= renew_at:
                await self.say(wanted)
                renew_at = now + RENEW_S
            elif wanted - told:
                await self.say(wanted - told)
            told = wanted
            await asyncio.sleep(LOOK_S)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
