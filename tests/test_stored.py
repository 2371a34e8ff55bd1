"""``lensbus.stored``: results published so the results stream stores each once (real
nats-server; the node-failure case is tests/test_cluster.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats as nats_py
import pytest
from nats.aio.client import Client as NATS
from nats.js import api

from lensbus.natsserver import NatsServer
from lensbus.stored import STORE_OUTCOMES, StoredPublisher, result_msg_id

SUBJECT = "stored.results.cam1"


def outcome(name: str) -> float:
    return STORE_OUTCOMES.labels(name)._value.get()


async def until(cond, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.fixture
async def nc(fresh_nats: NatsServer) -> AsyncIterator[NATS]:
    conn = await nats_py.connect(fresh_nats.url)
    yield conn
    await conn.close()


async def test_each_result_is_stored_once_even_when_sent_twice(nc: NATS) -> None:
    js = nc.jetstream()
    await js.add_stream(api.StreamConfig(name="STORED", subjects=["stored.results.*"]))
    pub = StoredPublisher(nc)
    stored, dup = outcome("stored"), outcome("duplicate")
    for seq in range(4):
        await pub.publish(SUBJECT, b"r%d" % seq, result_msg_id("cam1", seq, 99))
    await pub.publish(SUBJECT, b"r0", result_msg_id("cam1", 0, 99))  # a retry's twin
    await until(lambda: not pub.pending)
    assert (await js.stream_info("STORED")).state.messages == 4
    assert outcome("stored") - stored == 4
    assert outcome("duplicate") - dup == 1
    await pub.close()


async def test_no_stream_is_given_up_and_counted(nc: NATS) -> None:
    pub = StoredPublisher(nc, no_stream_s=0.3)
    before, retried = outcome("no_stream"), outcome("retried")
    await pub.publish("stored.nowhere.cam1", b"r", result_msg_id("cam1", 1, 1))
    await until(lambda: not pub.pending)
    assert outcome("no_stream") - before == 1
    assert outcome("retried") - retried >= 1  # tried again before giving up


async def test_beyond_max_pending_a_result_goes_out_plainly(nc: NATS) -> None:
    got: list[bytes] = []

    async def on_msg(msg) -> None:  # type: ignore[no-untyped-def]
        got.append(msg.data)

    await nc.subscribe(SUBJECT, cb=on_msg)
    pub = StoredPublisher(nc, max_pending=0, no_stream_s=0.1)
    before = outcome("backlog")
    await pub.publish(SUBJECT, b"plain", result_msg_id("cam1", 2, 2))
    await until(lambda: got == [b"plain"])
    assert outcome("backlog") - before == 1
    assert not pub.pending
