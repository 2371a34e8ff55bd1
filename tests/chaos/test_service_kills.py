"""SIGKILL of inference and of capture, each restarted by the test as a supervisor would:
the other services carry on (capture keeps publishing while inference is down) and results
resume, with nothing stored lost."""

from __future__ import annotations

import time

import pytest
from chaos_kit import CAMERA, Pipeline, record, until

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

RESTART_BOUND_S = 60.0  # loose: a cold inference start (ONNX load, warm-up) on 2 busy cores

FRAMES = f'camera="{CAMERA}"'


async def test_inference_sigkill(pipeline: Pipeline) -> None:
    p = pipeline
    cap, inf = p.procs["capture"], p.procs["inference"]
    await until(lambda: len(p.witness.seen) >= 4, 60, "results before the kill")
    before = await p.stream.read()
    inf.kill()
    killed = time.monotonic()
    published = cap.metric("lensbus_capture_frames_published_total", FRAMES)
    # While inference is down capture keeps publishing (nothing waits on a consumer).
    await until(
        lambda: cap.metric("lensbus_capture_frames_published_total", FRAMES) >= published + 4,
        30,
        "capture publishing with inference down",
    )
    assert p.procs["publisher"].healthy() and cap.healthy()
    inf.start()
    restarted = time.monotonic()
    back = await until(inf.healthy, RESTART_BOUND_S, "inference healthy again")
    stored = await p.stored_grows(RESTART_BOUND_S, "a result stored after the restart")
    await until(lambda: p.witness.since(restarted) >= 4, 60, "results after the restart")
    unstored, vanished, now = await p.lost(before)
    record(
        "inference SIGKILL",
        down_s=round(restarted - killed, 2),
        healthy_after_s=round(back, 2),
        first_stored_after_s=round(back + stored, 2),
        stored_lost=vanished,
        routed_not_stored=unstored,
        capture_dropped=cap.metric("lensbus_capture_frames_dropped_total", FRAMES),
    )
    assert vanished == 0, f"stored results lost: holes {now.holes[:20]}"
    assert unstored == 0, "results NATS routed are missing from the stream"
    assert cap.returncode is None and p.procs["publisher"].returncode is None


async def test_capture_sigkill(pipeline: Pipeline) -> None:
    p = pipeline
    cap, inf = p.procs["capture"], p.procs["inference"]
    await until(lambda: len(p.witness.seen) >= 4, 60, "results before the kill")
    before = await p.stream.read()
    cap.kill()
    killed = time.monotonic()
    # Inference and the publisher stay up and healthy without frames.
    assert inf.healthy() and p.procs["publisher"].healthy()
    cap.start()
    restarted = time.monotonic()
    back = await until(cap.healthy, RESTART_BOUND_S, "capture healthy again")
    stored = await p.stored_grows(RESTART_BOUND_S, "a result stored after the restart")
    await until(lambda: p.witness.since(restarted) >= 4, 60, "results after the restart")
    unstored, vanished, now = await p.lost(before)
    record(
        "capture SIGKILL",
        down_s=round(restarted - killed, 2),
        healthy_after_s=round(back, 2),
        first_stored_after_s=round(back + stored, 2),
        stored_lost=vanished,
        routed_not_stored=unstored,
        inference_disconnects=inf.metric("lensbus_nats_disconnects_total"),
    )
    assert vanished == 0, f"stored results lost: holes {now.holes[:20]}"
    assert unstored == 0, "results NATS routed are missing from the stream"
    assert inf.returncode is None and p.procs["publisher"].returncode is None
    assert inf.metric("lensbus_nats_disconnects_total") == 0
