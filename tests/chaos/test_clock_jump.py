"""The wall clock of every service jumps one hour forward, then one hour back (libfaketime,
its offset read from a file on every call; monotonic clocks untouched): heartbeats are not
taken for stale, the camera is not forgotten, results keep being stored."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from chaos_kit import (
    CAMERA,
    FAKETIME_LIB,
    YOLO,
    Pipeline,
    Services,
    Stream,
    Witness,
    faketime_env,
    healthy,
    record,
    until,
)
from photos import photos

from lensbus.codec import decode
from lensbus.natsserver import NatsServer
from lensbus.schemas import Result
from lensbus.subjects import RESULTS_STREAM

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


@pytest.fixture
async def faked(
    tmp_path: Path, services: Services, demo_models: dict[str, Path]
) -> AsyncIterator[tuple[Pipeline, Path]]:
    if not FAKETIME_LIB.is_file():
        pytest.skip("Debian package faketime (libfaketime) is not installed")
    stamp = tmp_path / "faketime"
    stamp.write_text("+0\n")
    server = NatsServer(tmp_path / "nats", log_file=tmp_path / "nats.log").start()
    witness = await Witness().start(server.url)
    stream = await Stream(server.url).connect()
    p = Pipeline(server, services, witness, stream, demo_models[YOLO], photos(tmp_path), tmp_path)
    try:
        for name in ("publisher", "inference", "capture"):
            p.start(name, env=faketime_env(stamp))
        for sp in p.procs.values():
            healthy(sp)
        await p.stored_grows(60, "the first stored result")
        yield p, stamp
    finally:
        await witness.close()
        await stream.close()
        services.close()
        server.kill()


def status_ok(p: Pipeline) -> tuple[bool, list[str]]:
    """Every service in the publisher's /api/status, none stale; the camera listed."""
    pub = p.procs["publisher"]
    statuses = json.loads(pub.http("/api/status")[1])
    cameras = json.loads(pub.http("/api/cameras")[1])
    items = statuses if isinstance(statuses, list) else statuses.get("services", [])
    stale = [f"{s['service']}:{s.get('age_s')}" for s in items if s.get("stale")]
    services = {s["service"] for s in items}
    ids = [c.get("id") for c in (cameras if isinstance(cameras, list) else cameras["cameras"])]
    ok = not stale and {"inference", "capture"} <= services and CAMERA in ids
    return ok, stale


@pytest.mark.parametrize("jump", ["+3600", "-3600"])
async def test_wall_clock_jump(faked: tuple[Pipeline, Path], jump: str) -> None:
    p, stamp = faked
    await until(lambda: status_ok(p)[0], 30, "every service listed, none stale")
    before = await p.stream.read()
    stamp.write_text(f"{jump}\n")
    jumped = time.monotonic()
    stale_seen: list[str] = []

    def still_fine() -> bool:
        ok, stale = status_ok(p)
        stale_seen.extend(stale)
        return p.witness.since(jumped) >= 12

    await until(still_fine, 60, "results after the jump")
    stored = await p.stored_grows(15, "results stored after the jump")
    # The jump took: the newest stored result carries the services' jumped wall clock.
    last = await p.stream.nc.jetstream().get_last_msg(RESULTS_STREAM, f"lensbus.results.{CAMERA}")
    skew = decode(last.data, Result).result_ns / 1e9 - time.time()
    unstored, vanished, now = await p.lost(before)
    record(
        f"wall clock {jump} s",
        clock_skew_s=round(skew),
        stale_reports=len(stale_seen),
        first_stored_after_s=round(stored, 2),
        stored_lost=vanished,
        routed_not_stored=unstored,
    )
    assert abs(skew - int(jump)) < 60, f"the clock did not jump ({skew:.0f} s off)"
    assert not stale_seen, f"services taken for stale after the jump: {stale_seen[:5]}"
    assert status_ok(p)[0]
    assert vanished == 0 and unstored == 0
