"""Webhook delivery: each URL has its own bounded queue and worker, so a dead or hanging
receiver delays only its own deliveries, never the streams or another URL.

Each event is POSTed as JSON; a timeout, a connection error, a 5xx, 408 or 429 is retried
with doubling back-off (at most 30 s between tries); other 4xx are not (the request itself
is wrong). Outcomes and attempts are counted. URLs are logged by host only: a webhook URL
often carries a secret in its path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from urllib.parse import urlsplit

import aiohttp

from lensbus.logs import RateLimit, log_limited
from lensbus_publisher import metrics
from lensbus_publisher.config import PublisherSettings

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
RETRY_STATUS = {408, 429}


def host_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}".rstrip(":")


class Lane:
    """Deliveries to one URL, one at a time, from a bounded queue."""

    def __init__(self, url: str, hooks: Webhooks) -> None:
        self.url = url
        self.host = host_of(url)
        self.hooks = hooks
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=hooks.s.webhook_queue)
        self.task = asyncio.create_task(self._run(), name=f"webhook {self.host}")

    async def _attempt(self, body: bytes) -> tuple[bool, bool]:
        """One POST: (delivered, worth retrying)."""
        t0 = time.perf_counter()
        try:
            async with self.hooks.session.post(
                self.url, data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                await resp.read()
                status = resp.status
        except TimeoutError:
            metrics.WEBHOOK_ATTEMPTS.labels("timeout").inc()
            self.hooks.warn(self.host, "timed out")
            return False, True
        except (aiohttp.ClientError, OSError) as exc:
            metrics.WEBHOOK_ATTEMPTS.labels("error").inc()
            self.hooks.warn(self.host, f"{type(exc).__name__}")
            return False, True
        finally:
            metrics.WEBHOOK_SECONDS.observe(time.perf_counter() - t0)
        if 200 <= status < 300:
            metrics.WEBHOOK_ATTEMPTS.labels("ok").inc()
            return True, False
        metrics.WEBHOOK_ATTEMPTS.labels(f"http_{status}").inc()
        self.hooks.warn(self.host, f"HTTP {status}")
        return False, status >= 500 or status in RETRY_STATUS

    async def deliver(self, body: bytes) -> bool:
        delay = self.hooks.s.webhook_backoff_s
        for attempt in range(self.hooks.s.webhook_retries + 1):
            if attempt:
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
            ok, retry = await self._attempt(body)
            if ok:
                metrics.WEBHOOK_DELIVERIES.labels("delivered").inc()
                return True
            if not retry:
                break
        metrics.WEBHOOK_DELIVERIES.labels("failed").inc()
        self.hooks.failed += 1
        return False

    async def _run(self) -> None:
        while True:
            body = await self.queue.get()
            try:
                await self.deliver(body)
            finally:
                self.queue.task_done()


class Webhooks:
    """All webhook lanes, created when first used."""

    def __init__(self, settings: PublisherSettings) -> None:
        self.s = settings
        self.lanes: dict[str, Lane] = {}
        self.failed = 0
        self._session: aiohttp.ClientSession | None = None
        self._limit = RateLimit(60.0)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.s.webhook_timeout_s),
                headers={"User-Agent": "lensbus-publisher"},
            )
        return self._session

    def warn(self, host: str, what: str) -> None:
        log_limited(
            log, self._limit, host, logging.WARNING, "webhook %s: %s (will retry)", host, what
        )

    def submit(self, url: str, body: bytes) -> bool:
        """Queue one delivery; False (and counted) when that URL's queue is full."""
        lane = self.lanes.get(url)
        if lane is None:
            lane = self.lanes[url] = Lane(url, self)
        try:
            lane.queue.put_nowait(body)
        except asyncio.QueueFull:
            metrics.WEBHOOK_DELIVERIES.labels("dropped").inc()
            log_limited(
                log,
                self._limit,
                f"full:{lane.host}",
                logging.WARNING,
                "webhook %s: queue full, event dropped",
                lane.host,
            )
            return False
        return True

    async def close(self, grace_s: float = 2.0) -> None:
        """Give queued deliveries a moment, then stop."""
        waits = [asyncio.ensure_future(lane.queue.join()) for lane in self.lanes.values()]
        if waits:
            await asyncio.wait(waits, timeout=grace_s)
        for fut in waits:
            fut.cancel()
        for lane in self.lanes.values():
            lane.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lane.task
        if self._session is not None:
            await self._session.close()
            self._session = None
