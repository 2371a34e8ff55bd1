"""Webhook delivery, at least once: pending deliveries live in JetStream, not in memory, so a
publisher that is restarted (even killed) goes on where it stopped.

A raised event is stored in the work-queue stream ``Subjects(prefix).webhooks_stream``
(``LENSBUS_WEBHOOKS``) on ``<prefix>.webhooks.<rule>`` (at most ``webhook_queue`` per rule;
beyond that it is dropped, counted). Each rule with a webhook has a lane: a durable pull
consumer of its own subject (``webhook-<rule>``, in the prefix's own stream) that takes one
delivery at a time, POSTs it (headers: :mod:`lensbus_publisher.signing`) and

- acks it once the receiver answered 2xx (only then does it leave the stream);
- terminates it (dropped, counted) on another 4xx than 408/429 (the request itself is wrong),
  once it was tried ``webhook_retries + 1`` times, or once it is older than
  ``webhook_max_age_s``;
- otherwise naks it with a delay: the receiver's ``Retry-After`` on 429/503, else jittered
  doubling back-off; the lane itself waits as long, so a struggling receiver gets one try
  per delay, not one per pending delivery.

A dead or hanging receiver holds up only its own rule's lane. URLs are logged by host only
(a webhook URL often carries a secret in its path); secrets are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from urllib.parse import urlsplit

import aiohttp
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext, api

from lensbus.jetstream import ensure_stream
from lensbus.logs import RateLimit, log_limited
from lensbus.runtime import Runtime
from lensbus.waiting import sleep_unless_stopped, wait_unless_stopped
from lensbus_publisher import metrics
from lensbus_publisher.config import PublisherSettings, Rule
from lensbus_publisher.signing import (
    DELIVERY_HEADER,
    RETRY_AFTER_STATUS,
    RETRY_STATUS,
    backoff,
    delivery_headers,
    retry_after,
)

log = logging.getLogger(__name__)

RETRY_S = 3.0  # how soon a lane whose consumer could not be set up tries again
FETCH_WAIT_S = 2.0  # how long one pull waits for a delivery (then pending is refreshed)
ACK_MARGIN_S = 10.0  # ack wait beyond the POST timeout: no redelivery while a POST runs
# The stream's own age limit is a backstop behind the lanes' (which count what they drop):
# a delivery no lane reads (its rule removed) still goes in the end.
STREAM_AGE_MARGIN_S = 3600.0


def host_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}".rstrip(":")


class Lane:
    """The deliveries of one rule, one at a time, from its durable consumer."""

    def __init__(self, rule: Rule, hooks: Webhooks) -> None:
        self.rule = rule
        self.url = str(rule.webhook)
        self.host = host_of(self.url)
        self.hooks = hooks
        self.secret = rule.webhook_secret.get_secret_value() if rule.webhook_secret else None
        self.hold_until = 0.0  # monotonic time before which the receiver is left alone

    async def run(self) -> None:
        rt = self.hooks.rt
        while not rt.stop.is_set():
            try:
                sub = await self._bind()
                await self._drain(sub)
            except Exception as exc:  # NATS away, a consumer clash: set up again
                self.hooks.forget_stream()  # a server that lost its store needs it again
                self.hooks.warn(f"lane:{self.rule.name}", f"rule {self.rule.name}: {exc!r}")
                await sleep_unless_stopped(rt.stop, RETRY_S)

    async def _bind(self) -> JetStreamContext.PullSubscription:
        js = await self.hooks.stream()
        subject = self.hooks.rt.subjects.webhooks(self.rule.name)
        config = api.ConsumerConfig(
            durable_name=f"webhook-{self.rule.name}",
            description=f"webhook deliveries of rule {self.rule.name}",
            filter_subject=subject,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.hooks.s.webhook_timeout_s + ACK_MARGIN_S,
            max_deliver=-1,  # the lane counts tries and drops itself, counted
        )
        return await js.pull_subscribe(
            subject,
            durable=config.durable_name,
            stream=self.hooks.rt.subjects.webhooks_stream,
            config=config,
        )

    async def _drain(self, sub: JetStreamContext.PullSubscription) -> None:
        stop = self.hooks.rt.stop
        while not stop.is_set():
            wait = self.hold_until - time.monotonic()
            if wait > 0 and await sleep_unless_stopped(stop, wait):
                return
            got = await wait_unless_stopped(stop, sub.fetch(1, timeout=FETCH_WAIT_S))
            if got is None:
                return
            if not isinstance(got.exception(), NatsTimeout):
                for msg in got.result():
                    await self.handle(msg)
            info = await sub.consumer_info()
            pending = (info.num_pending or 0) + (info.num_ack_pending or 0)
            metrics.WEBHOOK_PENDING.labels(self.rule.name).set(pending)

    async def handle(self, msg: Msg) -> None:
        meta = msg.metadata
        tries = meta.num_delivered
        delivery = (msg.headers or {}).get(DELIVERY_HEADER) or f"s{meta.sequence.stream}"
        if time.time() - meta.timestamp.timestamp() > self.hooks.s.webhook_max_age_s:
            await self._drop(msg, "expired", tries)
            return
        ok, retry, after = await self._attempt(msg.data, delivery, tries)
        if ok:
            metrics.WEBHOOK_DELIVERIES.labels("delivered").inc()
            # The receiver has it: a lost ack only means it comes again (same delivery id),
            # and the next pull says whether NATS is in trouble.
            with contextlib.suppress(Exception):
                await msg.ack_sync()
        elif not retry:
            await self._drop(msg, "rejected", tries)
        elif tries > self.hooks.s.webhook_retries:
            await self._drop(msg, "max_deliveries", tries)
        else:
            s = self.hooks.s
            delay = (
                after
                if after is not None
                else backoff(tries, s.webhook_backoff_s, s.webhook_backoff_max_s)
            )
            await msg.nak(delay=delay)
            metrics.WEBHOOK_RETRIES.inc()
            self.hold_until = time.monotonic() + delay

    async def _drop(self, msg: Msg, reason: str, tries: int) -> None:
        await msg.term()
        self.hooks.drop(reason, self.rule.name, f"after {tries} tries to {self.host}")

    async def _attempt(
        self, body: bytes, delivery: str, tries: int
    ) -> tuple[bool, bool, float | None]:
        """One POST: (delivered, worth retrying, seconds the receiver asked us to wait)."""
        headers = delivery_headers(delivery, tries, body, self.secret)
        t0 = time.perf_counter()
        try:
            async with self.hooks.session.post(self.url, data=body, headers=headers) as resp:
                await resp.read()
                status = resp.status
                asked = retry_after(resp.headers.get("Retry-After"))
        except TimeoutError:
            metrics.WEBHOOK_ATTEMPTS.labels("timeout").inc()
            self.hooks.warn(self.host, f"webhook {self.host}: timed out (will retry)")
            return False, True, None
        except (aiohttp.ClientError, OSError) as exc:
            metrics.WEBHOOK_ATTEMPTS.labels("error").inc()
            self.hooks.warn(self.host, f"webhook {self.host}: {type(exc).__name__} (will retry)")
            return False, True, None
        finally:
            metrics.WEBHOOK_SECONDS.observe(time.perf_counter() - t0)
        if 200 <= status < 300:
            metrics.WEBHOOK_ATTEMPTS.labels("ok").inc()
            return True, False, None
        metrics.WEBHOOK_ATTEMPTS.labels(f"http_{status}").inc()
        self.hooks.warn(self.host, f"webhook {self.host}: HTTP {status}")
        retry = status >= 500 or status in RETRY_STATUS
        return False, retry, asked if status in RETRY_AFTER_STATUS else None


class Webhooks:
    """The pending-deliveries stream and a lane per rule with a webhook."""

    def __init__(self, settings: PublisherSettings) -> None:
        self.s = settings
        self.rules = [r for r in settings.rules if r.webhook is not None]
        self.dropped = 0
        self.tasks: list[asyncio.Task[None]] = []
        self._js: JetStreamContext | None = None
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

    def warn(self, key: str, what: str) -> None:
        log_limited(log, self._limit, key, logging.WARNING, "%s", what)

    def drop(self, reason: str, rule: str, detail: str) -> None:
        self.dropped += 1
        metrics.WEBHOOK_DELIVERIES.labels("dropped").inc()
        metrics.WEBHOOK_DROPPED.labels(reason).inc()
        self.warn(f"drop:{rule}:{reason}", f"webhook of rule {rule} dropped ({reason}): {detail}")

    def start(self, rt: Runtime) -> None:
        self.rt = rt
        for rule in self.rules:
            metrics.WEBHOOK_PENDING.labels(rule.name).set(0)
            if rule.webhook_secret is None:  # said once: every delivery would repeat it
                log.warning(
                    "rule %s: no webhook_secret, its webhook deliveries are sent unsigned",
                    rule.name,
                )
            self.tasks.append(
                asyncio.create_task(Lane(rule, self).run(), name=f"webhook {rule.name}")
            )

    def stream_config(self) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.rt.subjects.webhooks_stream,
            description="lensbus webhook deliveries not yet taken by their receiver",
            subjects=[self.rt.subjects.all_webhooks()],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.WORK_QUEUE,
            discard=api.DiscardPolicy.NEW,
            discard_new_per_subject=True,
            max_msgs_per_subject=self.s.webhook_queue,
            max_age=self.s.webhook_max_age_s + STREAM_AGE_MARGIN_S,
        )

    async def stream(self) -> JetStreamContext:
        """The JetStream context, once the stream is in place (created or updated here)."""
        if self._js is not None:
            return self._js
        js = self.rt.nc.jetstream()
        owned = ("subjects", "max_msgs_per_subject", "max_age")
        await ensure_stream(js, self.stream_config(), owned, replicas=self.s.jetstream_replicas)
        self._js = js
        return js

    def forget_stream(self) -> None:
        """Check (and make) the stream again next time: a server may have lost its store."""
        self._js = None

    async def submit(self, rule: Rule, body: bytes) -> bool:
        """Store one delivery (the event's JSON); False (and counted) when it could not be."""
        delivery = uuid.uuid4().hex
        # Nats-Msg-Id: a publish retried by the client after a lost ack is stored once.
        headers = {"Nats-Msg-Id": delivery, DELIVERY_HEADER: delivery}
        try:
            js = await self.stream()
            await js.publish(
                self.rt.subjects.webhooks(rule.name), body, timeout=5.0, headers=headers
            )
        except Exception as exc:  # JetStream away, or the rule's queue is full
            self.forget_stream()
            full = "maximum messages per subject" in str(exc)
            self.drop("queue_full" if full else "not_stored", rule.name, repr(exc))
            return False
        return True

    async def close(self, grace_s: float = 2.0) -> None:
        """Let a POST in flight finish briefly, then stop; what is not acked stays pending."""
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=grace_s)
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None
