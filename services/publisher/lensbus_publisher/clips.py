"""Clips around events: a rolling pre-event buffer per camera, the clips being recorded, and
the task that writes finished clips to the object store ``lensbus-clips``.

Only cameras some rule watches are buffered. The buffer keeps ``clip_pre_s`` plus
:data:`LATE_RESULT_S` of frames (a rule fires when the frame's *result* arrives, after the
frame), at most ``clip_buffer_bytes`` (oldest dropped first). When an event is raised, a
recording starts with the buffered frames from ``clip_pre_s`` before the event's frame and
takes the frames that come until ``clip_post_s`` after it; it ends when a later frame
arrives, or when the camera sends nothing for :data:`FRAMES_STOPPED_S` past its end.

Overlapping events on one camera get one clip each: a clip is named by its event
(``clip_id``), so an event's clip can be found from the event alone; the frames they share are
the same ``bytes`` in memory (stored twice). With the default cooldown (60 s) and clips of
10 s they seldom overlap; at most :data:`MAX_RECORDINGS` are recorded per camera at once.

Everything here but :meth:`Clips.run` runs on the event loop and only moves references;
the AVI is assembled in a worker thread, the store's I/O is nats-py's (asynchronous).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from lensbus.clips import ClipError, avi_bytes, put_clip, span_fps
from lensbus.logs import RateLimit, log_limited
from lensbus.runtime import Runtime
from lensbus.schemas import ClipInfo, Event, clip_id
from lensbus.schemas.event import ClipEnd
from lensbus_publisher import metrics
from lensbus_publisher.camera import FrameItem
from lensbus_publisher.config import PublisherSettings
from lensbus_publisher.durable import Durable

log = logging.getLogger(__name__)

LATE_RESULT_S = 2.0  # results (and so events) come up to about this long after their frame
FRAMES_STOPPED_S = 2.0  # a recording past its end with no frame for this long ends as it is
MAX_RECORDINGS = 4  # clips recorded at once per camera
CLIP_QUEUE = 4  # finished clips waiting to be written
STATES_KEPT = 512  # clip states remembered for the page
TICK_S = 0.5


class FrameBuffer:
    """A camera's recent frames: at most ``keep_s`` of capture time and ``max_bytes``."""

    def __init__(self, keep_s: float, max_bytes: int) -> None:
        self.keep_ns = int(keep_s * 1e9)
        self.max_bytes = max_bytes
        self.frames: deque[FrameItem] = deque()
        self.bytes = 0
        self.dropped = 0  # pushed out by the byte bound before their time was up

    def add(self, item: FrameItem) -> None:
        if self.frames and item.seq <= self.frames[-1].seq:  # capture restarted
            self.frames.clear()
            self.bytes = 0
        self.frames.append(item)
        self.bytes += len(item.jpeg)
        while self.frames and (
            self.bytes > self.max_bytes
            or item.capture_ns - self.frames[0].capture_ns > self.keep_ns
        ):
            old = self.frames.popleft()
            self.bytes -= len(old.jpeg)
            if item.capture_ns - old.capture_ns <= self.keep_ns:
                self.dropped += 1

    def between(self, start_ns: int, end_ns: int) -> list[FrameItem]:
        return [f for f in self.frames if start_ns <= f.capture_ns <= end_ns]


@dataclass
class Recording:
    """A clip being recorded: the frames from ``start_ns`` to ``end_ns`` (capture time)."""

    event: Event
    start_ns: int
    end_ns: int
    max_bytes: int
    deadline: float  # time.monotonic() after which it ends with what it has
    frames: list[FrameItem] = field(default_factory=list)
    bytes: int = 0
    ended: ClipEnd | None = None

    @property
    def id(self) -> str:
        return clip_id(self.event.camera, self.event.seq, self.event.capture_ns)

    def offer(self, item: FrameItem) -> bool:
        """Take a frame if it belongs; True once the recording has ended."""
        if item.capture_ns > self.end_ns:
            self.ended = "complete"
        elif item.capture_ns >= self.start_ns:
            if self.bytes + len(item.jpeg) > self.max_bytes:
                self.ended = "max_bytes"
            else:
                self.frames.append(item)
                self.bytes += len(item.jpeg)
        return self.ended is not None

    def info(self, pre_s: float, post_s: float) -> ClipInfo:
        first, last = self.frames[0], self.frames[-1]
        return ClipInfo(
            id=self.id,
            camera=self.event.camera,
            rule=self.event.rule,
            label=self.event.label,
            event_seq=self.event.seq,
            event_capture_ns=self.event.capture_ns,
            start_ns=first.capture_ns,
            end_ns=last.capture_ns,
            frames=len(self.frames),
            fps=span_fps(first.capture_ns, last.capture_ns, len(self.frames), 1.0),
            width=first.width,
            height=first.height,
            pre_s=pre_s,
            post_s=post_s,
            ended=self.ended or "frames_stopped",
        )


def build(rec: Recording, pre_s: float, post_s: float, bucket: str) -> tuple[ClipInfo, bytes]:
    """The clip's description and AVI (in a worker thread: a copy of every JPEG)."""
    info = rec.info(pre_s, post_s).model_copy(update={"bucket": bucket})
    return info, avi_bytes([f.jpeg for f in rec.frames], info.width, info.height, info.fps)


class Clips:
    def __init__(self, settings: PublisherSettings, rt: Runtime, durable: Durable) -> None:
        self.s = settings
        self.rt = rt
        self.durable = durable
        self.buffers: dict[str, FrameBuffer] = {}
        self.recordings: dict[str, list[Recording]] = {}
        self.queue: asyncio.Queue[Recording] = asyncio.Queue(maxsize=CLIP_QUEUE)
        self.states: OrderedDict[str, str] = OrderedDict()  # clip id -> state, for the page
        self.kept = 0
        self._all = any(not r.cameras for r in settings.rules)
        self._watched = frozenset(c for r in settings.rules for c in r.cameras)
        self._limit = RateLimit(60.0)

    def forget(self, camera: str) -> None:
        """Free a camera's pre-event buffer (the hub forgot the camera: it went silent)."""
        if self.buffers.pop(camera, None) is not None:
            with contextlib.suppress(KeyError):
                metrics.CLIP_BUFFER_BYTES.remove(camera)

    def watches(self, camera: str) -> bool:
        return self._all or camera in self._watched

    def _state(self, clip: str, state: str) -> None:
        self.states[clip] = state
        self.states.move_to_end(clip)
        while len(self.states) > STATES_KEPT:
            self.states.popitem(last=False)

    def _drop(self, clip: str, reason: str, detail: object = "") -> None:
        metrics.CLIPS_DROPPED.labels(reason).inc()
        self._state(clip, f"dropped: {reason}")
        log_limited(
            log,
            self._limit,
            f"clip:{reason}",
            logging.WARNING,
            "clip %s dropped (%s) %s",
            clip,
            reason,
            detail,
        )

    def _held(self) -> None:
        held = sum(r.bytes for recs in self.recordings.values() for r in recs)
        metrics.CLIP_RECORDING_BYTES.set(held)

    # ---- on the event loop -------------------------------------------------------------

    def on_frame(self, camera: str, item: FrameItem) -> None:
        """File a frame in the camera's buffer and the clips recording it."""
        if not self.watches(camera):
            return
        buf = self.buffers.get(camera)
        if buf is None:
            keep = self.s.clip_pre_s + LATE_RESULT_S
            buf = self.buffers[camera] = FrameBuffer(keep, self.s.clip_buffer_bytes)
        buf.add(item)
        metrics.CLIP_BUFFER_BYTES.labels(camera).set(buf.bytes)
        recs = self.recordings.get(camera)
        if recs:
            for rec in [r for r in recs if r.offer(item)]:
                self._finish(rec)
            self._held()

    def start(self, event: Event) -> None:
        """Start the clip of an event just raised."""
        rec_id = clip_id(event.camera, event.seq, event.capture_ns)
        recs = self.recordings.setdefault(event.camera, [])
        if len(recs) >= MAX_RECORDINGS:
            self._drop(rec_id, "too_many", f"({MAX_RECORDINGS} clips of the camera recording)")
            return
        buf = self.buffers.get(event.camera)
        start_ns = event.capture_ns - int(self.s.clip_pre_s * 1e9)
        end_ns = event.capture_ns + int(self.s.clip_post_s * 1e9)
        newest_ns = buf.frames[-1].capture_ns if buf and buf.frames else event.capture_ns
        wait_s = max(0.0, (end_ns - newest_ns) / 1e9) + FRAMES_STOPPED_S
        rec = Recording(event, start_ns, end_ns, self.s.clip_max_bytes, time.monotonic() + wait_s)
        self._state(rec_id, "recording")
        for item in buf.frames if buf else ():
            if rec.offer(item):
                break
        if rec.ended is not None:
            self._finish(rec, listed=False)
        else:
            recs.append(rec)
        self._held()

    def _finish(self, rec: Recording, listed: bool = True) -> None:
        if listed:
            self.recordings[rec.event.camera].remove(rec)
        if not rec.frames:
            self._drop(rec.id, "no_frames", "(no frame of the camera in the clip's time)")
            return
        try:
            self.queue.put_nowait(rec)
        except asyncio.QueueFull:
            self._drop(rec.id, "queue_full", f"({CLIP_QUEUE} clips waiting to be written)")

    def expire(self, now: float) -> None:
        """End the recordings whose camera stopped sending frames."""
        for recs in self.recordings.values():
            for rec in [r for r in recs if now >= r.deadline]:
                rec.ended = "frames_stopped"
                self._finish(rec)
        self._held()

    # ---- the writer task ---------------------------------------------------------------

    async def write(self, rec: Recording) -> None:
        store = self.durable.clips
        if store is None:
            self._drop(rec.id, "no_store", "(the clips object store is not in place)")
            return
        t0 = time.perf_counter()
        try:
            info, data = await asyncio.to_thread(
                build, rec, self.s.clip_pre_s, self.s.clip_post_s, self.rt.subjects.clips_bucket
            )
            evicted = await put_clip(store, info, data, self.s.clips_max_bytes)
        except ClipError as exc:
            self._drop(rec.id, "too_large", exc)
            return
        except Exception as exc:  # JetStream away or refusing: the publisher keeps serving
            self._drop(rec.id, "failed", exc)
            return
        for old in evicted:
            metrics.CLIPS_DROPPED.labels("evicted").inc()
            self._state(old.id, "dropped: evicted")
        metrics.CLIP_SECONDS.observe(time.perf_counter() - t0)
        metrics.CLIPS_KEPT.labels(info.ended).inc()
        metrics.CLIP_BYTES.inc(len(data))
        self.kept += 1
        self._state(info.id, "kept")
        log.info(
            "clip %s: %d frames, %.1f s, %d KiB (%s)",
            info.id,
            info.frames,
            (info.end_ns - info.start_ns) / 1e9,
            len(data) // 1024,
            info.ended,
        )

    async def run(self) -> None:
        while True:
            try:
                rec = await asyncio.wait_for(self.queue.get(), TICK_S)
            except TimeoutError:
                self.expire(time.monotonic())
                continue
            try:
                await self.write(rec)
            except Exception:  # one bad clip must not end clip writing
                log.exception("writing clip %s failed", rec.id)
            finally:
                self.queue.task_done()
            self.expire(time.monotonic())
