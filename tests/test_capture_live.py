"""Live sources never lag: capture capped at 5 fps reading a 30 fps camera publishes frames
that are as fresh as the camera's own stream allows, for a whole minute.

The cameras are real servers (tests/live_sources.py): MJPEG over HTTP and Debian's GStreamer
RTSP server (H.264), each frame stamped with the time it was made; the test reads the stamp
back from every published JPEG.  Before the reader thread (capture reading only as fast as
its cap), OpenCV/FFmpeg buffered the rest and the published frames fell seconds behind.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import nats as nats_py
import numpy as np
import pytest
from live_sources import SOURCE_FPS, MjpegServer, RtspServer, read_stamp, rtsp_missing

from lensbus import Subjects, decode
from lensbus.images import decode_jpeg
from lensbus.natsserver import NatsServer, free_port
from lensbus.schemas import FrameEnvelope

pytestmark = pytest.mark.slow

DURATION_S = 60.0  # the minute: a lag that builds up shows well within it
CAP_FPS = 5.0
SIZE = (640, 480)


def direct_delay(url: str, seconds: float = 3.0) -> float:
    """Median age of a frame read straight from the stream with OpenCV, nothing else in
    the way: the stream's own delay (send, transport, the decoder's reorder buffer and
    decode; ~2 ms for MJPEG, ~2 frames for H.264 over RTSP), the "decode" of the bound."""
    cap = cv2.VideoCapture(url, cv2.CAP_FFMPEG)
    assert cap.isOpened(), f"cannot open {url} directly"
    ages: list[float] = []
    start = time.monotonic()
    try:
        while time.monotonic() - start < seconds:
            ok, image = cap.read()
            now = time.time_ns()
            assert ok, f"{url} stopped while measuring its own delay"
            if time.monotonic() - start > 1.0:  # after the first frames' start-up
                ages.append((now - read_stamp(image)) / 1e9)
    finally:
        cap.release()
    return statistics.median(ages)


async def published_ages(url: str, camera: str, seconds: float) -> list[tuple[int, float]]:
    """(stamp, age in s) of each frame published for ``camera`` over ``seconds``; age =
    arrival here minus the stamp in its pixels."""
    got: list[tuple[int, bytes]] = []
    nc = await nats_py.connect(url)

    async def on_frame(msg: nats_py.aio.msg.Msg) -> None:
        got.append((time.time_ns(), decode(msg.data, FrameEnvelope).data))

    await nc.subscribe(Subjects().frames(camera), cb=on_frame)
    await asyncio.sleep(seconds)
    await nc.close()
    out = []
    for arrived, jpeg in got:
        stamp = read_stamp(decode_jpeg(jpeg))
        out.append((stamp, (arrived - stamp) / 1e9))
    return out


@pytest.fixture(params=["mjpeg", "rtsp"])
def live_camera(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "rtsp" and (why := rtsp_missing()):
        pytest.skip(why)
    cls = MjpegServer if request.param == "mjpeg" else RtspServer
    server = cls(free_port(), *SIZE, log=tmp_path / f"{request.param}.log")
    server.start()
    yield server.url
    server.stop()


def test_stamp_survives_jpeg_and_scaling() -> None:
    from live_sources import stamped_frame

    ns = time.time_ns()
    image = np.frombuffer(stamped_frame(*SIZE, ns), np.uint8).reshape(SIZE[1], SIZE[0], 3)
    jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 30])[1]
    small = cv2.resize(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), (160, 120))
    assert read_stamp(small) == ns


async def test_published_frames_stay_fresh(
    nats: NatsServer, start_service, live_camera: str
) -> None:
    own = await asyncio.to_thread(direct_delay, live_camera)
    cap = start_service("capture", nats.url, camera="live", source=live_camera, fps=CAP_FPS)
    cap.wait_healthy(30)
    frames = await published_ages(nats.url, "live", DURATION_S)
    assert cap.stop() == 0
    ages = sorted(age for _, age in frames)
    assert len(ages) >= 0.8 * DURATION_S * CAP_FPS, f"only {len(ages)} frames in {DURATION_S} s"
    stamps = [stamp for stamp, _ in frames]
    assert stamps == sorted(set(stamps)), "a frame was published twice or out of order"
    p50, p99 = ages[len(ages) // 2], ages[min(len(ages) - 1, int(len(ages) * 0.99))]
    bound = 2 / SOURCE_FPS + own
    assert p99 < bound, (
        f"frame age p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms, max {ages[-1] * 1e3:.0f} ms; "
        f"bound {bound * 1e3:.0f} ms (2 source intervals + the stream's own "
        f"{own * 1e3:.0f} ms)"
    )
