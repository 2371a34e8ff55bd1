"""A live source that drops (an MJPEG stream over real HTTP) is reopened with back-off."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import cv2
import nats as nats_py
import numpy as np
import pytest
from aiohttp import web

from lensbus.codec import decode
from lensbus.natsserver import NatsServer, free_port
from lensbus.schemas import Status

pytestmark = pytest.mark.slow


class MjpegServer:
    """A camera on the network: multipart MJPEG over HTTP, which we can unplug.

    It runs on an event loop in a thread of its own, so the test's blocking waits do not
    stall it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.runner: web.AppRunner | None = None
        self.served = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def start(self) -> None:
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream.mjpg"

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "multipart/x-mixed-replace; boundary=frame"}
        )
        await resp.prepare(request)
        while True:
            img = np.full((240, 320, 3), (self.served * 7) % 255, np.uint8)
            cv2.putText(img, str(self.served), (20, 120), cv2.FONT_HERSHEY_SIMPLEX, 2, (255,) * 3)
            jpeg = cv2.imencode(".jpg", img)[1].tobytes()
            head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
            await resp.write(head.encode() + jpeg + b"\r\n")
            self.served += 1
            await asyncio.sleep(0.04)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/stream.mjpg", self._stream)
        self.runner = web.AppRunner(app, shutdown_timeout=0.2)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


async def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def camera() -> Iterator[MjpegServer]:
    server = MjpegServer(free_port())
    server.start()
    yield server
    server.close()


async def test_dropped_stream_is_reopened(
    nats: NatsServer, start_service, camera: MjpegServer
) -> None:
    cap = start_service(
        "capture", nats.url, camera="ipcam", source=camera.url, fps=10, reopen_max_s=1
    )
    cap.wait_healthy(30)
    states: list[Status] = []
    nc = await nats_py.connect(nats.url)

    async def on_status(msg: nats_py.aio.msg.Msg) -> None:
        states.append(decode(msg.data, Status))

    await nc.subscribe("lensbus.status.capture.>", cb=on_status)
    published, cam = "lensbus_capture_frames_published_total", 'camera="ipcam"'
    await wait_for(lambda: cap.metric(published, cam) >= 10, 15, "frames from the stream")

    camera.stop()  # the camera is unplugged
    await wait_for(lambda: cap.healthz()[0] == 503, 20, "/healthz to report the lost source")
    _, body = cap.healthz()
    assert "source lost" in str(body["problems"])
    await wait_for(lambda: any(s.state == "degraded" for s in states), 5, "a degraded heartbeat")
    assert "source lost" in next(s for s in states if s.state == "degraded").reason
    await asyncio.sleep(2.0)  # a few failed reopen attempts while it is away
    assert cap.metric("lensbus_capture_source_reopens_total", cam) >= 2
    assert cap.proc.poll() is None, "capture keeps running while the camera is away"
    count_while_down = cap.metric(published, cam)

    camera.start()  # plugged back in
    await wait_for(lambda: cap.healthz()[0] == 200, 20, "/healthz to recover")
    await wait_for(lambda: cap.metric(published, cam) >= count_while_down + 10, 15, "frames again")
    assert cap.metric("lensbus_capture_source_up", cam) == 1
    await nc.close()
    assert cap.stop() == 0
