"""JPEG bombs: a few KB of JPEG whose frame header (SOF) declares a huge image.  The header is
read before any decode; what is over the pixel cap or does not match the envelope is refused
with its own reason, and the decoder never allocates for it."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import nats as nats_py
import numpy as np
import pytest
from nats.aio.msg import Msg

from lensbus import Subjects, decode, encode, images
from lensbus.errors import ImageError
from lensbus.images import decode_jpeg, encode_jpeg
from lensbus.natsserver import NatsServer
from lensbus.processes import ServiceProcess
from lensbus.schemas import FrameEnvelope, Result

YOLO = "yolov3-tiny-onnx"


def picture(w: int = 64, h: int = 48) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


def sof_at(jpeg: bytes) -> int:
    """Offset of the SOF marker (any kind) in a JPEG made here."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = jpeg.find(marker)
        if at > 0:
            return at
    raise AssertionError("no SOF")


def bomb(w: int = 30000, h: int = 30000, jpeg: bytes | None = None) -> bytes:
    """A real small JPEG whose SOF is patched to declare ``w`` x ``h``."""
    data = bytearray(jpeg or encode_jpeg(picture()))
    s = sof_at(bytes(data))
    data[s + 5 : s + 7] = h.to_bytes(2, "big")
    data[s + 7 : s + 9] = w.to_bytes(2, "big")
    return bytes(data)


def reason_of(data: bytes, **kwargs: Any) -> str:
    with pytest.raises(ImageError) as info:
        images.check_jpeg(data, **kwargs)
    return str(info.value.reason)


# ---- the header parser ------------------------------------------------------------------


def test_header_of_real_jpegs() -> None:
    head = images.read_jpeg_header(encode_jpeg(picture(64, 48)))
    assert (head.width, head.height, head.components, head.progressive) == (64, 48, 3, False)
    grey = cv2.imencode(".jpg", np.zeros((30, 50), np.uint8))[1].tobytes()
    assert (images.read_jpeg_header(grey).width, images.read_jpeg_header(grey).components) == (
        50,
        1,
    )
    ok, buf = cv2.imencode(".jpg", picture(200, 100), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    head = images.read_jpeg_header(buf.tobytes())
    assert (head.width, head.height, head.progressive) == (200, 100, True)
    # Strips joined under restart markers (encode_jpeg with threads) keep one header.
    big = encode_jpeg(picture(1600, 900), threads=2)
    assert (images.read_jpeg_header(big).width, images.read_jpeg_header(big).height) == (1600, 900)


def test_truncated_png_and_garbage_are_corrupt() -> None:
    jpeg = encode_jpeg(picture())
    for cut in (0, 1, 2, 3, 10, sof_at(jpeg) + 4):
        assert reason_of(jpeg[:cut]) == "corrupt_image", cut
    png = cv2.imencode(".png", picture())[1].tobytes()
    assert reason_of(png) == "corrupt_image"
    assert reason_of(b"\xff\xd8\xff\xda\x00\x08" + b"\x00" * 20) == "corrupt_image"  # no SOF
    assert reason_of(bomb(0, 48)) == "corrupt_image"  # zero width
    # Cut after its header: the header reads, the decode fails, still as corrupt_image.
    with pytest.raises(ImageError) as info:
        decode_jpeg(jpeg[: sof_at(jpeg) + 40])
    assert info.value.reason == "corrupt_image"


def test_bombs_are_refused_before_decoding() -> None:
    assert reason_of(bomb()) == "image_too_large"
    assert reason_of(bomb(8192, 8192), size=(8192, 8192)) == "image_too_large"
    assert 8192 * 8192 > images.MAX_PIXELS >= 3840 * 2160
    assert reason_of(bomb(640, 480), size=(64, 48)) == "size_mismatch"
    assert reason_of(bomb(4000, 3000), max_pixels=1_000_000) == "image_too_large"
    assert images.check_jpeg(bomb(4000, 3000), size=(4000, 3000)).width == 4000
    for data in (bomb(), bomb(jpeg=cv2.imencode(".jpg", picture(), [1, 90, 2, 1])[1].tobytes())):
        t0 = time.perf_counter()
        with pytest.raises(ImageError) as info:
            decode_jpeg(data, 8, 2)
        assert info.value.reason == "image_too_large"
        assert time.perf_counter() - t0 < 0.5  # no decode was tried
    with pytest.raises(ImageError) as info:
        decode_jpeg(encode_jpeg(picture()), size=(65, 48))
    assert info.value.reason == "size_mismatch"
    assert decode_jpeg(encode_jpeg(picture()), size=(64, 48)).shape == (48, 64, 3)


# ---- the service ------------------------------------------------------------------------


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_bombs_between_frames_are_rejected_and_memory_stays_bounded(
    nats: NatsServer, start_service, demo_models: dict[str, Path]
) -> None:
    inf = start_service("inference", nats.url, model=demo_models[YOLO], cameras="boom")
    inf.wait_healthy(60)
    nc = await nats_py.connect(nats.url)
    results: list[Result] = []

    async def on_result(msg: Msg) -> None:
        results.append(decode(msg.data, Result))

    await nc.subscribe(Subjects().results("boom"), cb=on_result)
    try:
        await bombard(inf, nc, results)
    finally:
        await nc.close()
    assert inf.stop() == 0
    assert inf.log.count("rejected a frame (image_too_large)") == 1  # logged once, with cause
    assert "30000x30000" in inf.log


async def bombard(inf: ServiceProcess, nc: nats_py.NATS, results: list[Result]) -> None:
    """Good frames with bombs between them: each bomb is refused by reason, the frames get
    results, the peak RSS hardly moves."""
    subject = Subjects().frames("boom")
    good = encode_jpeg(picture(640, 480))

    def frame(seq: int, data: bytes, width: int, height: int) -> bytes:
        env = FrameEnvelope(
            camera="boom", seq=seq, capture_ns=time.time_ns(), width=width, height=height, data=data
        )
        return encode(env)

    def rejected(reason: str) -> float:
        return inf.metric("lensbus_messages_rejected_total", f'reason="{reason}"')

    def counted(reason: str, want: int) -> bool:
        return rejected(reason) >= want

    async def send(payload: bytes) -> None:
        await nc.publish(subject, payload)
        await nc.flush()

    await send(frame(1, good, 640, 480))
    await wait_for(lambda: len(results) >= 1, 30, "the first result")
    before = peak_rss_mb(inf.pid)
    bombs = [
        (frame(2, bomb(), 64, 48), "image_too_large"),  # the envelope lies
        (frame(3, bomb(8192, 8192), 8192, 8192), "image_too_large"),  # both say 8192x8192
        (frame(4, bomb(4000, 3000), 64, 48), "size_mismatch"),  # under the cap, not as said
    ]
    for n, (payload, reason) in enumerate(bombs):
        want = sum(1 for _, r in bombs[: n + 1] if r == reason)
        await send(payload)
        await wait_for(functools.partial(counted, reason, want), 20, reason)
    await send(frame(5, good, 640, 480))
    await wait_for(lambda: len(results) >= 2, 30, "the last result")
    assert [r.seq for r in results] == [1, 5]
    assert rejected("image_too_large") == 2
    assert rejected("size_mismatch") == 1
    assert rejected("model_error") == 0
    peak = peak_rss_mb(inf.pid)
    assert peak < 1024 and peak - before < 100, f"peak RSS {before:.0f} -> {peak:.0f} MB"
    assert inf.healthz()[0] == 200
