"""The synchronous SDK: results, events, snapshots and clips for scripts and notebooks.

::

    from datetime import timedelta
    from lensbus import SyncClient

    with SyncClient("tls://device:4222", nkey="client.nk", tls_ca="ca.pem") as c:
        for r in c.results("cam1", since=timedelta(minutes=10), timeout=30):
            print(r.seq, [d.label for d in r.detections])

It wraps the async :class:`lensbus.Client`: one private event loop runs in one background
thread, and every call hands it a coroutine (``asyncio.run_coroutine_threadsafe``) and waits
for the answer; no polling anywhere. An iterator (:class:`Feed`) takes one message per step,
so a program that reads slowly holds the stream back instead of filling memory. Ctrl-C, a
``break`` or :meth:`SyncClient.close` ends what is open (the consumer is unsubscribed, the
connection closed) and the thread is joined: nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Generic, TypeVar

from lensbus import clips
from lensbus.client import Client
from lensbus.feeds import Delivery, M, NotStored, Since, Snapshot, Subscription
from lensbus.schemas import ClipInfo, Event, Result
from lensbus.subjects import DEFAULT_PREFIX

__all__ = ["Feed", "NotStored", "Snapshot", "SyncClient"]

T = TypeVar("T")
CLOSE_TIMEOUT_S = 5.0  # a close that the server does not answer still ends
_END = object()


class _Loop:
    """An event loop in a thread of its own, and the way to run coroutines on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="lensbus-sync", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self.submit(coro).result(timeout)

    async def _cancel_rest(self) -> None:
        me = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks() if t is not me]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
        await self.loop.shutdown_asyncgens()

    def stop(self) -> None:
        """Cancel what still runs, stop the loop, join the thread, close the loop."""
        if not self.thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self.call(self._cancel_rest(), CLOSE_TIMEOUT_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(CLOSE_TIMEOUT_S)
        if not self.thread.is_alive():
            self.loop.close()


class Feed(Iterator[T], Generic[T]):
    """Results or events, one per ``next()``. It ends (``StopIteration``) after ``limit``
    messages, when none came for ``timeout`` seconds, when a replay with ``follow=False``
    caught up, or when closed. ``stream_seq`` is the stream sequence of the last message of
    a replay (``since=feed.stream_seq + 1`` resumes after it); ``None`` when live."""

    def __init__(
        self,
        runner: _Loop,
        source: Subscription[Any],
        *,
        timeout: float | None,
        limit: int | None,
        owner: SyncClient,
    ) -> None:
        self._runner = runner
        self._source = source
        self._timeout = timeout
        self._left = limit
        self._owner = owner
        self._task: asyncio.Task[Any] | None = None
        self._closed = False
        self.stream_seq: int | None = None

    def __iter__(self) -> Feed[T]:
        return self

    async def _step(self) -> Any:
        if self._closed:
            return _END
        self._task = asyncio.current_task()
        try:
            return await asyncio.wait_for(anext(self._source), self._timeout)
        except (StopAsyncIteration, TimeoutError):
            return _END
        finally:
            self._task = None

    def __next__(self) -> T:
        if self._closed or self._left == 0:
            self.close()
            raise StopIteration
        try:
            item = self._runner.call(self._step())
        except BaseException:  # Ctrl-C while waiting, or the loop went away: end cleanly
            self.close()
            raise
        if item is _END:
            self.close()
            raise StopIteration
        if self._left is not None:
            self._left -= 1
        delivery: Delivery[Any] = item
        self.stream_seq = delivery.stream_seq
        return delivery.message

    async def _aclose(self) -> None:
        # A step still waiting (Ctrl-C came while it did) is cancelled first, so that nothing
        # reads the subscription after it is ended.
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        await self._source.aclose()

    def close(self) -> None:
        """Stop reading: the subscription or consumer is ended on the server."""
        if self._closed:
            return
        self._closed = True
        self._owner._feeds.discard(self)
        if threading.current_thread() is self._runner.thread:
            # Collected on the loop's own thread: waiting there would wait on itself.
            self._runner.submit(self._aclose())
        elif self._runner.thread.is_alive():
            with contextlib.suppress(Exception):
                self._runner.call(self._aclose(), CLOSE_TIMEOUT_S)

    def __enter__(self) -> Feed[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A loop left by ``break`` drops the feed: end its subscription then, not at close.
        with contextlib.suppress(Exception):
            self.close()


class SyncClient:
    """Reads results, events, snapshots and clips of a lensbus installation, blocking.

    Takes what :class:`lensbus.Client` takes: ``servers`` (a URL, a comma-separated list or
    a list), ``prefix``, the credentials (``nkey``: a seed file such as ``client.nk``,
    ``creds``, ``user``/``password``; ``tls_ca``: the CA of a ``tls://`` server) and other
    NATS options (``token``, ``tls``). ``timeout_s`` bounds the first connection. Messages a
    producer got wrong are skipped, counted in :attr:`rejected` (and the metric
    ``lensbus_messages_rejected_total``) and logged once a minute per reason; fields this
    version does not know are ignored.
    """

    def __init__(
        self,
        servers: str | list[str] = "nats://127.0.0.1:4222",
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout_s: float = 5.0,
        **connect_options: Any,
    ) -> None:
        self.client = Client(servers, prefix=prefix, timeout_s=timeout_s, **connect_options)
        self._runner: _Loop | None = None
        # Weak: a feed a program dropped (a loop left by break) is ended by its __del__.
        self._feeds: weakref.WeakSet[Feed[Any]] = weakref.WeakSet()

    # ---- connection ----------------------------------------------------------------------

    def connect(self) -> SyncClient:
        if self._runner is None:
            runner = _Loop()
            try:
                runner.call(self.client.connect())
            except BaseException:
                runner.stop()
                raise
            self._runner = runner
        return self

    def close(self) -> None:
        """End every open feed, close the connection and join the background thread."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for feed in list(self._feeds):
            feed.close()
        with contextlib.suppress(Exception):
            runner.call(self.client.close(), CLOSE_TIMEOUT_S)
        runner.stop()

    def __enter__(self) -> SyncClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def rejected(self) -> int:
        """Messages skipped as unreadable or invalid so far."""
        return self.client.rejected

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._runner is None:
            coro.close()
            raise RuntimeError("SyncClient is not connected: use 'with SyncClient(...) as c'")
        return self._runner.call(coro)

    # ---- results and events --------------------------------------------------------------

    def _feed(
        self,
        schema: type[M],
        camera: str | None,
        since: Since | None,
        follow: bool,
        timeout: float | None,
        limit: int | None,
    ) -> Feed[M]:
        if self._runner is None:
            raise RuntimeError("SyncClient is not connected: use 'with SyncClient(...) as c'")
        source = self._call(self.client.open(schema, camera, since=since, follow=follow))
        feed: Feed[M] = Feed(self._runner, source, timeout=timeout, limit=limit, owner=self)
        self._feeds.add(feed)
        return feed

    def results(
        self,
        camera: str | None = None,
        *,
        since: Since | None = None,
        follow: bool = True,
        timeout: float | None = None,
        limit: int | None = None,
    ) -> Feed[Result]:
        """Results of ``camera`` (every camera when ``None``): live, or replayed from
        ``since`` (a datetime, a timedelta ago, or a stream sequence) out of the results
        stream and then live. ``follow=False`` ends a replay once caught up; ``timeout``
        ends the feed after that many seconds without a message; ``limit`` after that
        many messages."""
        return self._feed(Result, camera, since, follow, timeout, limit)

    def events(
        self,
        camera: str | None = None,
        *,
        since: Since | None = None,
        follow: bool = True,
        timeout: float | None = None,
        limit: int | None = None,
    ) -> Feed[Event]:
        """The events the publisher's rules raised, like :meth:`results`."""
        return self._feed(Event, camera, since, follow, timeout, limit)

    # ---- snapshots and clips -------------------------------------------------------------

    def snapshots(self, camera: str | None = None) -> list[Snapshot]:
        """The snapshots of raised events (of ``camera``), oldest first."""
        return self._call(self.client.snapshots(camera))

    def snapshot(self, name: str | Event) -> bytes:
        """A snapshot's JPEG, by name or by its event; :class:`NotStored`
        when there is none."""
        return self._call(self.client.snapshot(name))

    def save_snapshot(self, name: str | Event, path: str | Path) -> Path:
        out = Path(path)
        out.write_bytes(self.snapshot(name))
        return out

    def clips(self, camera: str | None = None) -> list[ClipInfo]:
        """The clips kept around events (of ``camera``), oldest first."""
        return self._call(self.client.clips(camera))

    def clip(self, clip_id: str) -> bytes:
        """A clip's MJPEG AVI bytes."""
        return self._call(self.client.clip(clip_id))[1]

    def save_clip(self, clip_id: str, path: str | Path) -> int:
        """Write a clip as ``.avi`` (as stored) or ``.mp4`` (re-encoded); the frames written."""
        return clips.export(self.clip(clip_id), Path(path))
