"""Fuzzing the publisher: frames, results and heartbeats on NATS, and `camera.*`/`state.*`
records in the cameras bucket, all hostile, sent to a real publisher process; every reject
counted by its reason, the rest taken, the process serving with its memory bounded, and a
real result still reaches the page's API afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field

import nats as nats_py
import pytest
from fuzz_payloads import STATUS, camera_config, camera_state, frames, hostile, result
from fuzz_probe import (
    Tally,
    assert_serving,
    check_rejects,
    delta,
    expected_reason,
    fuzz_settings,
    memory,
    metric_sum,
    rejects,
    wait_for,
)
from hypothesis import given
from hypothesis import strategies as st
from nats.js.errors import BadRequestError

from lensbus import Subjects, encode
from lensbus.cameras import CAMERA_PREFIX, STATE_PREFIX, bind
from lensbus.codec import decode
from lensbus.errors import DecodeError, InvalidName
from lensbus.natsserver import NatsServer
from lensbus.processes import ServiceProcess
from lensbus.schemas import CameraConfig, CameraState, FrameEnvelope, ModelRef, Result, Status

CAMERAS = ("fa", "fb", "fc")  # a few, well under max_cameras: the fuzz is not a flood
TAKEN = ("lensbus_publisher_frames_received_total", "lensbus_publisher_results_received_total")
S = Subjects()
OTHER = S.status("fuzz", "f1")


def on_camera(data: bytes, schema: type[FrameEnvelope] | type[Result], camera: str) -> str | None:
    """The reason the publisher refuses a frame or result on ``camera``'s subject."""
    reason = expected_reason(data, schema)
    if reason is None and decode(data, schema).camera != camera:
        return "camera_mismatch"
    return reason


def kv_reason(key: str, data: bytes) -> str | None:
    """The reason a cameras-bucket record is skipped (an empty value is a delete)."""
    if not data:
        return None
    schema = CameraConfig if key.startswith(CAMERA_PREFIX) else CameraState
    reason = expected_reason(data, schema)
    if reason is None:
        value = decode(data, schema)
        named = value.id if isinstance(value, CameraConfig) else value.camera
        if key.split(".", 1)[1] != named:
            return DecodeError.reason  # a record under another camera's key
    return reason


NATS_MESSAGE = st.one_of(
    st.tuples(st.just("frame"), st.sampled_from(CAMERAS), frames(cameras=CAMERAS)),
    st.tuples(st.just("result"), st.sampled_from(CAMERAS), hostile(result(CAMERAS))),
    # A heartbeat on its own subject, or on another instance's.
    st.tuples(st.just("status"), st.sampled_from(("own", "other")), hostile(STATUS)),
)
POOL = st.sampled_from(CAMERAS)
KV_RECORD = st.one_of(
    st.tuples(POOL.map(CAMERA_PREFIX.__add__), hostile(camera_config(POOL))),
    st.tuples(POOL.map(STATE_PREFIX.__add__), hostile(camera_state(POOL))),
)


@dataclass
class Batch:
    nats: list[tuple[str, str, bytes]]
    kv: list[tuple[str, bytes]]
    tally: Tally = field(default_factory=Tally)
    # Heartbeats and good records that pass leave no counter: the oracle's count stands in.
    silent: int = 0

    def expect(self) -> None:
        for kind, camera, data in self.nats:
            if kind == "status":
                reason = expected_reason(data, Status)
                if reason is None and self.subject(kind, camera, data) == OTHER:
                    reason = "subject_mismatch"
                self.tally.add(reason)
                self.silent += reason is None
            else:
                self.tally.add(
                    on_camera(data, FrameEnvelope if kind == "frame" else Result, camera)
                )

    def subject(self, kind: str, camera: str, data: bytes) -> str:
        if kind == "status":
            if camera == "own" and expected_reason(data, Status) is None:
                status = decode(data, Status)
                with contextlib.suppress(InvalidName):
                    return S.status(status.service, status.instance)
            return OTHER
        return S.frames(camera) if kind == "frame" else S.results(camera)


async def fire(pub: ServiceProcess, url: str, batch: Batch) -> None:
    batch.expect()
    before = rejects(pub)
    taken = sum(metric_sum(pub, name) for name in TAKEN)
    nc = await nats_py.connect(url)
    try:
        kv = await bind(nc.jetstream())
        for kind, camera, data in batch.nats:
            await nc.publish(batch.subject(kind, camera, data), data)
        for key, data in batch.kv:
            try:
                await kv.put(key, data)
            except BadRequestError:  # over the bucket's value size: the server refuses it
                continue
            batch.tally.add(kv_reason(key, data))
            batch.silent += kv_reason(key, data) is None
        await nc.flush()
    finally:
        await nc.close()

    def passed() -> float:
        return sum(metric_sum(pub, name) for name in TAKEN) - taken + batch.silent

    def settled() -> bool:
        return sum(delta(rejects(pub), before).values()) + passed() >= batch.tally.sent

    try:
        await wait_for(settled, 30, f"{batch.tally.sent} messages accounted for")
    except AssertionError:
        got = delta(rejects(pub), before)
        raise AssertionError(f"not all counted: {got}, passed {passed()}, {batch.tally}") from None
    check_rejects(delta(rejects(pub), before), batch.tally, passed(), set())
    assert_serving(pub)


async def watching(pub: ServiceProcess, url: str) -> None:
    """Once the publisher watches the cameras bucket, every record put is one it sees: a
    bad record is put until one is counted."""
    nc = await nats_py.connect(url)
    try:
        kv = await bind(nc.jetstream())
        before = rejects(pub).get("malformed", 0)

        def counted() -> bool:
            return rejects(pub).get("malformed", 0) > before

        for _ in range(100):
            await kv.put(CAMERA_PREFIX + "primer", b"not msgpack")
            try:
                await wait_for(counted, 0.5, "the primer")
                await kv.delete(CAMERA_PREFIX + "primer")
                return
            except AssertionError:
                continue
        raise AssertionError("the publisher never read the cameras bucket")
    finally:
        await nc.close()


async def real_result(pub: ServiceProcess, url: str) -> None:
    """A good result for a camera reaches the page's API."""
    res = Result(
        camera="real",
        seq=7,
        capture_ns=time.time_ns(),
        result_ns=time.time_ns(),
        width=640,
        height=480,
        model=ModelRef(name="m", version="1"),
        task="detection",
    )
    nc = await nats_py.connect(url)
    try:
        await nc.publish(S.results("real"), encode(res))
        await nc.flush()
    finally:
        await nc.close()

    def seen() -> bool:
        code, body = pub.http("/api/cameras", 10.0)
        return code == 200 and "real" in json.loads(body).__repr__()

    await wait_for(seen, 20, "the real camera on /api/cameras")


@pytest.mark.slow
# A failing batch is printed whole, however long (random bytes, deep msgpack).
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
def test_hostile_messages_and_records(nats: NatsServer, start_service) -> None:
    # Cameras forgotten after a silence take their counters with them; the fuzz counts on
    # them, so nothing here is forgotten (forgetting has its own tests).
    pub = start_service("publisher", nats.url, camera_forget_s=86400)
    pub.wait_healthy(30)
    asyncio.run(watching(pub, nats.url))
    warm = memory(pub.pid)

    @fuzz_settings()
    @given(st.lists(NATS_MESSAGE, min_size=8, max_size=30), st.lists(KV_RECORD, max_size=6))
    def batches(messages: list[tuple[str, str, bytes]], records: list[tuple[str, bytes]]) -> None:
        asyncio.run(fire(pub, nats.url, Batch(messages, records)))

    batches()
    asyncio.run(real_result(pub, nats.url))
    peak = memory(pub.pid)
    assert peak.hwm_mb - warm.hwm_mb < 150, f"peak RSS {warm.hwm_mb:.0f} -> {peak.hwm_mb:.0f} MB"
    assert_serving(pub)
    assert pub.stop() == 0
