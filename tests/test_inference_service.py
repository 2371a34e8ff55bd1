"""Inference as a real process: real frames from capture, real YOLOv3-tiny, real NATS."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import msgpack
import nats as nats_py
import numpy as np
import pytest
from photos import photos

from lensbus import DecodeError, Subjects, decode, encode
from lensbus.images import encode_jpeg
from lensbus.modelpkg import verify, write_package
from lensbus.natsserver import NatsServer
from lensbus.schemas import FrameEnvelope, Result
from lensbus.schemas.result import Box

pytestmark = pytest.mark.slow

YOLO = "yolov3-tiny-onnx"  # the demo package the service runs here


class Recorder:
    """Frames and results of one camera, as a plain subscriber sees them."""

    def __init__(self, camera: str) -> None:
        self.camera = camera
        self.frames: dict[int, FrameEnvelope] = {}
        self.results: list[Result] = []

    async def start(self, url: str) -> Recorder:
        self.nc = await nats_py.connect(url)
        subjects = Subjects()

        async def on_frame(msg: nats_py.aio.msg.Msg) -> None:
            try:
                env = decode(msg.data, FrameEnvelope)
            except DecodeError:  # the bad-input test sends garbage on purpose
                return
            self.frames[env.seq] = env

        async def on_result(msg: nats_py.aio.msg.Msg) -> None:
            self.results.append(decode(msg.data, Result))

        await self.nc.subscribe(subjects.frames(self.camera), cb=on_frame)
        await self.nc.subscribe(subjects.results(self.camera), cb=on_result)
        return self

    async def wait_results(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.results) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert len(self.results) >= n, f"{len(self.results)} results, wanted {n}"

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.flush()
            await self.nc.close()


@pytest.fixture
async def recorder(nats: NatsServer) -> AsyncIterator[Callable[[str], Awaitable[Recorder]]]:
    made: list[Recorder] = []

    async def make(camera: str) -> Recorder:
        made.append(await Recorder(camera).start(nats.url))
        return made[-1]

    yield make
    for rec in made:
        await rec.close()


async def test_capture_to_results_with_real_model(
    nats: NatsServer, start_service, demo_models: dict[str, Path], tmp_path: Path, recorder
) -> None:
    rec = await recorder("yard")
    inf = start_service("inference", nats.url, model=demo_models[YOLO], cameras="yard")
    inf.wait_healthy(60)
    cap = start_service(
        "capture", nats.url, camera="yard", source=photos(tmp_path), fps=3, loop="true"
    )
    await rec.wait_results(9, 60)
    cap.stop()
    await asyncio.sleep(1.0)  # the last results in flight
    await rec.close()
    processed = inf.metric("lensbus_inference_frames_processed_total")
    assert inf.stop() == 0

    seqs = [r.seq for r in rec.results]
    assert len(seqs) == len(set(seqs)), "one result per frame"
    assert set(seqs) <= set(rec.frames), "every result belongs to a published frame"
    assert len(rec.results) == processed
    labels = {d.label for r in rec.results for d in r.detections}
    assert {"dog", "person", "horse"} <= labels, labels
    for r in rec.results:
        f = rec.frames[r.seq]
        assert (r.capture_ns, r.width, r.height) == (f.capture_ns, f.width, f.height)
        assert r.model.name == YOLO and r.model.framework == "onnx"
        assert r.task == "detection"
        t = r.timings
        assert t.decode > 0 and t.preprocess > 0 and t.compute > 0 and t.postprocess > 0
        assert r.result_ns > r.capture_ns
        for d in r.detections:
            b = d.box
            assert 0 <= b.xmin < b.xmax <= 1 and 0 <= b.left < b.right <= r.width
    dog_frames = [r for r in rec.results if any(d.label == "dog" for d in r.detections)]
    big_dog = max(
        (d for r in dog_frames for d in r.detections if d.label == "dog"), key=lambda d: d.score
    )
    assert big_dog.score > 0.8


async def test_two_instances_share_frames(
    nats: NatsServer, start_service, demo_models: dict[str, Path], recorder
) -> None:
    rec = await recorder("shared")
    a = start_service("inference", nats.url, model=demo_models[YOLO], instance="inf-a", threads=1)
    b = start_service("inference", nats.url, model=demo_models[YOLO], instance="inf-b", threads=1)
    a.wait_healthy(60)
    b.wait_healthy(60)
    cap = start_service(
        "capture", nats.url, camera="shared", source="test", fps=8, width=416, height=416
    )
    await rec.wait_results(30, 60)
    cap.stop()
    await asyncio.sleep(1.0)
    await rec.close()
    seqs = [r.seq for r in rec.results]
    assert len(seqs) == len(set(seqs)), "a frame got more than one result"
    by_instance = {r.instance for r in rec.results}
    assert by_instance == {"inf-a", "inf-b"}, f"both instances work: {by_instance}"
    assert a.stop() == 0 and b.stop() == 0


async def test_bad_frames_are_counted_and_service_keeps_serving(
    nats: NatsServer, start_service, demo_models: dict[str, Path], recorder
) -> None:
    inf = start_service("inference", nats.url, model=demo_models[YOLO], cameras="bad")
    inf.wait_healthy(60)
    rec = await recorder("bad")
    subject = Subjects().frames("bad")
    good = encode_jpeg(np.full((120, 160, 3), 128, np.uint8))

    def frame(
        seq: int, data: bytes, width: int = 160, height: int = 120, camera: str = "bad"
    ) -> bytes:
        return encode(
            FrameEnvelope(
                camera=camera,
                seq=seq,
                capture_ns=time.time_ns(),
                width=width,
                height=height,
                data=data,
            )
        )

    bad = {
        "empty": b"",
        "malformed": b"\x00\x01 definitely not msgpack",
        "unknown_version": msgpack.packb({"v": 99, "camera": "bad"}),
        "invalid": msgpack.packb({"v": 1, "camera": "bad", "seq": -1}),
        "corrupt_image": frame(1, good[: len(good) // 3] + b"\x00" * 50),
        "size_mismatch": frame(2, good, width=1920, height=1080),
        # On the subject of one camera, naming another: its result would go out as theirs.
        "camera_mismatch": frame(3, good, camera="other"),
    }
    nc = rec.nc
    for payload in bad.values():
        await nc.publish(subject, payload)
        await nc.flush()
        await asyncio.sleep(0.3)  # one at a time, so none replaces another in the mailbox
    await nc.publish(subject, frame(10, good))
    await rec.wait_results(1, 20)
    assert rec.results[0].seq == 10
    reasons = {**{r: r for r in bad}, "empty": "malformed"}  # an empty payload is malformed
    for case, reason in reasons.items():
        assert inf.metric("lensbus_messages_rejected_total", f'reason="{reason}"') >= 1, case
    assert inf.metric("lensbus_messages_rejected_total", 'reason="malformed"') == 2
    assert inf.proc.poll() is None
    assert inf.healthz()[0] == 200
    await rec.close()
    assert inf.stop() == 0
    # Each reason is logged once, with its cause.
    assert inf.log.count("rejected a frame (corrupt_image)") == 1


@pytest.mark.parametrize("damage", ["flipped_bytes", "truncated_and_resigned"])
def test_broken_model_exits_naming_the_file(
    nats: NatsServer, start_service, demo_models: dict[str, Path], tmp_path: Path, damage: str
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(demo_models[YOLO], broken)
    pkg = verify(broken)
    onnx_file = pkg.path("model")
    data = bytearray(onnx_file.read_bytes())
    if damage == "flipped_bytes":  # same size, different content: the sha256 check catches it
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
        onnx_file.write_bytes(bytes(data))
        expect = "sha256 mismatch"
    else:  # a manifest that matches a truncated file: ONNX Runtime refuses it
        onnx_file.write_bytes(bytes(data[:1000]))
        m = pkg.manifest
        write_package(broken, {"model": onnx_file.name}, **m.model_dump(exclude={"v", "files"}))
        expect = "yolov3-tiny"
    inf = start_service("inference", nats.url, model=broken)
    assert inf.proc.wait(60) == 4
    assert onnx_file.name in inf.log and expect in inf.log, inf.log


def test_mailbox_keeps_the_newest_frames_per_camera() -> None:
    from lensbus_inference.mailbox import Mailbox, Pending

    def frame(n: int) -> Pending:
        return Pending(bytes([n]), float(n))

    one = Mailbox(1)
    assert one.put("a", frame(1)) is None
    dropped = one.put("a", frame(2))
    assert dropped is not None and dropped.data == b"\x01"
    assert len(one) == 1

    two = Mailbox(2)
    for n, cam in ((1, "a"), (2, "b"), (3, "a")):
        assert two.put(cam, frame(n)) is None
    dropped = two.put("a", frame(4))  # a third frame of "a": its oldest goes
    assert dropped is not None and dropped.data == b"\x01"
    order = []
    while (got := two.take()) is not None:
        order.append((got[0], got[1].data[0]))
    # "b" has waited longest now; then "a" in frame order.
    assert order == [("b", 2), ("a", 3), ("a", 4)]


def test_a_held_mailbox_keeps_frames_until_the_worker_caught_up() -> None:
    """While a swap prepares (``Worker.holding``) frames wait instead of replacing each
    other, and still after it, until every frame that waited was taken."""
    from lensbus_inference.mailbox import HOLD_SPARE, Mailbox, Pending

    box = Mailbox(1)
    box.hold()
    for n in range(1 + HOLD_SPARE):
        assert box.put("a", Pending(bytes([n]), float(n))) is None
    dropped = box.put("a", Pending(b"x", 9.0))  # one more than the spare: the oldest goes
    assert dropped is not None and dropped.data == b"\x00"
    box.release()
    taken = box.take()
    assert taken is not None and taken[1].data == b"\x01"
    # Released, but frames still wait: one arriving now is kept too.
    assert box.put("a", Pending(b"y", 10.0)) is None
    while box.take() is not None:
        pass
    # Caught up: back to queue_depth 1.
    assert box.put("a", Pending(b"1", 11.0)) is None
    dropped = box.put("a", Pending(b"2", 12.0))
    assert dropped is not None and dropped.data == b"1"


async def test_model_stream_gives_the_same_detections_in_full_frame_pixels(
    nats: NatsServer, start_service, demo_models: dict[str, Path], tmp_path: Path, recorder
) -> None:
    """Inference on the model stream (capture's smaller copies) finds what it finds on the
    device stream, with boxes in pixels of the full frame."""
    rec_full, rec_small = await recorder("full"), await recorder("small")
    folder = photos(tmp_path)
    a = start_service(
        "inference", nats.url, model=demo_models[YOLO], cameras="full", instance="on-device"
    )
    b = start_service(
        "inference",
        nats.url,
        model=demo_models[YOLO],
        cameras="small",
        instance="on-model",
        stream="model",
    )
    a.wait_healthy(60)
    b.wait_healthy(60)
    caps = [
        start_service(
            "capture",
            nats.url,
            camera=cam,
            source=folder,
            fps=2,
            loop="true",
            width=1280,
            height=960,
            **extra,
        )
        for cam, extra in (("full", {}), ("small", {"model_height": 480}))
    ]
    await rec_full.wait_results(6, 90)
    await rec_small.wait_results(6, 90)
    for c in caps:
        c.stop()
    assert a.stop() == 0 and b.stop() == 0

    def by_photo(results: list[Result]) -> dict[int, Result]:
        """A result per photo (both captures loop the same folder in the same order)."""
        for r in results:
            assert (r.width, r.height) == (1280, 960)
        return {r.seq % 3: r for r in results}

    def iou(a: Box, b: Box) -> float:
        ix = max(0, min(a.right, b.right) - max(a.left, b.left))
        iy = max(0, min(a.bottom, b.bottom) - max(a.top, b.top))
        area = (a.right - a.left) * (a.bottom - a.top) + (b.right - b.left) * (b.bottom - b.top)
        return ix * iy / (area - ix * iy)

    full, small = by_photo(rec_full.results), by_photo(rec_small.results)
    assert set(full) == set(small) == {0, 1, 2}
    labels = set()
    for photo, r in full.items():
        for d in (d for d in r.detections if d.score > 0.5):
            match = max(
                (e for e in small[photo].detections if e.label == d.label),
                key=lambda e: iou(d.box, e.box),
                default=None,
            )
            assert match is not None, (photo, d.label)
            assert iou(d.box, match.box) > 0.8, (photo, d.label, d.box, match.box)
            assert abs(d.score - match.score) < 0.15, (photo, d.label, d.score, match.score)
            labels.add(d.label)
    assert {"dog", "person", "horse"} <= labels, labels
