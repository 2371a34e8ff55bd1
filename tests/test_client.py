"""The consumer SDK ``lensbus.Client`` against a real nats-server and a real capture process."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import msgpack
import nats as nats_py
import numpy as np
import pytest

import lensbus
from lensbus import Subjects, encode
from lensbus.client import Client, Frame
from lensbus.images import encode_jpeg
from lensbus.natsserver import NatsServer
from lensbus.schemas import Box, Detection, FrameEnvelope, ModelRef, Result, Timings

MODEL = ModelRef(name="yolov3-tiny", version="1", framework="opencv", device="cpu")


def result(camera: str, seq: int) -> Result:
    now = time.time_ns()
    return Result(
        camera=camera,
        seq=seq,
        capture_ns=now - 30_000_000,
        result_ns=now,
        width=320,
        height=240,
        model=MODEL,
        task="detection",
        instance="test",
        detections=[
            Detection(
                label="person",
                class_id=0,
                score=0.8,
                box=Box.from_normalized(0.1, 0.1, 0.4, 0.9, 320, 240),
            )
        ],
        timings=Timings(decode=0.001, compute=0.02),
    )


@pytest.fixture
async def client(nats: NatsServer) -> AsyncIterator[Client]:
    async with Client(nats.url) as c:
        yield c


async def take(stream: AsyncIterator[Frame], n: int, timeout: float) -> list[Frame]:
    async def go() -> list[Frame]:
        out = []
        async for frame in stream:
            out.append(frame)
            if len(out) == n:
                break
        return out

    try:
        return await asyncio.wait_for(go(), timeout)
    finally:
        with contextlib.suppress(Exception):
            await stream.aclose()  # type: ignore[attr-defined]


@pytest.mark.slow
async def test_frames_and_latest_frame_from_real_capture(
    nats: NatsServer, start_service, client: Client
) -> None:
    cap = start_service(
        "capture", nats.url, camera="sdkcam", source="test", fps=10, width=320, height=240
    )
    cap.wait_healthy()
    try:
        frames = await take(client.frames("sdkcam"), 5, timeout=15)
        assert len(frames) == 5
        for f in frames:
            assert isinstance(f.image, np.ndarray)
            assert f.image.shape == (240, 320, 3) and f.image.dtype == np.uint8
            assert f.image.std() > 10  # a real picture, not a blank
            assert f.camera == "sdkcam" and (f.envelope.width, f.envelope.height) == (320, 240)
            assert f.jpeg[:2] == b"\xff\xd8"  # the JPEG as it came, for re-publishing
        seqs = [f.seq for f in frames]
        assert seqs == sorted(set(seqs)), f"seq must increase: {seqs}"
        assert frames[-1].capture_ns > frames[0].capture_ns

        t0 = time.monotonic()
        latest = await client.latest_frame("sdkcam", 5)
        assert time.monotonic() - t0 < 2.0  # 10 fps: the next frame is ~0.1 s away
        assert latest.seq > seqs[-1]
        assert latest.image.shape == (240, 320, 3)
        assert abs(time.time_ns() - latest.capture_ns) < 5e9
    finally:
        assert cap.stop() == 0
    assert client.rejected == 0


@pytest.mark.slow
async def test_slow_reader_sees_the_newest_frame(
    nats: NatsServer, start_service, client: Client
) -> None:
    cap = start_service(
        "capture", nats.url, camera="slowcam", source="test", fps=20, width=160, height=120
    )
    cap.wait_healthy()
    try:
        stream = client.frames("slowcam")
        first = await take_one(stream)
        await asyncio.sleep(1.0)  # ~20 frames arrive while we are busy
        second = await take_one(stream)
        # The mailbox of one kept only the newest: we skipped ahead, not one frame on.
        assert second.seq - first.seq >= 10, (first.seq, second.seq)
        await stream.aclose()
    finally:
        assert cap.stop() == 0


async def take_one(stream: AsyncIterator[Frame]) -> Frame:
    return await asyncio.wait_for(anext(stream), 10)


async def test_latest_frame_times_out_on_a_silent_camera(client: Client) -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await client.latest_frame("nobody-home", 0.5)
    assert 0.4 <= time.monotonic() - t0 < 3.0


async def test_frames_skip_unreadable_messages(nats: NatsServer, client: Client) -> None:
    camera = "sdkbad"
    got: list[Frame] = []

    async def consume() -> None:
        async for frame in client.frames(camera, newest_only=False):
            got.append(frame)
            if frame.seq == 3:
                return

    task = asyncio.create_task(consume())
    pub = await nats_py.connect(nats.url)
    subject = Subjects().frames(camera)
    image = np.full((48, 64, 3), 128, np.uint8)
    env = FrameEnvelope(
        camera=camera,
        seq=0,
        capture_ns=time.time_ns(),
        width=64,
        height=48,
        data=encode_jpeg(image),
    )
    try:
        await wait_subscribed(pub, subject, encode(env), lambda: bool(got))
        before = client.rejected
        await pub.publish(subject, b"garbage")
        await pub.publish(subject, encode(env.model_copy(update={"seq": 1, "data": b"nope"})))
        await pub.publish(subject, encode(env.model_copy(update={"seq": 2})))
        await pub.publish(subject, msgpack.packb({"v": 9}))
        await pub.publish(subject, encode(env.model_copy(update={"seq": 3})))
        await pub.flush()
        await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
        await pub.close()
    assert [f.seq for f in got if f.seq > 0] == [2, 3]
    assert client.rejected - before == 3  # not msgpack, not a JPEG, unknown version


async def wait_subscribed(
    pub: nats_py.NATS, subject: str, probe: bytes, seen: Callable[[], bool]
) -> None:
    """Publish ``probe`` until the consumer has seen one: its subscription is then live."""
    deadline = time.monotonic() + 10
    while not seen():
        assert time.monotonic() < deadline, "the client never subscribed"
        await pub.publish(subject, probe)
        await pub.flush()
        await asyncio.sleep(0.05)


def results_until(
    client: Client, camera: str, last_seq: int
) -> tuple[asyncio.Task[None], list[Result]]:
    """A task reading ``client.results(camera)`` into the list returned with it, ending once
    the result of ``last_seq`` came."""
    got: list[Result] = []

    async def consume() -> None:
        async for r in client.results(camera):
            got.append(r)
            if r.seq == last_seq:
                return

    return asyncio.create_task(consume()), got


async def test_results_yields_validated_results_and_skips_bad_ones(
    nats: NatsServer, client: Client
) -> None:
    camera = "sdkres"
    task, got = results_until(client, camera, 4)
    pub = await nats_py.connect(nats.url)
    subject = Subjects().results(camera)
    try:
        await wait_subscribed(pub, subject, encode(result(camera, 0)), lambda: bool(got))
        await asyncio.sleep(0.2)
        got.clear()  # drop the probes (seq 0): from here on, order and count are exact
        before = client.rejected
        bad_result = result(camera, 2).model_dump(mode="python")
        bad_result["detections"][0]["score"] = 7.0
        await pub.publish(subject, encode(result(camera, 1)))
        await pub.publish(subject, b"\x00\x01\x02 not msgpack")
        await pub.publish(subject, msgpack.packb(bad_result, use_bin_type=True))
        await pub.publish(subject, encode(result(camera, 3)))
        await pub.publish(subject, msgpack.packb(result(camera, 9).model_dump() | {"v": 2}))
        await pub.publish(subject, b"")
        await pub.publish(subject, encode(result(camera, 4)))
        await pub.flush()
        await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
        await pub.close()
    assert [r.seq for r in got if r.seq > 0] == [1, 3, 4]
    assert all(isinstance(r, Result) and r.camera == camera for r in got)
    assert got[0].detections[0].label == "person" and got[0].model == MODEL
    assert 0 < got[0].latency_s < 1.0
    assert client.rejected - before == 4


async def test_results_of_every_camera(nats: NatsServer, client: Client) -> None:
    got: list[Result] = []

    async def consume() -> None:
        async for r in client.results("*"):
            if r.camera.startswith("wild"):
                got.append(r)
            if {x.camera for x in got} >= {"wild-a", "wild-b"} and any(x.seq == 1 for x in got):
                return

    task = asyncio.create_task(consume())
    pub = await nats_py.connect(nats.url)
    try:
        await wait_subscribed(
            pub, Subjects().results("wild-a"), encode(result("wild-a", 0)), lambda: bool(got)
        )
        await pub.publish(Subjects().results("wild-b"), encode(result("wild-b", 1)))
        await pub.flush()
        await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
        await pub.close()
    assert {r.camera for r in got} == {"wild-a", "wild-b"}


async def test_bad_camera_id_is_refused_before_subscribing(client: Client) -> None:
    from lensbus import InvalidName

    with pytest.raises(InvalidName):
        await anext(client.frames("cam.*"))
    with pytest.raises(InvalidName):
        await anext(client.results(">"))


async def test_client_custom_prefix(nats: NatsServer) -> None:
    async with Client(nats.url, prefix="site9") as c:
        assert c.subjects.frames("x") == "site9.frames.x"
        with pytest.raises(TimeoutError):
            await c.latest_frame("x", 0.2)


def test_client_is_exported_lazily() -> None:
    assert lensbus.Client is Client


async def test_not_connected_is_a_clear_error() -> None:
    c = Client("nats://127.0.0.1:1")
    with pytest.raises(RuntimeError, match="not connected"):
        await anext(c.frames("cam1"))
