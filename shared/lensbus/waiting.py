"""Waiting that a stop cuts short: the one way every service sleeps between retries, polls
and heartbeats, so that SIGTERM is never held up by a sleep."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds``, or less if ``stop`` is set first; True when it was set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def wait_unless_stopped(stop: asyncio.Event, what: Awaitable[T]) -> asyncio.Future[T] | None:
    """Wait for ``what`` or for ``stop``, whichever comes first.

    Returns ``what``'s finished future (read ``.result()`` or ``.exception()``), or None when
    ``stop`` came first; then ``what`` is cancelled and awaited, so nothing is left running.
    """
    task = asyncio.ensure_future(what)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled: take both down with us
        task.cancel()
        raise
    finally:
        stopping.cancel()
    if task.done():
        return task
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    return None
