"""Fuzzing inference: frames and model frames (envelopes with random and mutated fields,
random bytes, truncated, bit-flipped and bomb JPEGs) published to a real inference process
with a real model; every reject counted by its reason, none as `model_error`, the process
serving with its memory bounded, and a real photo still gives the right result afterwards."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import nats as nats_py
import pytest
from fuzz_payloads import frames
from fuzz_probe import (
    Tally,
    assert_serving,
    check_rejects,
    delta,
    frame_verdict,
    fuzz_settings,
    memory,
    metric_sum,
    publish_all,
    rejects,
    wait_for,
)
from hypothesis import given
from hypothesis import strategies as st
from photos import PHOTOS

from lensbus import Subjects, decode, encode
from lensbus.errors import DecodeError
from lensbus.images import read_jpeg_header
from lensbus.natsserver import NatsServer
from lensbus.processes import ServiceProcess
from lensbus.schemas import FrameEnvelope, Result

YOLO = "yolov3-tiny-onnx"
MAX_BYTES = 200_000  # over the real photo (164 KB), small enough that over-size is cheap
OVERSIZE = encode(
    FrameEnvelope(camera="big", seq=0, capture_ns=0, width=1, height=1, data=b"\0" * MAX_BYTES)
)
PROCESSED = "lensbus_inference_frames_processed_total"
DROPPED = "lensbus_inference_frames_dropped_total"
_names = itertools.count()


def named(payload: bytes, camera: str) -> bytes:
    """A frame that decodes is made to name the camera of the subject it goes on (as capture
    does: a frame naming another camera is refused as ``camera_mismatch`` before its JPEG is
    looked at); what does not decode is sent as it is."""
    try:
        env = decode(payload, FrameEnvelope)
    except DecodeError:
        return payload
    return encode(env.model_copy(update={"camera": camera}))


async def fire(inf: ServiceProcess, url: str, subject_of, batch: list[bytes]) -> None:
    """One batch, each message on a camera subject of its own (the mailbox then keeps them
    all: none is dropped as stale), then every message accounted for."""
    tally = Tally()
    sends = []
    for payload in batch:
        camera = f"fz{next(_names)}"
        payload = named(payload, camera)
        tally.add(frame_verdict(payload, MAX_BYTES).reason)
        sends.append((subject_of(camera), payload))
    before, done = rejects(inf), metric_sum(inf, PROCESSED)
    dropped = metric_sum(inf, DROPPED)
    await publish_all(url, sends)

    def settled() -> bool:
        got = delta(rejects(inf), before)
        return sum(got.values()) + metric_sum(inf, PROCESSED) - done >= len(batch)

    await wait_for(settled, 60, f"{len(batch)} frames accounted for")
    passed = metric_sum(inf, PROCESSED) - done
    assert metric_sum(inf, DROPPED) == dropped
    check_rejects(delta(rejects(inf), before), tally, passed, {"corrupt_image", "size_mismatch"})
    assert passed <= tally.may_pass
    assert_serving(inf)


async def real_photo_result(url: str, subject: str, seq: int) -> Result:
    """A real photo as a frame: its result."""
    data = (PHOTOS / "dog.jpg").read_bytes()
    head = read_jpeg_header(data)
    env = FrameEnvelope(
        camera="real",
        seq=seq,
        capture_ns=time.time_ns(),
        width=head.width,
        height=head.height,
        data=data,
    )
    nc = await nats_py.connect(url)
    try:
        sub = await nc.subscribe(Subjects().results("real"))
        await nc.publish(subject, encode(env))
        while True:
            result = decode((await sub.next_msg(60)).data, Result)
            if result.seq == seq:
                return result
    finally:
        await nc.close()


@pytest.mark.slow
# A failing batch is printed whole, however long (random bytes, deep msgpack).
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
@pytest.mark.parametrize("stream", ["device", "model"])
def test_hostile_frames(
    nats: NatsServer, start_service, demo_models: dict[str, Path], stream: str
) -> None:
    if YOLO not in demo_models or not PHOTOS.is_dir():
        pytest.skip("needs the YOLOv3-tiny demo package and Debian's darknet photos")
    inf = start_service(
        "inference", nats.url, model=demo_models[YOLO], stream=stream, max_frame_bytes=MAX_BYTES
    )
    inf.wait_healthy(60)
    subjects = Subjects()
    subject_of = subjects.model_frames if stream == "model" else subjects.frames
    first = asyncio.run(real_photo_result(nats.url, subject_of("real"), 1))
    warm = memory(inf.pid)

    @fuzz_settings()
    @given(st.lists(frames(stream == "model") | st.just(OVERSIZE), min_size=8, max_size=24))
    def batches(batch: list[bytes]) -> None:
        asyncio.run(fire(inf, nats.url, subject_of, batch))

    batches()
    after = asyncio.run(real_photo_result(nats.url, subject_of("real"), 2))
    assert [d.label for d in after.detections] == [d.label for d in first.detections]
    assert "dog" in {d.label for d in after.detections}
    peak = memory(inf.pid)
    assert peak.hwm_mb - warm.hwm_mb < 200, f"peak RSS {warm.hwm_mb:.0f} -> {peak.hwm_mb:.0f} MB"
    assert_serving(inf)
    assert inf.stop() == 0
