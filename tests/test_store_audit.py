"""The publisher's audit of the results stream (pure logic; the real store-full case is in
tests/chaos/test_store_full.py)."""

from __future__ import annotations

import asyncio

from lensbus_publisher.store_audit import StoreAudit


def test_a_message_in_flight_at_one_audit_is_not_counted() -> None:
    audit = StoreAudit()
    audit.check(seen=0, last_seq=100)  # the first audit sets the base
    assert audit.check(seen=10, last_seq=109) == 0  # one seen, not yet stored
    assert audit.check(seen=20, last_seq=120) == 0  # it was stored after all
    assert audit.not_stored == 0


def test_messages_missing_at_two_audits_in_a_row_are_counted_once() -> None:
    audit = StoreAudit()
    audit.check(seen=0, last_seq=0)
    assert audit.check(seen=10, last_seq=3) == 0  # 7 short: maybe in flight
    assert audit.check(seen=20, last_seq=3) == 7  # still short (now 17): 7 confirmed
    assert audit.check(seen=25, last_seq=8) == 10  # 17 short again: 10 more
    assert audit.check(seen=30, last_seq=13) == 0  # stored again: nothing new
    assert audit.check(seen=35, last_seq=18) == 0
    assert audit.not_stored == 17


def test_a_stream_made_again_starts_a_new_count() -> None:
    audit = StoreAudit()
    audit.check(seen=0, last_seq=50)
    audit.check(seen=10, last_seq=60)
    audit.check(seen=20, last_seq=60)  # 10 short
    audit.check(seen=25, last_seq=60)  # 15 short: 10 of them twice in a row
    assert audit.not_stored == 10
    assert audit.check(seen=25, last_seq=2) == 0  # the sequence went back: a new stream
    assert audit.not_stored == 0
    assert audit.check(seen=30, last_seq=7) == 0
    assert audit.check(seen=35, last_seq=12) == 0


async def test_a_result_published_again_with_its_msg_id_is_counted_once(fresh_nats) -> None:
    """``results_acked`` publishes a result again when its acknowledgement is late: the
    stream stores it once (Nats-Msg-Id), so the audit must count it once too (it counted it
    twice, and raised "not stored" alarms during exactly the failover acks are for)."""
    import nats as nats_py
    from nats.js import api

    from lensbus.stored import MSG_ID

    nc = await nats_py.connect(fresh_nats.url)
    try:
        js = nc.jetstream()
        await js.add_stream(api.StreamConfig(name="AUDIT", subjects=["audit.results.*"]))
        audit = StoreAudit()
        await audit.start(nc, ["audit.results.*"])
        audit.check(audit.seen, (await js.stream_info("AUDIT")).state.last_seq)
        for seq in range(5):
            for _ in range(2):  # the first publish and its retry
                await js.publish("audit.results.cam1", b"r", headers={MSG_ID: f"cam1.{seq}.7"})
        await js.publish("audit.results.cam1", b"plain")  # no id: counted as before
        await nc.flush()
        last = (await js.stream_info("AUDIT")).state.last_seq
        assert last == 6  # stored once each
        await nc.flush()
        deadline = asyncio.get_running_loop().time() + 10
        while audit.seen < 6 or any(sub.pending_msgs for sub in audit._subs):
            assert asyncio.get_running_loop().time() < deadline, audit.seen
            await asyncio.sleep(0.01)
        assert audit.seen == 6
        assert audit.check(audit.seen, last) == 0
        assert audit.check(audit.seen, last) == 0 and audit.not_stored == 0
        await audit.stop()
    finally:
        await nc.close()
