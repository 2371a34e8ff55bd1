"""The consumer SDK: read a camera's frames and results from any Python program.

::

    async with Client("tls://device:4222", nkey="client.nk", tls_ca="ca.pem") as client:
        async for frame in client.frames("cam1"):
            print(frame.seq, frame.image.shape)

Results and events are live by default; with ``since=`` (a datetime, a timedelta ago or a
stream sequence) they are replayed from the publisher's durable stream (``LENSBUS_RESULTS``
under the default prefix) by an ordered, ephemeral consumer (nothing is left on the server,
and the read-only ``client`` NATS user may create it), then followed live. Snapshots and
clips are read from their object stores. :class:`lensbus.syncclient.SyncClient` is the same
for scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.object_store import ObjectStore

from lensbus import clips, metrics
from lensbus.bus import auth_options, connect
from lensbus.codec import DecodeError, decode
from lensbus.demand import Wanter
from lensbus.feeds import (
    LIVE_BUFFER,
    REPLAY_BUFFER,
    M,
    NotStored,
    Since,
    Snapshot,
    Subscription,
    live_box,
    replay_config,
)
from lensbus.images import ImageError, decode_jpeg
from lensbus.logs import RateLimit, log_limited
from lensbus.schemas import ClipInfo, Event, FrameEnvelope, Result
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
        timeout_s: float | None = None,
        nkey: str | Path | None = None,
        creds: str | Path | None = None,
        tls_ca: str | Path | None = None,
        user: str | None = None,
        **connect_options: Any,
    ) -> None:
        """``nkey``: the user's nkey seed file (``client.nk`` of ``lensbus up`` or compose's
        set-up), or ``creds`` (a JWT user's .creds file); ``user`` then names whose they are
        (its inbox ``_INBOX_<user>``; default ``client``, the read-only user), else it is the
        user name sent with a ``password``. ``tls_ca``: the CA that signed the server's
        certificate (``tls://`` URLs). Other ``connect_options`` go to
        :func:`lensbus.bus.connect` as they are (``token``, ``tls``...); ``timeout_s`` bounds
        the first connection (without it the client waits for NATS as long as it takes).
        A file that cannot be used fails here (ValueError naming it)."""
        self.servers = [servers] if isinstance(servers, str) else servers
        self.subjects = Subjects(prefix)
        keyed = nkey is not None or creds is not None
        auth = auth_options(
            user=user or ("client" if keyed else None),
            password=connect_options.pop("password", None),
            nkey_file=nkey,
            creds=creds,
            tls_ca=tls_ca,
        )
        self._options = {**auth, **connect_options}
        self._timeout_s = timeout_s
        self._nc: NATS | None = None
        self.rejected = 0
        self._log_limit = RateLimit()

    async def connect(self) -> None:
        options = {"name": "lensbus-client", **self._options}
        self._nc = await connect(self.servers, timeout_s=self._timeout_s, **options)

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
        box, put = live_box(1 if newest_only else LIVE_BUFFER)
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
        """Decoded frames of ``camera`` (every one: it says it reads them, :mod:`lensbus.demand`).
        Unreadable messages are counted and skipped; fields this version does not know are
        ignored."""
        # Capture encodes every device-stream frame only for whoever says it reads them.
        wanter = Wanter(self.nc, self.subjects, lambda: (camera,), "lensbus.Client").start()
        try:
            async for msg in self._messages(self.subjects.frames(camera), newest_only):
                try:
                    env = decode(msg.data, FrameEnvelope)
                    image = decode_jpeg(env.data, size=(env.width, env.height))
                except (DecodeError, ImageError) as exc:
                    self._reject(exc)
                    continue
                yield Frame(image=image, envelope=env)
        finally:
            await wanter.stop()

    async def latest_frame(self, camera: str, wait_s: float = 5.0) -> Frame:
        """The next frame ``camera`` publishes (the newest there is); TimeoutError after
        ``wait_s`` seconds without one."""
        async with asyncio.timeout(wait_s):
            async for frame in self.frames(camera):
                return frame
        raise RuntimeError("frame stream ended")

    def _subject(self, camera: str | None, events: bool) -> str:
        if camera is None or camera == "*":
            return self.subjects.all_events() if events else self.subjects.all_results()
        return self.subjects.events(camera) if events else self.subjects.results(camera)

    async def open(
        self,
        schema: type[M],
        camera: str | None = "*",
        *,
        since: Since | None = None,
        follow: bool = True,
    ) -> Subscription[M]:
        """Results (``schema=Result``) or events (``Event``) of ``camera`` (``*`` or ``None``:
        every camera) as a :class:`~lensbus.feeds.Subscription`: live, or replayed from
        ``since`` (a datetime, a timedelta ago, a stream sequence) out of the results stream,
        then live (``follow=False``: ending once caught up). Subscribed when this returns;
        raises :class:`NotStored` when no publisher ever made the stream on this NATS."""
        subject = self._subject(camera, schema is Event)
        if since is None:
            box, put = live_box()
            sub = await self.nc.subscribe(subject, cb=put)
            return Subscription(sub, box, schema, self._reject, stored=False)
        box = asyncio.Queue(maxsize=REPLAY_BUFFER)
        try:
            sub = await self.nc.jetstream().subscribe(
                subject,
                stream=self.subjects.results_stream,
                cb=box.put,
                ordered_consumer=True,
                config=replay_config(since),
            )
        except NotFoundError:
            msg = f"no stream {self.subjects.results_stream} on this NATS (does a publisher run?)"
            raise NotStored(msg) from None
        replay = Subscription(sub, box, schema, self._reject, stored=True, follow=follow)
        if not follow and await replay.caught_up_already():
            await replay.aclose()
        return replay

    async def _read(self, subscription: Subscription[M]) -> AsyncIterator[M]:
        try:
            async for delivery in subscription:
                yield delivery.message
        finally:
            await subscription.aclose()

    async def results(
        self, camera: str | None = "*", *, since: Since | None = None, follow: bool = True
    ) -> AsyncIterator[Result]:
        """Validated results for ``camera`` (``*`` for every camera), in arrival order: live,
        or replayed from ``since`` (see :meth:`open`). Unreadable messages are counted and
        skipped; fields this version does not know are ignored."""
        async for result in self._read(await self.open(Result, camera, since=since, follow=follow)):
            yield result

    async def events(
        self, camera: str | None = "*", *, since: Since | None = None, follow: bool = True
    ) -> AsyncIterator[Event]:
        """The events the publisher's rules raise, like :meth:`results`."""
        async for event in self._read(await self.open(Event, camera, since=since, follow=follow)):
            yield event

    # ---- snapshots and clips ---------------------------------------------------------------

    async def _store(self, bucket: str) -> ObjectStore | None:
        try:
            return await self.nc.jetstream().object_store(bucket)
        except BucketNotFoundError:
            return None

    async def snapshots(self, camera: str | None = None) -> list[Snapshot]:
        """The snapshots of raised events (of ``camera``), oldest first."""
        store = await self._store(self.subjects.snapshots_bucket)
        try:
            objects = [] if store is None else await store.list(ignore_deletes=True)
        except NotFoundError:  # an empty bucket
            objects = []
        shots = [Snapshot.of(o.name, o.size or 0) for o in objects if not o.deleted]
        if camera is not None:
            shots = [s for s in shots if s.camera == camera]
        return sorted(shots, key=lambda s: (s.capture_ns or 0, s.name))

    async def snapshot(self, name: str | Event) -> bytes:
        """The JPEG of a snapshot, by its name or by the event that has it."""
        if isinstance(name, Event):
            if not name.snapshot:
                raise NotStored(f"event {name.rule} #{name.seq} of {name.camera} has no snapshot")
            name = name.snapshot
        store = await self._store(self.subjects.snapshots_bucket)
        try:
            got = None if store is None else await store.get(name)
        except NotFoundError:
            got = None
        if got is None or got.data is None:
            raise NotStored(f"no snapshot {name!r}")
        return got.data

    async def clips(self, camera: str | None = None) -> list[ClipInfo]:
        """The clips kept around events (of ``camera``), oldest first."""
        store = await self._store(self.subjects.clips_bucket)
        return [] if store is None else await clips.list_clips(store, camera)

    async def clip(self, clip_id: str) -> tuple[ClipInfo, bytes]:
        """A clip: what it holds and its MJPEG AVI bytes (:func:`lensbus.clips.export`
        writes them as ``.avi`` or ``.mp4``)."""
        store = await self._store(self.subjects.clips_bucket)
        if store is None:
            raise NotStored(f"no clips store ({self.subjects.clips_bucket}) on this NATS")
        try:
            return await clips.read_clip(store, clip_id)
        except clips.ClipError as exc:
            raise NotStored(str(exc)) from None
