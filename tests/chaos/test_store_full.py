"""The JetStream store full: nats-server may use only a few MB of disk (``max_file_store``)
and another stream fills it. Inference keeps serving live results over core NATS; results
are stored again once the space comes back (the filler purged)."""

from __future__ import annotations

import time
from pathlib import Path

import nats as nats_py
import pytest
from chaos_kit import YOLO, Services, SmallStoreServer, record, running_pipeline, until
from nats.js import api
from photos import photos

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

STORE_BYTES = 8 * 1024 * 1024
RESULTS_BYTES = 2 * 1024 * 1024  # the results stream's own limit, within the store
FILL = "CHAOS_FILL"
BACK_BOUND_S = 15.0
AUDIT_BOUND_S = 20.0  # the publisher audits its stream every 5 s
NOT_STORED = "lensbus_publisher_results_not_stored_total"


async def fill(url: str) -> int:
    """Publish into a stream with no limit of its own until JetStream refuses: bytes put."""
    nc = await nats_py.connect(url)
    try:
        js = nc.jetstream(timeout=5)
        await js.add_stream(
            api.StreamConfig(name=FILL, subjects=["chaos.fill"], storage=api.StorageType.FILE)
        )
        put, blob = 0, b"x" * (256 * 1024)
        while put < 4 * STORE_BYTES:
            try:
                await js.publish("chaos.fill", blob)
            except Exception:  # insufficient resources: the store is full
                return put
            put += len(blob)
        raise AssertionError(f"JetStream took {put} bytes beyond max_file_store")
    finally:
        await nc.close()


async def purge(url: str) -> None:
    nc = await nats_py.connect(url)
    try:
        await nc.jetstream().purge_stream(FILL)
    finally:
        await nc.close()


async def test_store_full_then_space_back(
    tmp_path: Path, services: Services, demo_models: dict[str, Path]
) -> None:
    server = SmallStoreServer(
        tmp_path / "nats", STORE_BYTES, log_file=tmp_path / "nats.log"
    ).start()
    async with running_pipeline(
        server,
        services,
        demo_models[YOLO],
        photos(tmp_path),
        tmp_path,
        # Streams with a byte limit reserve it in the store: keep the publisher's small.
        stream_max_bytes=RESULTS_BYTES,
        snapshots_max_bytes=RESULTS_BYTES,
    ) as p:
        filled = await fill(server.url)
        full_at = time.monotonic()
        stored_then = await p.stream.last_seq()
        await until(lambda: p.witness.since(full_at) >= 6, 60, "live results with the store full")
        stored_full = await p.stream.last_seq() - stored_then
        assert all(sp.returncode is None for sp in p.procs.values())
        pub = p.procs["publisher"]
        # The publisher's audit notices within two of its rounds, and says so on /healthz.
        told = await until(
            lambda: "not stored" in pub.http("/healthz", 3.0)[1],
            AUDIT_BOUND_S,
            "the publisher's /healthz naming results not stored",
        )
        await purge(server.url)
        back = await p.stored_grows(BACK_BOUND_S, "results stored once space is back")
        unstored, vanished, now = await p.lost()
        counted = await until(
            lambda: pub.metric(NOT_STORED) >= unstored, AUDIT_BOUND_S, "results counted not stored"
        )
        record(
            "JetStream store full",
            filler_bytes=filled,
            live_results_while_full=p.witness.since(full_at),
            stored_while_full=stored_full,
            stored_again_after_s=round(back, 2),
            unstored_results=unstored,
            counted_not_stored=pub.metric(NOT_STORED),
            told_on_healthz_after_s=round(told, 2),
            counted_after_s=round(counted, 2),
        )
        # The fault really happened: nothing was stored while the store was full; the
        # publisher's audit counted exactly those the stream lacks (no rules: no events).
        assert stored_full == 0, f"{stored_full} results stored with the store full"
        assert unstored > 0
        assert pub.metric(NOT_STORED) == unstored
        assert vanished == 0, f"stored results lost: holes {now.holes[:20]}"
