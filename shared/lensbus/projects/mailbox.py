"""The results waiting for a project's handler, the frames waiting for their results (both
used on the host's event loop), and the newest frame waiting for a DeepLens function.

Before "go" every result is held (up to :data:`HOLD_LIMIT` per camera): a new version started
beside the old one must not handle what the old one still handles, nor lose what arrives in
between. "go" releases the held results, less those of each camera in its ``after`` with a
seq at or below it (the old version handled them: skipped, not counted as dropped); that
backlog is handled whole. Beside it each camera keeps at most ``size`` newer results; a
handler that is behind gets the newest, the oldest are dropped and counted. Cameras take
turns (round robin), so a busy camera cannot starve a quiet one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from lensbus.schemas.frame import FrameEnvelope
from lensbus.schemas.project import ProjectManifest
from lensbus.subjects import Subjects

# Results held per camera before "go": a start of a few seconds at 30 fps, with room.
HOLD_LIMIT = 1024
# Frames kept per camera to meet their results (about two seconds at 30 fps).
FRAME_RING = 64
# How long after "go" a result at or below the old version's last seq is still taken for one
# it handled (delivered to the old host before its stop, to this one a little later). Past it
# nothing is skipped: a capture restarted since numbers its frames from 0 again.
AFTER_WINDOW_S = 2.0


class Item(Protocol):
    @property
    def camera(self) -> str: ...

    @property
    def seq(self) -> int: ...


T = TypeVar("T", bound=Item)


class Mailbox(Generic[T]):
    """Per-camera queues of results; ``put`` from the subscription, ``take`` by the handler."""

    def __init__(self, size: int, hold_limit: int = HOLD_LIMIT) -> None:
        if size < 1 or hold_limit < 1:
            raise ValueError("a mailbox holds at least one result per camera")
        self.size = size
        self.hold_limit = hold_limit
        self.going = False
        self.dropped = 0
        self.skipped = 0
        self._after: dict[str, int] = {}
        self._after_until = 0.0
        self._queues: dict[str, deque[T]] = {}
        self._held: dict[str, int] = {}  # per camera: results held at "go", not yet taken
        self._turn = 0

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def put(self, item: T) -> None:
        """A result arrived: held before "go", queued after (the oldest dropped when full)."""
        if self._skip(item):
            return
        queue = self._queues.setdefault(item.camera, deque())
        held = self._held.get(item.camera, 0)
        limit = self.size + held if self.going else self.hold_limit
        while len(queue) >= limit:
            del queue[held]  # the oldest since "go": the hand-over's backlog is never dropped
            self.dropped += 1
        queue.append(item)

    def go(self, after: dict[str, int] | None) -> None:
        """Start handling: the held results of each camera in ``after`` with a greater seq,
        of the others all of them. The held backlog is kept whole (a swap's hand-over must
        not skip a result, even when a new one arrives before it is handled); later
        arrivals are kept to ``size`` beside it."""
        self.going = True
        self._after = dict(after or {})
        self._after_until = time.monotonic() + AFTER_WINDOW_S
        for camera, queue in self._queues.items():
            kept = deque(item for item in queue if not self._skip(item))
            self._queues[camera] = kept
            self._held[camera] = len(kept)

    def _skip(self, item: T) -> bool:
        """True for a result the old version handled. A camera leaves ``after`` at its first
        newer result or AFTER_WINDOW_S after "go", so a camera whose seq starts again from 0
        later is not skipped."""
        if not self.going:
            return False
        if self._after and time.monotonic() > self._after_until:
            self._after.clear()
        last = self._after.get(item.camera)
        if last is None:
            return False
        if item.seq <= last:
            self.skipped += 1
            return True
        del self._after[item.camera]
        return False

    def take(self) -> T | None:
        """The next result to handle (cameras in turn); None when nothing waits or before
        "go"."""
        if not self.going:
            return None
        cameras = list(self._queues)
        for i in range(len(cameras)):
            index = (self._turn + i) % len(cameras)
            queue = self._queues[cameras[index]]
            if queue:
                self._turn = index + 1
                if self._held.get(cameras[index]):
                    self._held[cameras[index]] -= 1
                return queue.popleft()
        return None

    def retain(self, cameras: Iterable[str] | None) -> int:
        """Forget the results of cameras no longer handled (None: all are); how many went."""
        if cameras is None:
            return 0
        keep = set(cameras)
        gone = 0
        for camera in [c for c in self._queues if c not in keep]:
            gone += len(self._queues.pop(camera))
            self._held.pop(camera, None)
        return gone


class FrameRing:
    """The last :data:`FRAME_RING` frames of each camera, to meet their results (on the loop)."""

    def __init__(self, size: int = FRAME_RING) -> None:
        self.size = size
        self._frames: dict[str, OrderedDict[int, FrameEnvelope]] = {}
        self._waiters: dict[tuple[str, int], asyncio.Future[FrameEnvelope]] = {}

    def add(self, frame: FrameEnvelope) -> None:
        ring = self._frames.setdefault(frame.camera, OrderedDict())
        ring[frame.seq] = frame
        while len(ring) > self.size:
            ring.popitem(last=False)
        waiter = self._waiters.pop((frame.camera, frame.seq), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(frame)

    def newest(self, camera: str) -> FrameEnvelope | None:
        ring = self._frames.get(camera)
        return next(reversed(ring.values())) if ring else None

    async def wait(self, camera: str, seq: int, timeout_s: float) -> FrameEnvelope | None:
        """The frame ``seq`` of ``camera``, waiting up to ``timeout_s`` for it; None if not."""
        ring = self._frames.get(camera)
        frame = ring.get(seq) if ring is not None else None
        if frame is not None:
            return frame
        waiter = self._waiters.setdefault((camera, seq), asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        except TimeoutError:
            return None
        finally:
            self._waiters.pop((camera, seq), None)


class DeeplensBridge:
    """What a DeepLens function is given (:class:`lensbus.projects.deeplens.Bridge`): the
    newest frame of its camera (the first wanted camera that sends one; DeepLens had one),
    and the host's outbox. ``offer`` is called on the loop, the rest from the function's
    threads."""

    def __init__(
        self,
        manifest: ProjectManifest,
        subjects: Subjects,
        models_dir: str,
        send: Callable[[str, bytes], None],
    ) -> None:
        self.project = manifest.name
        self.version = manifest.version
        self.subjects = subjects
        self.models_dir = models_dir
        self.publish = send
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._camera: str | None = None
        self._newest: FrameEnvelope | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def stopping(self) -> bool:
        return self._stopping

    def offer(self, frame: FrameEnvelope) -> None:
        with self._cond:
            if self._camera is None:
                self._camera = frame.camera
            if frame.camera == self._camera:
                self._newest = frame
                self._cond.notify_all()

    def newest_frame(self, after_seq: int, timeout_s: float) -> FrameEnvelope | None:
        with self._cond:
            self._cond.wait_for(
                lambda: self._stopping or (self._newest and self._newest.seq > after_seq),
                timeout_s,
            )
            newest = self._newest
            if self._stopping or newest is None or newest.seq <= after_seq:
                return None
            return newest

    def start(self, script: Path, done: Callable[[], None]) -> None:
        """Run the function in a thread of its own; ``done`` (thread-safe) when it ends."""
        from lensbus.projects.deeplens import run_function

        def run() -> None:
            try:
                run_function(script, self)
            except BaseException as exc:  # the function's own failure: the host reports it
                self.error = exc
            finally:
                done()

        self._thread = threading.Thread(target=run, name="deeplens", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """Tell the function to stop (its next frame read ends it) and wait for it (bounded)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def beat(self) -> tuple[int, int, dict[str, int]]:
        """(frames handed to it, frames it skipped, the last seq per camera)."""
        from lensbus.projects.deeplens import runtime

        s = runtime.STATE
        return s.frames, s.skipped, ({s.camera: s.seq} if s.camera else {})
