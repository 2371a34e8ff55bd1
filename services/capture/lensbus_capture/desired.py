"""Cameras as desired state: follow the KV bucket ``lensbus-cameras`` and report back.

With ``cameras_from`` ``bucket`` or ``both``, :func:`follow` runs beside the cameras:

* it watches the ``camera.*`` keys (initial values, then each change) through
  :meth:`lensbus.cameras.CamerasBucket.views`, keeps the cameras whose ``node`` is this
  instance's ``node`` setting, and hands the whole set to :meth:`Cameras.apply`, which starts,
  restarts and stops readers without disturbing the cameras whose config did not change;
* ``both`` adds the camera of this instance's own settings (``LENSBUS_CAPTURE_CAMERA`` and
  friends). It starts at once, before the bucket answers, and it wins an id clash: the
  bucket's config of that id is ignored (logged once per change of it, counted, and said in
  that camera's ``state.<id>`` reason) because a capture's own settings are the more
  deliberate choice (a deployment file), and a bucket entry must not silently replace them;
* it writes each camera's :class:`CameraState` to ``state.<id>`` when the camera reports a
  new one (``Cameras.on_state``), rewrites them all after a NATS reconnect, and
  deletes ``state.<id>`` of a camera removed from the bucket (only if this instance wrote
  it last: a camera moved to another node keeps what its new runner wrote). On a clean stop
  its cameras are marked ``stopped``: they are still wanted, but nobody runs them.

While NATS or JetStream is away the running cameras keep running as they are; the next view
(after the reconnect) replaces the desired set wholesale, so a removal missed meanwhile is
not missed for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from prometheus_client import Counter, Gauge

from lensbus.cameras import CamerasBucket, View
from lensbus.runtime import Runtime
from lensbus.schemas.camera import CameraConfig, CameraState
from lensbus.waiting import sleep_unless_stopped, wait_unless_stopped
from lensbus_capture.config import CaptureSettings

log = logging.getLogger(__name__)

# A state write that failed (NATS away) is tried again after this.
STATE_POLL_S = 0.5
# JetStream API calls (bind, watch, put) give up after this; the watch then retries.
JS_TIMEOUT_S = 5.0
# The last states written on a clean stop must not hold the stop up for long.
FINAL_WRITE_S = 2.0

DESIRED_CAMERAS = Gauge(
    "lensbus_capture_desired_cameras", "Cameras this instance should run (bucket + settings)"
)
DESIRED_APPLIES = Counter(
    "lensbus_capture_desired_applies_total", "Desired camera sets handed to the cameras"
)
DESIRED_IGNORED = Counter(
    "lensbus_capture_desired_ignored_total",
    "Bucket camera configs ignored, by reason (clash: the settings camera has the id)",
    ["reason"],
)
STATE_WRITES = Counter(
    "lensbus_capture_state_writes_total", "Camera states written to the bucket", ["outcome"]
)
BUCKET_UP = Gauge(
    "lensbus_capture_cameras_bucket_up", "1 while the cameras bucket's watch is current"
)


class CameraSet(Protocol):
    """What :func:`follow` needs of capture's ``Cameras``."""

    on_state: Callable[[CameraState], None]

    async def apply(self, configs: Mapping[str, CameraConfig]) -> None: ...

    def states(self) -> dict[str, CameraState]: ...


class Desired:
    """The desired set from a bucket view and the settings, and the clash it may hold."""

    def __init__(self, settings: CaptureSettings) -> None:
        self.node = settings.node
        self.own = settings.camera_config() if settings.cameras_from == "both" else None
        self.clash: CameraConfig | None = None  # the bucket's config the settings override

    def configs(self, view: View | None) -> dict[str, CameraConfig]:
        bucket = {} if view is None else view.configs
        mine = {cid: c for cid, c in bucket.items() if c.node == self.node}
        clash = None
        if self.own is not None:
            clash = bucket.get(self.own.id)
            mine[self.own.id] = self.own
        if clash is not None and clash != self.clash:
            DESIRED_IGNORED.labels("clash").inc()
            log.warning(
                "the cameras bucket has camera %s (source %s); this capture's own settings "
                "define it too (cameras_from=both) and win: the bucket's is ignored",
                clash.id,
                clash.source,
            )
        self.clash = clash
        return mine

    def annotate(self, state: CameraState) -> CameraState:
        """``state`` with the clash said in its reason, where it has one."""
        if self.clash is None or state.camera != self.clash.id:
            return state
        note = (
            f"the bucket's camera.{state.camera} is ignored: capture {state.instance}'s own "
            "settings define this camera (cameras_from=both)"
        )
        return state.model_copy(
            update={"reason": f"{state.reason}; {note}" if state.reason else note}
        )


class StateWriter:
    """Writes the cameras' states to the bucket when they change."""

    def __init__(self, bucket: CamerasBucket, instance: str, desired: Desired) -> None:
        self.bucket = bucket
        self.instance = instance
        self.desired = desired
        self.written: dict[str, CameraState] = {}
        self.lock = asyncio.Lock()

    def forget(self) -> None:
        """Rewrite everything at the next :meth:`write` (after a reconnect)."""
        self.written.clear()

    async def write(self, states: Mapping[str, CameraState]) -> None:
        async with self.lock:  # a state cleared meanwhile must not be written back
            await self._write(states)

    async def _write(self, states: Mapping[str, CameraState]) -> None:
        for camera, raw in states.items():
            state = self.desired.annotate(raw)
            if self.written.get(camera) == state:
                continue
            try:
                await self.bucket.put_state(state)
            except Exception as exc:  # NATS away: rewritten at the next poll
                STATE_WRITES.labels("failed").inc()
                log.debug("state of %s not written: %s", camera, exc)
                continue
            STATE_WRITES.labels("ok").inc()
            self.written[camera] = state

    async def clear(self, cameras: set[str]) -> None:
        async with self.lock:
            await self._clear(cameras)

    async def _clear(self, cameras: set[str]) -> None:
        for camera in cameras:
            self.written.pop(camera, None)
            with contextlib.suppress(Exception):  # best effort: a stale state is only a note
                await self.bucket.clear_state(camera, self.instance)

    async def stopped(self, cameras: set[str]) -> None:
        now = time.time_ns()
        for camera in cameras:
            last = self.written.get(camera)
            state = CameraState(
                camera=camera,
                state="stopped",
                reason=f"capture {self.instance} stopped",
                instance=self.instance,
                node=self.desired.node,
                since_ns=now,
                frames=last.frames if last else 0,
            )
            with contextlib.suppress(Exception):
                await self.bucket.put_state(state)


class Follower:
    """One capture instance's side of the bucket: desired set in, states out."""

    def __init__(self, rt: Runtime, settings: CaptureSettings, cameras: CameraSet) -> None:
        self.rt = rt
        self.cameras = cameras
        self.desired = Desired(settings)
        js = rt.nc.jetstream(timeout=JS_TIMEOUT_S)
        self.bucket = CamerasBucket(
            js, bucket=rt.subjects.cameras_bucket, replicas=settings.jetstream_replicas
        )
        self.writer = StateWriter(self.bucket, settings.instance, self.desired)
        self.running: dict[str, CameraConfig] = {}
        self.done = asyncio.Event()
        self.changed = asyncio.Event()  # a camera entered a new state: write it now
        listener = cameras.on_state

        def on_state(state: CameraState) -> None:  # called on the event loop, by its camera
            self.changed.set()
            listener(state)

        cameras.on_state = on_state

    async def apply(self, view: View | None) -> None:
        wanted = self.desired.configs(view)
        if wanted == self.running:
            return
        # Removed from the bucket (not only from this node): its state goes too.
        gone = set() if view is None else set(self.running) - set(wanted) - set(view.configs)
        self.running = wanted  # first: the new cameras' first states are written at once
        await self.cameras.apply(wanted)
        DESIRED_APPLIES.inc()
        DESIRED_CAMERAS.set(len(wanted))
        await self.writer.clear(gone)

    async def run(self) -> None:
        if self.desired.own is not None:
            await self.apply(None)  # the settings camera does not wait for the bucket
        states = asyncio.create_task(self.write_states(), name="camera-states")
        try:
            async for view in self.bucket.views(self.rt.stop, states=False):
                BUCKET_UP.set(1)
                await self.apply(view)
        finally:
            BUCKET_UP.set(0)
            self.done.set()
            self.changed.set()
            await states
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.stopped(set(self.running)), FINAL_WRITE_S)

    async def write_states(self) -> None:
        """The running cameras' states, where they differ from what was written: at once
        when a camera reports a new state, else every :data:`STATE_POLL_S` (which retries
        the writes that failed, and rewrites everything after a reconnect)."""
        nc = self.rt.nc
        reconnects = nc.stats.get("reconnects", 0)
        while not self.done.is_set():
            await sleep_unless_stopped(self.changed, STATE_POLL_S)  # a new state cuts it short
            self.changed.clear()
            if self.done.is_set() or not nc.is_connected:
                continue
            if nc.stats.get("reconnects", 0) != reconnects:
                reconnects = nc.stats.get("reconnects", 0)
                self.writer.forget()  # written before the reconnect, perhaps lost with it
            states = {c: s for c, s in self.cameras.states().items() if c in self.running}
            await wait_unless_stopped(self.done, self.writer.write(states))


async def follow(rt: Runtime, settings: CaptureSettings, cameras: CameraSet) -> None:
    """Keep ``cameras`` equal to the desired set and the bucket's states current, until
    ``rt.stop``."""
    await Follower(rt, settings, cameras).run()
