"""The publisher's audit of the results stream (pure logic; the real store-full case is in
tests/chaos/test_store_full.py)."""

from __future__ import annotations

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
