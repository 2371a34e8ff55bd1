"""Whether the results stream really stores what is published on its subjects.

Results reach the stream the way they reach every subscriber: inference publishes them on
core NATS, and JetStream stores what it can. When the store is full (the server's
``max_file_store``, a full disk, another stream that took the space) JetStream refuses
quietly: nobody is told, live subscribers still get every result, and programs that replay
later find nothing. The audit counts what it sees on the stream's subjects and compares it
with how far the stream's last sequence moved.

Each audit notes the count first, then asks for the stream's last sequence, so what was
seen has had a round trip to be stored. A message in flight can still make one audit's
difference off by one; a lost message stays missing, so only a shortfall found by two audits
in a row is counted.

A result published with ``results_acked`` (``lensbus.stored``) that is published again after
an unanswered acknowledgement arrives twice but is stored once (its ``Nats-Msg-Id``): the
audit counts each id once, among the last ``RECENT_IDS`` it saw.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from lensbus.stored import MSG_ID
from lensbus_publisher import metrics

log = logging.getLogger(__name__)
# Retries of one result come within its 30 s of retrying: 30 s of 30 fps on ~20 cameras.
RECENT_IDS = 20_000


@dataclass
class _Mark:
    seen: int  # messages seen on the stream's subjects when the mark was taken
    last_seq: int  # the stream's last sequence then


class StoreAudit:
    def __init__(self) -> None:
        self.seen = 0
        self.not_stored = 0
        self._base: _Mark | None = None  # where the counting started
        self._last_seq = 0  # at the last audit
        self._missing = 0  # the shortfall the last audit found
        self._subs: list[Subscription] = []
        self._ids: OrderedDict[str, None] = OrderedDict()

    def saw(self, msg_id: str | None) -> None:
        """Count a message on the stream's subjects (one id counted once)."""
        if msg_id is not None:
            if msg_id in self._ids:
                return
            self._ids[msg_id] = None
            if len(self._ids) > RECENT_IDS:
                self._ids.popitem(last=False)
        self.seen += 1

    async def start(self, nc: NATS, subjects: list[str]) -> None:
        async def count(msg: Msg) -> None:
            self.saw(msg.headers.get(MSG_ID) if msg.headers else None)

        self._subs = [await nc.subscribe(s, cb=count) for s in subjects]

    @property
    def started(self) -> bool:
        return bool(self._subs)

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):  # the connection may be closed already
                await sub.unsubscribe()
        self._subs = []

    def rebase(self, seen: int, last_seq: int) -> None:
        """Start counting again from here (at start, or after the stream was recreated)."""
        self._base = _Mark(seen, last_seq)
        self._last_seq, self._missing = last_seq, 0
        self.not_stored = 0

    def check(self, seen: int, last_seq: int) -> int:
        """The number of messages newly found not stored, given ``seen`` (noted before the
        stream's ``last_seq`` was asked for); 0 when none."""
        if self._base is None or last_seq < self._last_seq:
            if self._base is not None:  # the sequence went back: a new, empty stream
                log.warning("results stream started again at sequence %d", last_seq)
            self.rebase(seen, last_seq)
            return 0
        missing = (seen - self._base.seen) - (last_seq - self._base.last_seq)
        confirmed = min(missing, self._missing)
        self._last_seq, self._missing = last_seq, missing
        if confirmed <= self.not_stored:
            return 0
        new = confirmed - self.not_stored
        self.not_stored = confirmed
        metrics.RESULTS_NOT_STORED.inc(new)
        return new
