"""The publisher as a real process over a real nats-server, fed by real capture and
inference processes running the real YOLOv3-tiny, read over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import msgpack
import nats as nats_py
import numpy as np
import pytest
from aiohttp import web
from photos import PHOTOS, photos

from lensbus import Subjects, decode, encode
from lensbus.codec import DecodeError
from lensbus.images import decode_jpeg, encode_jpeg
from lensbus.natsserver import NatsServer, free_port
from lensbus.schemas import Event, FrameEnvelope, Result
from lensbus.subjects import RESULTS_STREAM, SNAPSHOTS_BUCKET
from lensbus_publisher.render import color_for, line_width

pytestmark = pytest.mark.slow

YOLO = "yolov3-tiny-onnx"
ROOT = Path(__file__).resolve().parent.parent


# ---- helpers (the browser test uses them too) ----------------------------------------------


class Recorder:
    """Frames, results and events of the bus, as a plain subscriber sees them."""

    def __init__(self) -> None:
        self.frames: dict[tuple[str, int], FrameEnvelope] = {}
        self.results: dict[str, list[Result]] = {}
        self.events: list[Event] = []

    async def start(self, url: str, cameras: list[str]) -> Recorder:
        self.nc = await nats_py.connect(url)
        subjects = Subjects()

        async def on_frame(msg: Any) -> None:
            with contextlib.suppress(DecodeError):
                env = decode(msg.data, FrameEnvelope)
                self.frames[(env.camera, env.seq)] = env

        async def on_result(msg: Any) -> None:
            with contextlib.suppress(DecodeError):
                r = decode(msg.data, Result)
                self.results.setdefault(r.camera, []).append(r)

        async def on_event(msg: Any) -> None:
            self.events.append(decode(msg.data, Event))

        for cam in cameras:
            await self.nc.subscribe(subjects.frames(cam), cb=on_frame)
            await self.nc.subscribe(subjects.results(cam), cb=on_result)
        await self.nc.subscribe(subjects.all_events(), cb=on_event)
        await self.nc.flush()
        return self

    def result(self, camera: str, seq: int) -> Result:
        return next(r for r in self.results.get(camera, []) if r.seq == seq)

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.close()


@pytest.fixture
async def recorder(nats: NatsServer):
    made: list[Recorder] = []

    async def make(*cameras: str) -> Recorder:
        made.append(await Recorder().start(nats.url, list(cameras)))
        return made[-1]

    yield make
    for rec in made:
        await rec.close()


@dataclass
class Part:
    headers: dict[str, str]
    body: bytes
    t: float  # time.monotonic() when it arrived
    wall: float = 0.0  # time.time() when it arrived

    @property
    def seq(self) -> int:
        return int(self.headers["x-seq"])

    @property
    def result_seq(self) -> int:
        return int(self.headers.get("x-result-seq", "-1"))


@dataclass
class Viewer:
    """An MJPEG client: parts read so far (kept when the read is cut short)."""

    parts: list[Part] = field(default_factory=list)

    async def read(
        self,
        http: aiohttp.ClientSession,
        url: str,
        count: int | None = None,
        stop: asyncio.Event | None = None,
        headers: dict[str, str] | None = None,
    ) -> list[Part]:
        async with http.get(url, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            ctype = resp.headers["Content-Type"]
            assert ctype.startswith("multipart/x-mixed-replace"), ctype
            boundary = b"--" + ctype.split("boundary=")[1].encode()
            reader = resp.content
            stopped = asyncio.ensure_future(stop.wait()) if stop else None
            try:
                while count is None or len(self.parts) < count:
                    line_task = asyncio.ensure_future(reader.readline())
                    waits = {line_task} | ({stopped} if stopped else set())
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    if not line_task.done():
                        line_task.cancel()
                        break
                    line = line_task.result()
                    if not line:
                        break
                    if not line.strip():
                        continue
                    assert line.strip() == boundary, line
                    hdrs = {}
                    while h := (await reader.readline()).strip():
                        k, _, v = h.decode().partition(":")
                        hdrs[k.strip().lower()] = v.strip()
                    assert hdrs["content-type"] == "image/jpeg"
                    body = await reader.readexactly(int(hdrs["content-length"]))
                    self.parts.append(Part(hdrs, body, time.monotonic(), time.time()))
            finally:
                if stopped:
                    stopped.cancel()
        return self.parts


async def read_sse(
    http: aiohttp.ClientSession, url: str, count: int, kind: str = "result"
) -> list[dict[str, Any]]:
    """The first ``count`` Server-Sent Events of ``kind`` from ``url``, as JSON."""
    out: list[dict[str, Any]] = []
    async with http.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        event, data = "", ""
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
            elif not line and data:
                if event == kind:
                    out.append(json.loads(data))
                    if len(out) >= count:
                        break
                event, data = "", ""
    return out


def start_publisher(start_service: Callable[..., Any], nats_url: str, **settings: Any) -> Any:
    """The publisher; its one port (page, streams, /metrics) is the harness's metrics port."""
    if "rules" in settings and not isinstance(settings["rules"], str):
        settings["rules"] = json.dumps(settings["rules"])
    pub = start_service("publisher", nats_url, **settings)
    pub.wait_healthy(30)
    return pub


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def wait_camera(
    http: aiohttp.ClientSession, base: str, camera: str, results: bool = False, timeout: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cams = {c["id"]: c for c in (await get_json(http, f"{base}/api/cameras"))["cameras"]}
        cam = cams.get(camera)
        if cam and cam["frame"] and (cam["result"] or not results):
            return cam
        await asyncio.sleep(0.2)
    raise AssertionError(f"camera {camera} (results={results}) not seen in {timeout}s")


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def edge_match(img: np.ndarray, x: int, y0: int, y1: int, color: tuple[int, int, int]) -> float:
    """Fraction of rows in [y0, y1) with ``color`` (JPEG-tolerant) within 2 px of column x."""
    band = img[y0:y1, max(0, x - 2) : x + 3].astype(int)
    if band.size == 0:
        return 0.0
    close = (np.abs(band - np.array(color)).max(axis=2) < 70).any(axis=1)
    return float(close.mean())


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# ---- device and project streams --------------------------------------------------------------


async def test_device_stream_is_byte_exact_and_project_draws_the_boxes(
    nats: NatsServer, start_service, demo_models: dict[str, Path], tmp_path: Path, recorder
) -> None:
    rec = await recorder("mj")
    inf = start_service("inference", nats.url, model=demo_models[YOLO], cameras="mj")
    pub = start_publisher(start_service, nats.url)
    inf.wait_healthy(60)
    folder = photos(tmp_path, "dog.jpg", "person.jpg", "horses.jpg")
    start_service("capture", nats.url, camera="mj", source=folder, fps=4, loop="true")
    base = f"http://127.0.0.1:{pub.port}"
    async with aiohttp.ClientSession() as http:
        await wait_camera(http, base, "mj", results=True)
        device, project, feed = await asyncio.wait_for(
            asyncio.gather(
                Viewer().read(http, f"{base}/cameras/mj/device.mjpeg", count=12),
                Viewer().read(http, f"{base}/cameras/mj/project.mjpeg", count=12),
                read_sse(http, f"{base}/cameras/mj/results", count=6),
            ),
            60,
        )
    await asyncio.sleep(0.5)  # the recorder's copies of the last frames and results

    # The device stream is the published JPEG of each frame, byte for byte, in order.
    seqs = [p.seq for p in device]
    assert seqs == sorted(set(seqs)) and len(seqs) == 12
    for p in device:
        env = rec.frames[("mj", p.seq)]
        assert p.body == env.data, f"frame {p.seq} differs from the published JPEG"
        assert int(p.headers["x-capture-ns"]) == env.capture_ns

    # The project stream draws the boxes of the result named in X-Result-Seq where it says.
    checked = 0
    for p in project:
        if p.result_seq < 0:
            continue
        r = rec.result("mj", p.result_seq)
        img = decode_jpeg(p.body)
        raw = decode_jpeg(rec.frames[("mj", p.seq)].data)
        assert img.shape == raw.shape
        h, w = img.shape[:2]
        thick = line_width(w, h)
        for d in r.detections:
            top, bottom = round(d.box.ymin * h), round(d.box.ymax * h)
            if bottom - top < 80:
                continue
            # The middle of the left edge: clear of the label above the box.
            y0, y1 = top + (bottom - top) // 4, bottom - 3 * thick
            x = round(d.box.xmin * w)
            drawn = edge_match(img, x, y0, y1, color_for(d.class_id))
            before = edge_match(raw, x, y0, y1, color_for(d.class_id))
            assert drawn > 0.6 and drawn - before > 0.4, (p.seq, r.seq, d.label, drawn, before)
            checked += 1
    assert checked >= 5, f"only {checked} boxes checked"

    # The results feed: the results as published, as JSON, in order.
    assert [r["seq"] for r in feed] == sorted({r["seq"] for r in feed})
    for item in feed:
        r = rec.result("mj", item["seq"])
        assert item["latency_s"] == pytest.approx(r.latency_s, abs=1e-5)
        body = {k: v for k, v in item.items() if k not in ("latency_s", "has_mask")}
        assert Result.model_validate(body) == r
    assert pub.metric("lensbus_publisher_frames_served_total", 'camera="mj",stream="device"') >= 12


async def test_twenty_viewers_get_one_render_per_frame(
    nats: NatsServer, start_service, demo_models: dict[str, Path]
) -> None:
    inf = start_service("inference", nats.url, model=demo_models[YOLO], cameras="crowd", threads=1)
    pub = start_publisher(start_service, nats.url)
    inf.wait_healthy(60)
    start_service("capture", nats.url, camera="crowd", source="test", fps=10)
    base = f"http://127.0.0.1:{pub.port}"
    label = 'camera="crowd"'

    def metric(name: str, labels: str = label) -> float:
        return pub.metric(f"lensbus_publisher_{name}", labels)

    def rendered_and_received() -> tuple[float, float, float]:
        """Both counters from one scrape (two scrapes would be apart by some frames)."""
        _, body = pub.http("/metrics")
        values = dict(line.rsplit(" ", 1) for line in body.splitlines() if "{" + label in line)
        return (
            float(values[f"lensbus_publisher_frames_rendered_total{{{label}}}"]),
            float(values[f"lensbus_publisher_frames_received_total{{{label}}}"]),
            time.monotonic(),
        )

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await wait_camera(http, base, "crowd", results=True)
        stop = asyncio.Event()
        viewers = [Viewer() for _ in range(20)]
        url = f"{base}/cameras/crowd/project.mjpeg"
        tasks = [asyncio.create_task(v.read(http, url, stop=stop)) for v in viewers]
        await until(lambda: all(len(v.parts) >= 2 for v in viewers), 30, "20 viewers served")
        assert metric("viewers", 'camera="crowd",stream="project"') == 20
        r0, f0, t0 = rendered_and_received()
        await asyncio.sleep(6)
        r1, f1, t1 = rendered_and_received()
        stop.set()
        await asyncio.gather(*tasks)

        frames, rendered = f1 - f0, r1 - r0
        assert frames >= 40, frames
        # One render per frame: never more renders than frames (but the frame in the works
        # and the one waiting for it at the start of the window), none undrawn at 10 fps.
        assert rendered <= frames + 2, (rendered, frames)
        assert rendered >= 0.9 * frames - 2, (rendered, frames)
        bodies: dict[int, str] = {}
        for v in viewers:
            window = [p for p in v.parts if t0 <= p.t <= t1]
            seqs = [p.seq for p in v.parts]
            # A frame drawn twice would reach every viewer twice.
            assert seqs == sorted(set(seqs)), "a viewer got a frame twice or out of order"
            assert len(window) >= 0.7 * rendered - 2, (len(window), rendered)
            for p in v.parts:
                digest = hashlib.sha256(p.body).hexdigest()
                assert bodies.setdefault(p.seq, digest) == digest, "viewers got different renders"

        # Nobody watches: the gauge drops and rendering stops.
        await until(
            lambda: metric("viewers", 'camera="crowd",stream="project"') == 0, 10, "viewers gone"
        )
        await asyncio.sleep(0.5)  # a render that was in the works when the last one left
        idle0 = metric("frames_rendered_total")
        await asyncio.sleep(2)
        assert metric("frames_rendered_total") == idle0
        assert metric("frames_received_total") > f1 + 10  # frames still come, not drawn


async def test_a_stalled_viewer_does_not_grow_memory_or_slow_others(
    nats: NatsServer, start_service
) -> None:
    pub = start_publisher(start_service, nats.url, viewer_stall_s=12)
    base = f"http://127.0.0.1:{pub.port}"
    if not PHOTOS.is_dir():
        pytest.skip("Debian package darknet (real photos) is not installed")
    big = cv2.resize(cv2.imread(str(PHOTOS / "dog.jpg")), (1920, 1080))
    jpeg = encode_jpeg(big, 92)
    fps = 30
    nc = await nats_py.connect(nats.url)
    published: list[float] = []

    async def camera() -> None:
        seq, next_t = 0, time.monotonic()
        while True:
            env = FrameEnvelope(
                camera="big", seq=seq, capture_ns=time.time_ns(), width=1920, height=1080, data=jpeg
            )
            await nc.publish(Subjects().frames("big"), encode(env))
            published.append(time.monotonic())
            seq += 1
            next_t += 1 / fps
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))

    cam_task = asyncio.create_task(camera())
    stalled: list[socket.socket] = []
    try:
        async with aiohttp.ClientSession() as http:
            await wait_camera(http, base, "big")
            # Two viewers that ask and then never read, with a tiny receive buffer.
            for stream in ("device", "project"):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.connect(("127.0.0.1", pub.port))
                s.sendall(f"GET /cameras/big/{stream}.mjpeg HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                stalled.append(s)
            healthy = Viewer()
            stop = asyncio.Event()
            reading = asyncio.create_task(
                healthy.read(http, f"{base}/cameras/big/device.mjpeg", stop=stop)
            )
            await asyncio.sleep(3)  # socket buffers fill; the stalled writes block
            assert pub.metric("lensbus_publisher_viewers", 'camera="big",stream="device"') == 2
            assert pub.metric("lensbus_publisher_viewers", 'camera="big",stream="project"') == 1
            base_rss = rss_bytes(pub.proc.pid)
            t0 = time.monotonic()
            peak = base_rss
            while time.monotonic() - t0 < 7:
                await asyncio.sleep(0.5)
                peak = max(peak, rss_bytes(pub.proc.pid))
            t1 = time.monotonic()
            sent = sum(1 for t in published if t0 <= t <= t1)
            got = sum(1 for p in healthy.parts if t0 <= p.t <= t1)
            # 7 s at 30 fps of ~0.4 MB frames would be ~90 MB per stalled viewer if queued.
            grew = (peak - base_rss) / 1e6
            assert grew < 30, f"RSS grew {grew:.1f} MB with a stalled viewer"
            assert sent >= 120 and got >= 0.7 * sent, (got, sent)
            # The stalled viewers are cut off after viewer_stall_s; the healthy one stays.
            drops = 'reason="stalled",stream="{}"'  # labels come sorted
            await until(
                lambda: (
                    pub.metric("lensbus_publisher_viewer_drops_total", drops.format("device")) >= 1
                    and pub.metric("lensbus_publisher_viewer_drops_total", drops.format("project"))
                    >= 1
                ),
                20,
                "stalled viewers cut off",
            )
            assert pub.metric("lensbus_publisher_viewers", 'camera="big",stream="device"') == 1
            assert pub.metric("lensbus_publisher_viewers", 'camera="big",stream="project"') == 0
            stop.set()
            await reading
    finally:
        cam_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cam_task
        for s in stalled:
            s.close()
        await nc.close()
    assert pub.stop() == 0


# ---- rules, events, snapshots, webhooks ------------------------------------------------------


class Receiver:
    """Local webhook endpoints: /hook records, /fail answers 500, /hang never answers."""

    def __init__(self) -> None:
        self.hook: list[tuple[float, dict[str, Any]]] = []
        self.fail = 0
        self.hang = 0
        self.release = asyncio.Event()
        self.port = free_port()

    async def _hook(self, request: web.Request) -> web.Response:
        self.hook.append((time.monotonic(), await request.json()))
        return web.Response(status=204)

    async def _fail(self, request: web.Request) -> web.Response:
        self.fail += 1
        return web.Response(status=500, text="broken")

    async def _hang(self, request: web.Request) -> web.Response:
        self.hang += 1
        await self.release.wait()
        return web.Response(status=204)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        app.router.add_post("/fail", self._fail)
        app.router.add_post("/hang", self._hang)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        await self.runner.cleanup()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def expected_firings(results: list[Result], label: str, score: float, n: int, cool_s: float):
    """The seqs a rule should fire on, worked out independently from the results."""
    fired, streak, last = [], 0, None
    for r in results:
        if any(d.label == label and d.score >= score for d in r.detections):
            streak += 1
        else:
            streak = 0
            continue
        if streak >= n and (last is None or r.capture_ns - last >= cool_s * 1e9):
            fired.append(r.seq)
            last = r.capture_ns
    return fired


async def test_rules_fire_once_per_cooldown_with_snapshot_and_webhooks(
    nats: NatsServer, start_service, demo_models: dict[str, Path], tmp_path: Path, recorder
) -> None:
    rec = await recorder("dogs", "birds")
    async with Receiver() as hooks:
        rules = [
            {
                "name": "dog",
                "labels": ["dog"],
                "min_score": 0.5,
                "consecutive": 2,
                "cooldown_s": 2.0,
                "webhook": hooks.url("/hook"),
            },
            {
                "name": "dog-hang",
                "labels": ["dog"],
                "cooldown_s": 1.0,
                "webhook": hooks.url("/hang"),
            },
            {
                "name": "dog-fail",
                "labels": ["dog"],
                "cooldown_s": 1.0,
                "webhook": hooks.url("/fail"),
            },
        ]
        inf = start_service("inference", nats.url, model=demo_models[YOLO], cameras="dogs,birds")
        pub = start_publisher(
            start_service,
            nats.url,
            rules=rules,
            webhook_timeout_s=3.0,
            webhook_retries=2,
            webhook_backoff_s=0.2,
        )
        inf.wait_healthy(60)
        dogs = photos(tmp_path, "dog.jpg", folder="dogs")
        birds = photos(tmp_path, "eagle.jpg", folder="birds")
        base = f"http://127.0.0.1:{pub.port}"
        async with aiohttp.ClientSession() as http:
            cap_dogs = start_service(
                "capture", nats.url, camera="dogs", source=dogs, fps=4, loop="true"
            )
            cap_birds = start_service(
                "capture", nats.url, camera="birds", source=birds, fps=4, loop="true"
            )
            await wait_camera(http, base, "dogs")
            stream = Viewer()
            stop = asyncio.Event()
            reading = asyncio.create_task(
                stream.read(http, f"{base}/cameras/dogs/device.mjpeg", stop=stop)
            )
            await until(lambda: sum(e.rule == "dog" for e in rec.events) >= 4, 60, "4 'dog' events")
            cap_dogs.stop()
            cap_birds.stop()
            await asyncio.sleep(1.5)  # the last results and events
            stop.set()
            await reading

        # The failing webhook is retried (1 + 2 tries per event), the hanging one times out.
        # (The receiver counts the requests; on a loaded machine an answer can come after
        # the client's timeout, so the publisher's own count may file one as a timeout.)
        def failures() -> tuple[int, int, float, float]:
            return (
                3 * sum(e.rule == "dog-fail" for e in rec.events),
                hooks.fail,
                pub.metric("lensbus_publisher_webhook_attempts_total", 'result="http_500"'),
                pub.metric("lensbus_publisher_webhook_deliveries_total", 'outcome="dropped"'),
            )

        def settled() -> bool:
            tries, received, answered_500, failed = failures()
            return tries == received and tries - 2 <= answered_500 and failed >= tries // 3

        with contextlib.suppress(AssertionError):
            await until(settled, 20, "retries of the failing webhook")
        tries, received, answered_500, failed = failures()
        assert settled() and answered_500 <= tries, failures()
        assert hooks.hang >= 1
        assert pub.metric("lensbus_publisher_webhook_attempts_total", 'result="timeout"') >= 1

        # Events only where the label is, and exactly once per cooldown there.
        assert rec.events and {e.camera for e in rec.events} == {"dogs"}
        assert not any(
            d.label == "dog" and d.score >= 0.5 for r in rec.results["birds"] for d in r.detections
        ), "the bird photo has a dog in it after all"
        assert len(rec.results["birds"]) >= 10
        dog_events = [e for e in rec.events if e.rule == "dog"]
        assert [e.seq for e in dog_events] == expected_firings(
            rec.results["dogs"], "dog", 0.5, 2, 2.0
        )
        gaps = [(b.capture_ns - a.capture_ns) / 1e9 for a, b in pairwise(dog_events)]
        assert all(g >= 2.0 for g in gaps), gaps
        assert pub.metric("lensbus_publisher_events_raised_total", 'rule="dog"') == len(dog_events)
        for e in dog_events:
            assert e.label == "dog" and e.score >= 0.5 and e.consecutive >= 2
            assert e.box is not None and e.model is not None
            assert (e.event_ns - e.capture_ns) / 1e9 < 2.5, "event held up"

        # The webhook got the same events, as JSON.
        delivered = 'outcome="delivered"'
        await until(
            lambda: (
                len(hooks.hook) == len(dog_events)
                and pub.metric("lensbus_publisher_webhook_deliveries_total", delivered)
                == len(dog_events)
            ),
            10,
            "webhook deliveries",
        )
        assert [Event.model_validate(body) for _, body in hooks.hook] == dog_events

        # The events are in the results stream too: `lensbus watch --events` replays them.
        env = {k: v for k, v in os.environ.items() if not k.startswith("LENSBUS_")}
        watch = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lensbus.cli.main",
            "watch",
            "dogs",
            "--events",
            "--since",
            "5m",
            "--json",
            "--no-follow",
            "--nats-url",
            nats.url,
            stdout=subprocess.PIPE,
            env=env,
        )
        out, _ = await asyncio.wait_for(watch.communicate(), 30)
        assert watch.returncode == 0
        replayed = [Event.model_validate(json.loads(line)) for line in out.decode().splitlines()]
        assert replayed == rec.events

        # The snapshot is the JPEG of the frame that fired, in the object store.
        js = rec.nc.jetstream()
        store = await js.object_store(SNAPSHOTS_BUCKET)
        for e in dog_events[:2]:
            got = await store.get(e.snapshot)
            assert got.data == rec.frames[("dogs", e.seq)].data

        # A hanging and a failing webhook did not hold up the device stream: its frames
        # left the publisher as they came, while the hanging webhook's attempts (3 s each)
        # went on all along. (A loaded machine may delay a frame or two by itself.)
        assert len(stream.parts) >= 20
        delays = sorted(p.wall - int(p.headers["x-capture-ns"]) / 1e9 for p in stream.parts)
        assert statistics.median(delays) < 0.2, delays
        assert delays[-1] < 2.5 and sum(d > 0.8 for d in delays) <= 2, delays[-5:]
        assert pub.proc.poll() is None
        assert pub.stop() == 0


# ---- durable results -------------------------------------------------------------------------


async def test_an_offline_subscriber_replays_what_it_missed(
    nats: NatsServer, start_service, demo_models: dict[str, Path], tmp_path: Path, recorder
) -> None:
    rec = await recorder("replay")
    inf = start_service("inference", nats.url, model=demo_models[YOLO], cameras="replay")
    start_publisher(
        start_service, nats.url, stream_max_age_s=3600, stream_max_bytes=64 * 1024 * 1024
    )
    # The stream is shared by the session's tests: this publisher updates its limits at start.
    deadline = time.monotonic() + 20
    while True:
        info = await rec.nc.jetstream().stream_info(RESULTS_STREAM)
        if info.config.max_age == 3600 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert info.config.max_age == 3600 and info.config.max_bytes == 64 * 1024 * 1024
    assert sorted(info.config.subjects or []) == ["lensbus.events.*", "lensbus.results.*"]
    inf.wait_healthy(60)
    folder = photos(tmp_path, "dog.jpg", "person.jpg", "horses.jpg")
    start_service("capture", nats.url, camera="replay", source=folder, fps=4, loop="true")
    # The watcher is offline while the first results come.
    await until(lambda: len(rec.results.get("replay", [])) >= 10, 60, "10 results")
    missed = [r.seq for r in rec.results["replay"]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LENSBUS_")}
    cmd = [
        sys.executable,
        "-m",
        "lensbus.cli.main",
        "watch",
        "replay",
        "--since",
        "5m",
        "--json",
        "--nats-url",
        nats.url,
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    lines: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(60):
            # Replayed, then live: read until results newer than the start come.
            while not lines or lines[-1]["seq"] < missed[-1] + 6:
                line = await proc.stdout.readline()
                assert line, (await proc.stderr.read()).decode()  # type: ignore[union-attr]
                lines.append(json.loads(line))
    finally:
        proc.send_signal(signal.SIGINT)
        # Drain its pipes while it stops: a watcher blocked writing to a full pipe cannot exit.
        try:
            await asyncio.wait_for(proc.communicate(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError("lensbus watch did not stop on SIGINT") from None
    seqs = [item["seq"] for item in lines]
    assert seqs == sorted(set(seqs)), "replay is in order, without repeats"
    assert set(missed) <= set(seqs), "every missed result was replayed"
    assert set(seqs) <= {r.seq for r in rec.results["replay"]}
    first = Result.model_validate({k: v for k, v in lines[0].items() if k != "latency_s"})
    assert first == rec.result("replay", first.seq).model_copy(update={"mask_png": None})

    # --no-follow stops once caught up; --since bounds the replay.
    t_cut = time.time_ns()
    await asyncio.sleep(2.0)
    done = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lensbus.cli.main",
        "watch",
        "replay",
        "--since",
        "1s",
        "--json",
        "--no-follow",
        "--nats-url",
        nats.url,
        stdout=subprocess.PIPE,
        env=env,
    )
    out, _ = await asyncio.wait_for(done.communicate(), 30)
    assert done.returncode == 0
    bounded = [json.loads(line) for line in out.decode().splitlines()]
    assert 1 <= len(bounded) <= 4 * 1.5 + 2
    assert all(item["result_ns"] >= t_cut for item in bounded)


# ---- security and bad input ------------------------------------------------------------------


def fetch(
    port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, bytes]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", headers=headers or {}, method=method
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read(256)
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()


async def test_off_loopback_needs_a_token(nats: NatsServer, start_service) -> None:
    bad = start_service("publisher", nats.url, host="0.0.0.0")
    assert bad.proc.wait(30) == 2
    assert "token (env LENSBUS_PUBLISHER_TOKEN)" in bad.log, bad.log

    secret = "tok-" + secrets.token_hex(12)
    pub = start_service("publisher", nats.url, host="0.0.0.0", token=secret, log_level="DEBUG")
    pub.wait_healthy(30)  # /healthz needs no token (probes)
    port = pub.port
    nc = await nats_py.connect(nats.url)
    jpeg = encode_jpeg(np.full((48, 64, 3), 128, np.uint8))
    env = FrameEnvelope(
        camera="sec", seq=1, capture_ns=time.time_ns(), width=64, height=48, data=jpeg
    )
    await nc.publish(Subjects().frames("sec"), encode(env))
    await nc.flush()
    await nc.close()
    good = {"Authorization": f"Bearer {secret}"}
    for path in ("/", "/api/cameras", "/api/status", "/metrics", "/cameras/sec/results"):
        assert fetch(port, path)[0] == 401, path
        assert fetch(port, path, {"Authorization": "Bearer wrong"})[0] == 401, path
        if path != "/cameras/sec/results":  # an endless stream: checked below
            assert fetch(port, path, good)[0] == 200, path
            assert fetch(port, f"{path}?token={secret}")[0] == 200, path
    assert fetch(port, "/?token=wrong")[0] == 401
    # The page's <img> URLs carry ?token=: the MJPEG stream answers with the first frame.
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}/cameras/sec/device.mjpeg?token={secret}", timeout=5
    ) as r:
        assert r.status == 200 and r.read(len(jpeg)).find(jpeg[:64]) > 0
    with urllib.request.urlopen(
        urllib.request.Request(f"http://127.0.0.1:{port}/cameras/sec/results", headers=good),
        timeout=5,
    ) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    assert pub.stop() == 0
    assert secret not in pub.log, "the token was logged"


def fetch_all(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, dict(e.headers), e.read()


async def test_the_page_needs_no_inline_script_or_style(nats: NatsServer, start_service) -> None:
    """A strict CSP: no 'unsafe-inline', so an injected <script> or style= never runs; the
    page's own script and styles are files, fetched with the page's ?token=."""
    secret = "tok-" + secrets.token_hex(12)
    pub = start_service("publisher", nats.url, host="0.0.0.0", token=secret)
    pub.wait_healthy(30)
    status, headers, html = fetch_all(pub.port, f"/?token={secret}")
    assert status == 200
    csp = dict(d.strip().split(" ", 1) for d in headers["Content-Security-Policy"].split(";"))
    assert "unsafe-inline" not in headers["Content-Security-Policy"], csp
    assert csp["script-src"] == "'self'" and csp["style-src"] == "'self'", csp
    page = html.decode()
    assert "<style" not in page and " style=" not in page, "inline styles"
    assert not re.search(r"<script(?![^>]*\bsrc=)", page), "an inline <script>"
    assert not re.search(r"\son[a-z]+\s*=", page), "an inline event handler"
    # The assets carry the token the page came with (the browser sends nothing else).
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page)
    expected = {"/static/app.js", "/static/live.js", "/static/app.css"}
    assert {a.split("?")[0] for a in assets} == expected, assets
    for asset in assets:
        assert asset.endswith(f"?token={secret}"), asset
        status, headers, body = fetch_all(pub.port, asset)
        assert status == 200 and len(body) > 500, (asset, status)
        kind = "css" if ".css?" in asset else "javascript"
        assert kind in headers["Content-Type"], headers
        assert "unsafe-inline" not in headers["Content-Security-Policy"]
        assert fetch_all(pub.port, asset.split("?")[0])[0] == 401, "an asset without the token"
    assert fetch_all(pub.port, "/static/nothing.js?token=" + secret)[0] == 404
    assert fetch_all(pub.port, "/static/../web.py?token=" + secret)[0] == 404
    # A page fetched with the header (a proxy adds it) puts no token into the HTML.
    req = urllib.request.Request(
        f"http://127.0.0.1:{pub.port}/", headers={"Authorization": f"Bearer {secret}"}
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        assert secret not in r.read().decode()
    assert pub.stop() == 0
    assert secret not in pub.log, "the token was logged"


async def test_bad_messages_are_counted_and_never_crash(nats: NatsServer, start_service) -> None:
    pub = start_publisher(start_service, nats.url)
    base = f"http://127.0.0.1:{pub.port}"
    subjects = Subjects()
    nc = await nats_py.connect(nats.url)
    good = encode_jpeg(np.full((48, 64, 3), 90, np.uint8))

    def frame(seq: int, data: bytes, camera: str = "junk") -> bytes:
        return encode(
            FrameEnvelope(
                camera=camera, seq=seq, capture_ns=time.time_ns(), width=64, height=48, data=data
            )
        )

    await nc.publish(subjects.frames("junk"), frame(0, good))
    await nc.flush()
    async with aiohttp.ClientSession() as http:
        await wait_camera(http, base, "junk")
        project = Viewer()
        stop = asyncio.Event()
        reading = asyncio.create_task(
            project.read(http, f"{base}/cameras/junk/project.mjpeg", stop=stop)
        )
        await until(lambda: len(project.parts) >= 1, 10, "first project frame")
        bad = [
            (subjects.frames("junk"), b"\x00\x01 not msgpack"),
            (subjects.frames("junk"), msgpack.packb({"v": 99})),
            (subjects.frames("junk"), msgpack.packb({"v": 1, "camera": "junk", "seq": -1})),
            (subjects.frames("junk"), frame(1, good, camera="other")),  # camera mismatch
            (subjects.frames("junk"), frame(2, b"\xff\xd8 not really a jpeg")),
            (subjects.results("junk"), b""),
            (subjects.results("junk"), msgpack.packb({"v": 1, "camera": "junk"})),
            (subjects.status("x", "y"), b"\x93garbage"),
        ]
        for subject, payload in bad:
            await nc.publish(subject, payload)
        await nc.flush()
        await asyncio.sleep(1.0)
        await nc.publish(subjects.frames("junk"), frame(3, good))
        await nc.flush()
        await until(lambda: project.parts[-1].seq == 3, 10, "a good frame after the bad ones")
        stop.set()
        await reading
    await nc.close()
    for reason, n in (
        ("malformed", 3),
        ("unknown_version", 1),
        ("invalid", 2),
        ("camera_mismatch", 1),
    ):
        got = pub.metric("lensbus_messages_rejected_total", f'reason="{reason}"')
        assert got == n, (reason, got)
    assert pub.metric("lensbus_publisher_render_errors_total", 'camera="junk"') == 1
    assert fetch(pub.port, "/cameras/junk/device.mjpeg", method="HEAD")[0] == 405  # GET only
    assert fetch(pub.port, "/cameras/nosuch/device.mjpeg")[0] == 404
    # A viewer that leaves while no frame comes is noticed all the same.
    assert pub.metric("lensbus_publisher_viewers", 'camera="junk",stream="device"') == 0
    async with aiohttp.ClientSession() as http:
        await Viewer().read(http, f"{base}/cameras/junk/device.mjpeg", count=1)
    await until(
        lambda: (
            pub.metric("lensbus_publisher_viewers", 'camera="junk",stream="device"') == 0
            and pub.metric("lensbus_publisher_viewers", 'camera="junk",stream="project"') == 0
        ),
        10,
        "viewers that left counted out",
    )
    assert pub.healthz()[0] == 200 and pub.proc.poll() is None
    assert pub.stop() == 0
