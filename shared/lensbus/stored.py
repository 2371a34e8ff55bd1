"""Publishing results that the results stream must store, through a node's failure.

A plain publish is stored by the stream that listens on its subject, or lost without a word
when that stream has no leader: on a cluster, the seconds JetStream needs to elect a new one
after the leader's node dies (~5 s measured: ``tests/test_cluster.py``). With
``results_acked`` on, inference and analytics publish each result as a JetStream publish
and wait for the stream's acknowledgement in the background (the worker never waits): one
that is not acknowledged is published again with the same ``Nats-Msg-Id``, which the stream
stores once (its duplicate window, two minutes by default, is far longer than the retries).
Live subscribers see a result published again twice; the seq in it tells them apart.

Bounded: at most ``max_pending`` results wait for their acknowledgement; beyond that a result
is published plainly (counted as ``backlog``), so a stream that stops answering cannot grow
the service's memory.
"""

from __future__ import annotations

import asyncio
import logging
import time

import nats.errors
from nats.aio.client import Client as NATS
from nats.js.errors import NoStreamResponseError
from prometheus_client import Counter

from lensbus.logs import RateLimit, log_limited

log = logging.getLogger(__name__)

STORE_OUTCOMES = Counter(
    "lensbus_results_store_total",
    "Acknowledged result publishes by outcome (stored, duplicate, retried, gave_up, "
    "no_stream, backlog)",
    ["outcome"],
)
MSG_ID = "Nats-Msg-Id"
# With no stream on the subject at all the answer is "no responders" at once; during an
# election it can be too, so it is tried again, but only this long.
NO_STREAM_S = 5.0


def result_msg_id(camera: str, seq: int, capture_ns: int) -> str:
    """One id per frame's result: seq restarts with capture, the capture time does not."""
    return f"{camera}.{seq}.{capture_ns}"


class StoredPublisher:
    """Publishes and makes sure the stream stored it (see the module's doc)."""

    def __init__(
        self,
        nc: NATS,
        *,
        ack_timeout_s: float = 2.0,
        give_up_s: float = 30.0,
        max_pending: int = 256,
        no_stream_s: float = NO_STREAM_S,
    ) -> None:
        self.js = nc.jetstream()
        self.nc = nc
        self.ack_timeout_s = ack_timeout_s
        self.give_up_s = give_up_s
        self.max_pending = max_pending
        self.no_stream_s = no_stream_s
        self.pending: set[asyncio.Task[None]] = set()
        self._limit = RateLimit()

    async def publish(self, subject: str, data: bytes, msg_id: str) -> None:
        """Publish now; the acknowledgement is awaited (and the publish retried) in a task."""
        if len(self.pending) >= self.max_pending:
            STORE_OUTCOMES.labels("backlog").inc()
            await self.nc.publish(subject, data)
            return
        task = asyncio.create_task(self._store(subject, data, msg_id))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _store(self, subject: str, data: bytes, msg_id: str) -> None:
        start = time.monotonic()
        delay = 0.1
        while True:
            try:
                ack = await self.js.publish(
                    subject, data, timeout=self.ack_timeout_s, headers={MSG_ID: msg_id}
                )
            except NoStreamResponseError as exc:
                if self._give_up(start, self.no_stream_s, "no_stream", exc):
                    return
            except (TimeoutError, nats.errors.Error) as exc:
                # A timeout, the stream's API error during an election, a connection
                # reconnecting or draining, a full outbound buffer: all worth another try.
                if self._give_up(start, self.give_up_s, "gave_up", exc):
                    return
            else:
                STORE_OUTCOMES.labels("duplicate" if ack.duplicate else "stored").inc()
                return
            STORE_OUTCOMES.labels("retried").inc()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _give_up(self, start: float, limit_s: float, outcome: str, exc: BaseException) -> bool:
        if time.monotonic() - start < limit_s:
            return False
        STORE_OUTCOMES.labels(outcome).inc()
        log_limited(
            log,
            self._limit,
            outcome,
            logging.WARNING,
            "a result was not stored after %.0f s (%s): %s",
            limit_s,
            outcome,
            str(exc) or type(exc).__name__,
        )
        return True

    async def close(self, timeout_s: float = 5.0) -> None:
        """Wait a little for the acknowledgements still due, then drop them."""
        if not self.pending:
            return
        _, late = await asyncio.wait(set(self.pending), timeout=timeout_s)
        for task in late:
            task.cancel()


class ResultSender:
    """How a service sends its results: a plain publish, or (``acked``) one the results
    stream acknowledges, retried until it does (:class:`StoredPublisher`)."""

    def __init__(self, nc: NATS, acked: bool) -> None:
        self.nc = nc
        self.stored = StoredPublisher(nc) if acked else None

    async def send(self, subject: str, data: bytes, camera: str, seq: int, capture_ns: int) -> None:
        if self.stored is None:
            await self.nc.publish(subject, data)
        else:
            await self.stored.publish(subject, data, result_msg_id(camera, seq, capture_ns))

    async def close(self) -> None:
        if self.stored is not None:
            await self.stored.close()
