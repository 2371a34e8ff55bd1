"""nats-server faults under a running pipeline: SIGKILL and restart on the same port and
JetStream folder, and SIGSTOP for 5 s (every connection stalls) then SIGCONT."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from chaos_kit import Pipeline, record, until

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

RECONNECT_BOUND_S = 15.0  # loose: measured 1-3 s on a busy 2-core machine
STOP_S = 5.0  # how long the server is frozen (the fault itself, not a wait for an event)


async def test_nats_server_sigkill_and_restart(pipeline: Pipeline) -> None:
    p = pipeline
    await until(lambda: len(p.witness.seen) >= 6, 60, "six results before the kill")
    before = await p.stream.read()
    assert p.server.proc is not None
    p.server.kill()
    killed = time.monotonic()
    p.server.start()  # same port, same JetStream folder
    restarted = time.monotonic()
    back = await until(p.all_healthy, RECONNECT_BOUND_S, "every service healthy again")
    stored = await p.stored_grows(RECONNECT_BOUND_S, "a result stored after the restart")
    await until(lambda: p.witness.since(restarted) >= 8, 60, "eight results after the restart")
    unstored, vanished, now = await p.lost(before)
    published = p.procs["inference"].metric("lensbus_inference_results_published_total")
    record(
        "nats-server SIGKILL + restart",
        down_s=round(restarted - killed, 2),
        healthy_after_s=round(back, 2),
        first_stored_after_s=round(stored, 2),
        stored_before=len(before.digests),
        stored_lost=vanished,
        routed_not_stored=unstored,
        published_not_stored=int(published) - len(now.digests),
    )
    assert vanished == 0, f"stored results lost: holes {now.holes[:20]}"
    assert unstored == 0, "results NATS routed are missing from the stream"
    for name, sp in p.procs.items():
        assert sp.metric("lensbus_nats_disconnects_total") >= 1, f"{name} saw no disconnect"
        assert sp.metric("lensbus_nats_reconnects_total") >= 1, f"{name} did not reconnect"
        assert sp.metric("lensbus_nats_connected") == 1, name


async def test_nats_server_sigstop_5s(pipeline: Pipeline) -> None:
    p = pipeline
    await until(lambda: len(p.witness.seen) >= 6, 60, "six results before the stop")
    before = await p.stream.read()
    assert p.server.proc is not None
    pid = p.server.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(STOP_S)
    finally:
        os.kill(pid, signal.SIGCONT)
    resumed = time.monotonic()
    back = await until(p.all_healthy, RECONNECT_BOUND_S, "every service healthy again")
    stored = await p.stored_grows(RECONNECT_BOUND_S, "a result stored after SIGCONT")
    await until(lambda: p.witness.since(resumed) >= 8, 60, "eight results after SIGCONT")
    unstored, vanished, now = await p.lost(before)
    for name, sp in p.procs.items():
        assert sp.returncode is None, f"{name} exited:\n{sp.log_tail(30)}"
    inf = p.procs["inference"]
    times = [when for when, _ in p.witness.seen]
    gap = max(b - a for a, b in zip(times, times[1:], strict=False))
    published = p.procs["inference"].metric("lensbus_inference_results_published_total")
    disconnects = {n: sp.metric("lensbus_nats_disconnects_total") for n, sp in p.procs.items()}
    record(
        "nats-server SIGSTOP 5 s",
        healthy_after_s=round(back, 2),
        first_stored_after_s=round(stored, 2),
        stored_lost=vanished,
        routed_not_stored=unstored,
        published_not_stored=int(published) - len(now.digests),
        longest_gap_s=round(gap, 2),
        disconnects=disconnects,
        inference_stale=inf.metric("lensbus_inference_frames_dropped_total", 'reason="stale"'),
    )
    assert vanished == 0, f"stored results lost: holes {now.holes[:20]}"
    assert unstored == 0, "results NATS routed are missing from the stream"
    # The freeze really happened (results stopped for about its length); a 5 s freeze is
    # shorter than the clients' ping timeout, so nothing disconnects: the frames queued
    # meanwhile reach inference at once and all but the newest are dropped as stale.
    assert gap >= STOP_S * 0.8, f"results never stopped (longest gap {gap:.1f} s)"
