"""``ctx.state``: a project's own key/value store, kept in its KV bucket
(:meth:`lensbus.subjects.Subjects.project_state_bucket`, which only the project's NATS user
may touch).

Read whole at start; reads come from memory (a handler never waits on the network); writes
change memory at once and go to the bucket in the background, in order (last write wins).
Keys are subject tokens, values msgpack types (checked when set, in the handler's call).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import msgpack
import nats.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import NoKeysError
from nats.js.kv import KeyValue

from lensbus.jetstream import ensure_key_value
from lensbus.logs import RateLimit, log_limited
from lensbus.subjects import Subjects, validate_token

log = logging.getLogger(__name__)

# Largest value one key may hold: state is small facts (counts, last seen), not files.
MAX_VALUE_BYTES = 256 * 1024
# The whole bucket, on the server (the projects service creates it so).
STATE_MAX_BYTES = 64 * 1024 * 1024
# Writes waiting for the bucket; past it a handler writing in a tight loop gets an error.
MAX_PENDING = 10_000

_DELETE = object()


class StateError(ValueError):
    """A key that is not a subject token, a value that is not msgpack or too large."""


def _encode(key: str, value: Any) -> bytes:
    try:
        data: bytes = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise StateError(f"state {key!r}: not a msgpack value ({exc})") from None
    if len(data) > MAX_VALUE_BYTES:
        raise StateError(f"state {key!r}: {len(data)} bytes is over {MAX_VALUE_BYTES}")
    return data


class State:
    """The project's state: ``get/set/delete/keys`` from any thread, never blocking."""

    def __init__(
        self, project: str, loop: asyncio.AbstractEventLoop, subjects: Subjects | None = None
    ) -> None:
        self.bucket = (subjects or Subjects()).project_state_bucket(project)
        self.loop = loop
        self.errors = 0
        self._values: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._kv: KeyValue | None = None
        self._writer: asyncio.Task[None] | None = None
        self._limit = RateLimit(60.0)

    async def open(self, js: JetStreamContext) -> None:
        """Bind the bucket (create it when absent and allowed) and read every key.

        The projects service makes it first (at its ``jetstream_replicas``); this keeps the
        count it has and creates it (R1, the same limits) only where it is still missing."""
        config = KeyValueConfig(
            bucket=self.bucket,
            history=1,
            max_bytes=STATE_MAX_BYTES,
            max_value_size=MAX_VALUE_BYTES,
        )
        kv = await ensure_key_value(js, config, replicas=None)
        try:
            keys = await kv.keys()
        except NoKeysError:
            keys = []
        self._values = await _read_all(kv, keys)
        self._kv = kv
        self._writer = self.loop.create_task(self._write_all(), name="state-writer")

    async def reload(self, timeout_s: float = 5.0) -> None:
        """Read the bucket again (a swap: the version before saved its state at its stop),
        after this process's own writes so far have gone out."""
        if self._kv is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout_s)
            try:
                keys = await self._kv.keys()
            except NoKeysError:
                keys = []
            values = await _read_all(self._kv, keys)
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            self.errors += 1
            log.warning("state not re-read at take-over: %s: %s", type(exc).__name__, exc)
            return
        with self._lock:
            self._values = values

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            return self._values.get(key, default)

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._values)

    def set(self, key: str, value: Any) -> None:
        validate_token(key, "state key")
        data = _encode(key, value)
        with self._lock:
            # Kept as read back (tuples become lists): what a restart would see.
            self._values[key] = msgpack.unpackb(data, raw=False)
        self._send((key, data))

    def delete(self, key: str) -> None:
        validate_token(key, "state key")
        with self._lock:
            self._values.pop(key, None)
        self._send((key, _DELETE))

    def _send(self, item: tuple[str, Any]) -> None:
        if self._queue.qsize() >= MAX_PENDING:
            raise StateError(f"{MAX_PENDING} state writes are waiting for the bucket")
        on_loop(self.loop, self._queue.put_nowait, item)

    async def _write_all(self) -> None:
        while True:
            key, value = await self._queue.get()
            try:
                await self._write(key, value)
            finally:
                self._queue.task_done()

    async def _write(self, key: str, value: Any) -> None:
        assert self._kv is not None
        try:
            if value is _DELETE:
                await self._kv.delete(key)
            else:
                await self._kv.put(key, value)
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            self.errors += 1
            cause = type(exc).__name__
            msg = "state %r not saved: %s: %s"
            log_limited(log, self._limit, cause, logging.WARNING, msg, key, cause, exc)

    async def flush(self, timeout_s: float = 5.0) -> None:
        """Wait (bounded) until every write so far reached the bucket, then stop writing."""
        if self._writer is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout_s)
        except TimeoutError:
            log.warning("%d state writes not saved at stop", self._queue.qsize())
        self._writer.cancel()


async def _read_all(kv: KeyValue, keys: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key in keys:
        entry = await kv.get(key)
        if entry.value is not None:
            values[key] = msgpack.unpackb(entry.value, raw=False)
    return values


def on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Call ``fn`` on ``loop``: at once when already on it, else queued thread-safely."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        fn(*args)
    else:
        loop.call_soon_threadsafe(fn, *args)
