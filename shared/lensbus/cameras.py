"""The cameras bucket (``lensbus-cameras``): the cameras capture should run, and what each
capture instance reports about them.

One small client for everyone who touches it: ``lensbus cameras`` (add, update, remove,
list), capture (``lensbus_capture.desired``: follows the ``camera.*`` keys, writes the
``state.*`` keys) and the publisher's page (follows both). Keys and schemas are in
:mod:`lensbus.schemas.camera`; values are msgpack (:mod:`lensbus.codec`), like the
deployments bucket's.

:meth:`CamerasBucket.views` is the watch: it yields the whole picture (every config and every
state) after the initial values and again after each change, so a follower never merges
deltas itself. It survives NATS reconnects (a KV watch's consumer does not outlive a server
restart, so a fresh watch is made after each reconnect and its snapshot replaces the view)
and JetStream being unavailable for a while (retried with back-off until ``stop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.js import JetStreamContext, api
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from lensbus import metrics
from lensbus.codec import decode, encode
from lensbus.errors import DecodeError, LensbusError
from lensbus.jetstream import ensure_key_value
from lensbus.logs import RateLimit, log_limited
from lensbus.schemas.camera import (
    CAMERA_PREFIX,
    STATE_PREFIX,
    CameraConfig,
    CameraState,
    camera_key,
    state_key,
)
from lensbus.subjects import CAMERAS_BUCKET
from lensbus.waiting import sleep_unless_stopped

log = logging.getLogger(__name__)

# One value per key: configs change by hand, states on every transition; the bucket is the
# current picture, not a log (history would only grow it).
HISTORY = 1
MAX_VALUE_BYTES = 64 * 1024
MAX_BUCKET_BYTES = 64 * 1024 * 1024
# A burst of changes (a script adding ten cameras) becomes one view: changes that follow
# each other within this are read before the view is yielded.
SETTLE_S = 0.05
# Back-off between attempts to bind or watch while JetStream does not answer.
RETRY_MIN_S, RETRY_MAX_S = 0.5, 5.0
# How often a watch looks at ``stop`` and the reconnect count between changes.
POLL_S = 0.5
# A watch whose initial values do not come within this is given up and made again.
INITIAL_TIMEOUT_S = 10.0


class CameraExists(LensbusError):
    """``add`` of an id the bucket already has (``update`` changes it)."""


class NoSuchCamera(LensbusError):
    """``update``/``remove`` of an id the bucket does not have."""


@dataclass
class View:
    """Every camera config and state in the bucket, by camera id."""

    configs: dict[str, CameraConfig] = field(default_factory=dict)
    states: dict[str, CameraState] = field(default_factory=dict)


async def bind(
    js: JetStreamContext,
    *,
    create: bool = True,
    bucket: str = CAMERAS_BUCKET,
    replicas: int | None = None,
) -> KeyValue:
    """The bucket (``Subjects(prefix).cameras_bucket``), created (file storage, one value per
    key) where missing and ``create``, with ``replicas`` (``jetstream_replicas``; ``None``:
    an existing bucket keeps its count, a new one gets 1)."""
    if not create:
        return await js.key_value(bucket)
    config = api.KeyValueConfig(
        bucket=bucket,
        description="lensbus cameras: camera.<id> desired config, state.<id> reported state",
        history=HISTORY,
        max_value_size=MAX_VALUE_BYTES,
        max_bytes=MAX_BUCKET_BYTES,
        storage=api.StorageType.FILE,
    )
    return await ensure_key_value(js, config, replicas=replicas)


class CamerasBucket:
    """The cameras bucket on one NATS connection; every call may raise NATS errors."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        create: bool = True,
        bucket: str = CAMERAS_BUCKET,
        replicas: int | None = None,
    ) -> None:
        """``create``: make the bucket where missing (capture, the CLI); a reader that may
        not (the publisher) passes False, and :meth:`views` waits for the bucket. ``bucket``:
        the installation's (``Subjects(prefix).cameras_bucket``). ``replicas``: the
        creator's ``jetstream_replicas`` (see :func:`bind`)."""
        self.js = js
        self.create = create
        self.bucket = bucket
        self.replicas = replicas
        self._kv: KeyValue | None = None
        self._limit = RateLimit(60.0)

    @classmethod
    async def open(
        cls,
        js: JetStreamContext,
        *,
        create: bool = True,
        bucket: str = CAMERAS_BUCKET,
        replicas: int | None = None,
    ) -> CamerasBucket:
        opened = cls(js, create=create, bucket=bucket, replicas=replicas)
        await opened.kv()
        return opened

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await bind(
                self.js, create=self.create, bucket=self.bucket, replicas=self.replicas
            )
        return self._kv

    # ---- configs (the CLI) ------------------------------------------------------------------

    async def config(self, camera: str) -> tuple[CameraConfig | None, int]:
        """A camera's config and its revision; ``(None, 0)`` when there is none."""
        kv = await self.kv()
        try:
            entry = await kv.get(camera_key(camera))
        except KeyNotFoundError:
            return None, 0
        if not entry.value:
            return None, 0
        return decode(entry.value, CameraConfig), entry.revision or 0

    async def add(self, config: CameraConfig) -> int:
        """Store a new camera; :class:`CameraExists` if its id is taken."""
        kv = await self.kv()
        try:
            return await kv.create(camera_key(config.id), encode(config))
        except KeyWrongLastSequenceError:
            raise CameraExists(f"camera {config.id!r} exists; change it with update") from None

    async def update(self, config: CameraConfig, revision: int) -> int:
        """Replace a camera's config if it is still at ``revision`` (else
        ``KeyWrongLastSequenceError``: someone changed it meanwhile)."""
        kv = await self.kv()
        return await kv.update(camera_key(config.id), encode(config), last=revision)

    async def remove(self, camera: str) -> None:
        """Delete a camera's config; :class:`NoSuchCamera` if there is none."""
        current, revision = await self.config(camera)
        if current is None:
            raise NoSuchCamera(f"no camera {camera!r}")
        kv = await self.kv()
        await kv.delete(camera_key(camera), last=revision)

    # ---- states (capture) -------------------------------------------------------------------

    async def put_state(self, state: CameraState) -> int:
        kv = await self.kv()
        return await kv.put(state_key(state.camera), encode(state))

    async def clear_state(self, camera: str, instance: str) -> bool:
        """Delete ``state.<camera>`` if ``instance`` wrote it last: a camera that moved to
        another instance keeps the state that instance wrote. True when deleted."""
        kv = await self.kv()
        try:
            entry = await kv.get(state_key(camera))
        except KeyNotFoundError:
            return False
        try:
            if entry.value and decode(entry.value, CameraState).instance != instance:
                return False
        except DecodeError:
            pass  # unreadable: nobody's, clear it
        try:
            await kv.delete(state_key(camera), last=entry.revision)
        except KeyWrongLastSequenceError:
            return False  # written meanwhile: by its new runner
        return True

    # ---- reading -----------------------------------------------------------------------------

    async def view(self, *, timeout_s: float = 5.0) -> View:
        """Every config and state now: the bucket's keys from its stream's subjects, then
        each key's value.  (A watch's initial values were tried first: nats-py may signal
        "no initial values" before they arrive, and under load `cameras list` then printed
        no cameras.)"""
        kv = await self.kv()
        view = View()
        stream = f"KV_{self.bucket}"
        prefix = f"$KV.{self.bucket}."
        info = await asyncio.wait_for(
            self.js.stream_info(stream, subjects_filter=f"{prefix}>"), timeout_s
        )
        for subject in sorted(info.state.subjects or {}):
            try:
                entry = await asyncio.wait_for(kv.get(subject[len(prefix) :]), timeout_s)
            except KeyNotFoundError:  # deleted (or purged) since: not in the view
                continue
            self._apply(view, entry)
        return view

    def _apply(self, view: View, entry: KeyValue.Entry) -> None:
        """One entry into ``view``; an unreadable value is counted, logged and skipped (the
        view keeps what it had for that key)."""
        key, deleted = entry.key, entry.operation is not None or not entry.value
        for prefix, into, schema in (
            (CAMERA_PREFIX, view.configs, CameraConfig),
            (STATE_PREFIX, view.states, CameraState),
        ):
            if not key.startswith(prefix):
                continue
            camera = key[len(prefix) :]
            if deleted:
                into.pop(camera, None)
                return
            try:
                value: Any = decode(entry.value, schema)
                if (value.id if schema is CameraConfig else value.camera) != camera:
                    raise DecodeError(f"key {key} holds camera {camera!r}'s value", kind="camera")
            except DecodeError as exc:
                metrics.MESSAGES_REJECTED.labels(exc.reason).inc()
                log_limited(log, self._limit, key, logging.WARNING, "ignoring %s: %s", key, exc)
                return
            into[camera] = value
            return

    async def views(self, stop: asyncio.Event, *, states: bool = True) -> AsyncIterator[View]:
        """The whole picture after the initial values, then after each change, until
        ``stop``. ``states=False`` watches only the ``camera.*`` keys (capture's case).

        A fresh watch (and a full view from its snapshot) follows each NATS reconnect; while
        JetStream does not answer, it retries with back-off and yields nothing."""
        pattern = ">" if states else f"{CAMERA_PREFIX}*"
        backoff = RETRY_MIN_S
        while not stop.is_set():
            try:
                async for view in self._watch(pattern, stop):
                    backoff = RETRY_MIN_S
                    yield view
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                # JetStream or NATS not answering: keep the last view, try again.
                log_limited(
                    log,
                    self._limit,
                    "watch",
                    logging.WARNING,
                    "watching %s failed (%s: %s); retrying",
                    self.bucket,
                    type(exc).__name__,
                    exc,
                )
                if await sleep_unless_stopped(stop, backoff):
                    return
                backoff = min(backoff * 2, RETRY_MAX_S)

    async def _watch(self, pattern: str, stop: asyncio.Event) -> AsyncIterator[View]:
        """One watch, until ``stop`` or a NATS reconnect (then the caller starts another)."""
        nc = self.js._nc
        reconnects = nc.stats.get("reconnects", 0)
        kv = await self.kv()
        watcher = await kv.watch(pattern)
        view, ready = View(), False
        deadline = asyncio.get_running_loop().time() + INITIAL_TIMEOUT_S
        try:
            while not stop.is_set():
                if nc.stats.get("reconnects", 0) != reconnects:
                    return  # its consumer may be gone with the old server: watch again
                try:
                    entry = await watcher.updates(timeout=POLL_S)
                except nats.errors.TimeoutError:
                    if not ready and asyncio.get_running_loop().time() > deadline:
                        raise
                    continue
                if entry is None:  # the initial values are in
                    ready = True
                else:
                    self._apply(view, entry)
                    if not ready:
                        continue
                    await self._settle(watcher, view)
                yield View(dict(view.configs), dict(view.states))
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def _settle(self, watcher: KeyValue.KeyWatcher, view: View) -> None:
        """Read the changes that follow within :data:`SETTLE_S` into ``view``."""
        while True:
            try:
                entry = await watcher.updates(timeout=SETTLE_S)
            except nats.errors.TimeoutError:
                return
            if entry is not None:
                self._apply(view, entry)
