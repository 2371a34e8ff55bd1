"""The device stream made only for someone (issue 18 item 1, :mod:`lensbus.demand`): with a
model stream, capture encodes every device-stream frame only while a consumer says it is
there (``<prefix>.want.frames.<camera>``), else an idle frame a second. Real nats-server,
real capture and publisher processes, the real SDK.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import nats as nats_py
import pytest
from test_publisher import Viewer, start_publisher, until, wait_camera

from lensbus import Client, Subjects, decode, natsauth
from lensbus.codec import encode
from lensbus.demand import WANT_FOR_S, Leases, parse_want
from lensbus.errors import DecodeError
from lensbus.natsserver import NatsServer
from lensbus.schemas import FrameEnvelope, FramesWanted

S = Subjects()
SKIPPED = "lensbus_capture_device_frames_skipped_total"
WANTED = "lensbus_capture_device_stream_wanted"


@dataclass
class Seen:
    """The seqs of one camera's model-stream and device-stream frames, as they come."""

    model: dict[int, int] = field(default_factory=dict)  # seq -> capture_ns
    device: set[int] = field(default_factory=set)

    @classmethod
    async def start(cls, nc: Any, camera: str) -> Seen:
        seen = cls()

        async def on_model(msg: Any) -> None:
            env = decode(msg.data, FrameEnvelope)
            seen.model[env.seq] = env.capture_ns

        async def on_device(msg: Any) -> None:
            seen.device.add(decode(msg.data, FrameEnvelope).seq)

        await nc.subscribe(S.model_frames(camera), cb=on_model)
        await nc.subscribe(S.frames(camera), cb=on_device)
        await nc.flush()
        return seen

    def newest(self) -> int:
        return max(self.model, default=-1)

    def model_after(self, mark: int) -> list[int]:
        return sorted(s for s in self.model if s >= mark)


@pytest.fixture
async def nc(nats: NatsServer) -> AsyncIterator[Any]:
    conn = await nats_py.connect(nats.url)
    yield conn
    await conn.close()


def start_capture(start_service: Callable[..., Any], url: str, camera: str, **extra: Any) -> Any:
    cap = start_service(
        "capture", url, camera=camera, source="test", fps=15, width=640, height=480, **extra
    )
    cap.wait_healthy()
    return cap


async def every_frame_from(seen: Seen, cap: Any, camera: str, frames: int) -> list[int]:
    """Once capture says the device stream is wanted, the next ``frames`` model-stream seqs
    (a margin past the newest seen: frames already on their way were judged before)."""
    label = f'camera="{camera}"'
    await until(lambda: cap.metric(WANTED, label) == 1, 15, "capture to take the want")
    mark = seen.newest() + 5
    await until(lambda: len(seen.model_after(mark)) >= frames, 60, f"{frames} model frames")
    return seen.model_after(mark)[:frames]


async def test_capture_encodes_the_device_stream_while_someone_wants_it(
    nats: NatsServer, nc: Any, start_service: Callable[..., Any]
) -> None:
    cam = "ondemand"
    seen = await Seen.start(nc, cam)
    cap = start_capture(start_service, nats.url, cam, model_height=200)
    label = f'camera="{cam}"'

    # Nobody wants it: every frame on the model stream, about one a second on the device's.
    await until(lambda: len(seen.model) >= 45, 60, "45 model frames")
    seqs = sorted(seen.model)
    span_s = (seen.model[seqs[-1]] - seen.model[seqs[0]]) / 1e9
    idle = [s for s in seen.device if seqs[0] <= s <= seqs[-1]]
    assert 1 <= len(idle) <= span_s + 2, (len(idle), span_s)
    assert cap.metric(SKIPPED, label) >= 30
    assert cap.metric(WANTED, label) == 0
    assert cap.metric("lensbus_capture_model_frames_published_total", label) >= 45

    # Wanted for 5 s (a FramesWanted): every frame, then idle again once it runs out.
    await nc.publish(S.frames_wanted(cam), encode(FramesWanted(by="test", for_s=5)))
    every = await every_frame_from(seen, cap, cam, 10)
    await until(lambda: set(every) <= seen.device, 10, "their device-stream copies")
    skipped = cap.metric(SKIPPED, label)
    await until(lambda: cap.metric(SKIPPED, label) > skipped, 30, "the want to run out")
    assert cap.metric(WANTED, label) == 0

    # A malformed want is counted and ignored; capture goes on.
    rejected = cap.metric("lensbus_messages_rejected_total", 'reason="malformed"')
    await nc.publish(S.frames_wanted(cam), b"\xc1 not msgpack")
    await until(
        lambda: cap.metric("lensbus_messages_rejected_total", 'reason="malformed"') > rejected,
        10,
        "the malformed want to be counted",
    )
    assert cap.metric(WANTED, label) == 0

    # An empty message, as a program in any language sends it: every frame again.
    newest = seen.newest()
    await nc.publish(S.frames_wanted(cam), b"")
    every = await every_frame_from(seen, cap, cam, 20)
    assert every[0] > newest
    await until(lambda: set(every) <= seen.device, 10, "their device-stream copies")
    assert "malformed" in cap.log or "not msgpack" in cap.log
    assert cap.stop() == 0


async def test_always_and_no_model_stream_encode_every_frame(
    nats: NatsServer, nc: Any, start_service: Callable[..., Any]
) -> None:
    """``device_stream: always``, and a camera without a model stream (inference reads the
    device stream): every frame, nobody asking."""
    always, plain = await Seen.start(nc, "always"), await Seen.start(nc, "plain")
    caps = [
        start_capture(start_service, nats.url, "always", model_height=200, device_stream="always"),
        start_capture(start_service, nats.url, "plain"),
    ]
    await until(lambda: len(always.model) >= 20, 60, "20 model frames")
    first = min(always.model) + 2
    wanted = set(range(first, first + 15))
    await until(lambda: wanted <= always.device, 30, "every device frame of 'always'")
    await until(lambda: len(plain.device) >= 20, 60, "20 frames of 'plain'")
    seqs = sorted(plain.device)
    assert seqs[-1] - seqs[0] == len(seqs) - 1, seqs  # none skipped
    for cap, cam in zip(caps, ("always", "plain"), strict=True):
        assert cap.metric(SKIPPED, f'camera="{cam}"') == 0
        assert cap.stop() == 0


async def test_a_page_viewer_makes_the_publisher_want_the_camera(
    nats: NatsServer, start_service: Callable[..., Any]
) -> None:
    cam = "watched"
    cap = start_capture(start_service, nats.url, cam, model_height=200)
    pub = start_publisher(start_service, nats.url)
    base = f"http://127.0.0.1:{pub.port}"
    label = f'camera="{cam}"'
    async with aiohttp.ClientSession() as http:
        await wait_camera(http, base, cam)  # its idle frames show it on the page
        await until(lambda: cap.metric(SKIPPED, label) > 0, 30, "frames skipped, unwatched")
        assert cap.metric(WANTED, label) == 0
        viewer, stop = Viewer(), asyncio.Event()
        reading = asyncio.create_task(
            viewer.read(http, f"{base}/cameras/{cam}/device.mjpeg", stop=stop)
        )
        t0 = time.monotonic()
        await until(lambda: cap.metric(WANTED, label) == 1, 15, "capture to hear the viewer")
        took = time.monotonic() - t0
        await until(lambda: len(viewer.parts) >= 20, 30, "20 frames for the viewer")
        stop.set()
        await reading
    print(f"viewer wanted after {took:.2f} s")
    # The viewer gone, the want runs out (WANT_FOR_S after the publisher last said it).
    await until(lambda: cap.metric(WANTED, label) == 0, WANT_FOR_S + 20, "the want to run out")
    assert pub.stop() == 0 and cap.stop() == 0


async def test_sdk_frames_get_every_frame(
    nats: NatsServer, start_service: Callable[..., Any]
) -> None:
    cam = "sdkframes"
    cap = start_capture(start_service, nats.url, cam, model_height=200)
    seqs: list[int] = []
    async with Client(nats.url, timeout_s=10) as client:
        async for frame in client.frames(cam, newest_only=False):
            seqs.append(frame.envelope.seq)
            if len(seqs) >= 25:
                break
    tail = seqs[8:]  # the first ones: idle frames, before capture heard the want
    assert tail == list(range(tail[0], tail[0] + len(tail))), seqs
    assert cap.stop() == 0


# ---- pure logic --------------------------------------------------------------------------


def test_leases_and_messages() -> None:
    now = [100.0]
    leases = Leases(clock=lambda: now[0])
    assert not leases.wanted("a")
    assert leases.grant("a", 10) is True
    assert leases.grant("a", 2) is False  # already wanted; a shorter want shortens nothing
    now[0] += 9.9
    assert leases.wanted("a") and not leases.wanted("b")
    now[0] += 0.2
    assert not leases.wanted("a")
    assert parse_want(b"").for_s == WANT_FOR_S
    assert parse_want(encode(FramesWanted(by="x", for_s=3))).for_s == 3
    for bad in (b"\xc1", encode(FramesWanted(by="x")).replace(b"for_s", b"for_x")[:-1]):
        with pytest.raises(DecodeError):
            parse_want(bad)


def test_who_may_say_it() -> None:
    want = S.all_frames_wanted()
    for user in ("client", "operator", "publisher"):
        assert want in natsauth.permissions(user)["publish"]["allow"], user
    assert want in natsauth.permissions("capture")["subscribe"]["allow"]
    assert want not in natsauth.permissions("capture")["publish"]["allow"]
