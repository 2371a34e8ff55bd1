"""Cameras at run time: ``lensbus cameras`` writes the KV bucket ``lensbus-cameras``, capture
processes follow it (``cameras_from=bucket``) and report each camera's state back.

Real nats-server, real capture (and inference and publisher) processes, the real CLI run as
a subprocess, frames read off the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats as nats_py
import pytest
from nats.js.errors import BucketNotFoundError

from lensbus import Subjects, decode
from lensbus.cameras import CameraExists, CamerasBucket
from lensbus.codec import DecodeError
from lensbus.natsserver import NatsServer, free_port
from lensbus.schemas import FrameEnvelope
from lensbus.schemas.camera import CameraConfig

ROOT = Path(__file__).resolve().parent.parent
LENSBUS = [sys.executable, "-m", "lensbus.cli.main"]
YOLO = "yolov3-tiny-onnx"
FPS = 4  # per camera: four cameras plus a model on two cores


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LENSBUS_")}


async def cameras_cli(url: str, *args: str) -> tuple[int, str, str]:
    """``lensbus cameras ARGS --nats-url URL`` as a subprocess (the loop keeps running)."""
    proc = await asyncio.create_subprocess_exec(
        *LENSBUS,
        "cameras",
        *args,
        "--nats-url",
        url,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def ok(url: str, *args: str) -> str:
    code, out, err = await cameras_cli(url, *args)
    assert code == 0, f"lensbus cameras {' '.join(args)}: exit {code}\n{out}{err}"
    return out


async def listed(url: str) -> dict[str, dict[str, Any]]:
    return {row["id"]: row for row in json.loads(await ok(url, "list", "--json"))}


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def until_listed(
    url: str, check: Callable[[dict[str, dict[str, Any]]], bool], timeout: float, what: str
) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = await listed(url)
        if check(rows):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; `cameras list`: {rows}")
        await asyncio.sleep(0.2)


async def until_page(
    pub: Any, check: Callable[[dict[str, dict[str, Any]]], bool], what: str, timeout: float = 30
) -> dict[str, dict[str, Any]]:
    """Poll the publisher's ``/api/cameras`` (what the page shows) until ``check`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        code, body = await asyncio.to_thread(pub.http, "/api/cameras")
        cams = {c["id"]: c for c in json.loads(body)["cameras"]} if code == 200 else {}
        if check(cams):
            return cams
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; /api/cameras: {cams}")
        await asyncio.sleep(0.2)


def page_state(cams: dict[str, dict[str, Any]], camera: str) -> str | None:
    st = cams.get(camera, {}).get("state")
    return st["state"] if st else None


def state(rows: dict[str, dict[str, Any]], camera: str) -> str | None:
    st = rows.get(camera, {}).get("state")
    return st["state"] if st else None


class Frames:
    """Device-stream frames of some cameras: seq and arrival time of each."""

    def __init__(self) -> None:
        self.seen: dict[str, list[tuple[int, float]]] = {}

    async def start(self, url: str, cameras: list[str]) -> Frames:
        self.nc = await nats_py.connect(url)

        async def on_frame(msg: Any) -> None:
            with contextlib.suppress(DecodeError):
                env = decode(msg.data, FrameEnvelope)
                self.seen.setdefault(env.camera, []).append((env.seq, time.monotonic()))

        for camera in cameras:
            await self.nc.subscribe(Subjects().frames(camera), cb=on_frame)
        await self.nc.flush()
        return self

    def count(self, camera: str) -> int:
        return len(self.seen.get(camera, []))

    def last_at(self, camera: str) -> float:
        return self.seen[camera][-1][1]

    def assert_contiguous(self, camera: str) -> None:
        seqs = [s for s, _ in self.seen.get(camera, [])]
        assert seqs, f"no frame of {camera}"
        gaps = [(a, b) for a, b in zip(seqs, seqs[1:], strict=False) if b != a + 1]
        assert not gaps, f"{camera} lost frames: seq jumps {gaps[:5]} in {len(seqs)} frames"

    async def close(self) -> None:
        await self.nc.close()


def start_capture(start_service: Any, url: str, **settings: Any) -> Any:
    cap = start_service("capture", url, cameras_from="bucket", **settings)
    cap.wait_healthy(60)
    return cap


# ---- bad input: refused, naming the field, exit 2 ------------------------------------------


async def test_bad_add_input_is_refused_naming_the_field(
    fresh_nats: NatsServer, tmp_path: Path
) -> None:
    url = fresh_nats.url
    await ok(url, "add", "cam1", "test", "--fps", "5")
    extra = tmp_path / "cam.yaml"
    extra.write_text("id: cam2\nsource: test\nfsp: 5\n")
    cases = [
        (["add", "--from-file", str(extra)], "fsp"),
        (["add", "cam1", "test"], "id: camera 'cam1' exists"),
        (["add", "cam 1", "test"], "id"),
        (["add", "cam.x", "test"], "id"),
        (["add", "cam3", "test", "--fps", "0"], "fps"),
        (["add", "cam3", "test", "--rtsp-transport", "quic"], "--rtsp-transport"),
        (["add", "cam3", "test", "--fourcc", "MJPEG"], "options.fourcc"),
        (["add", "cam3"], "source: required"),
        (["update", "cam1", "--fps", "0"], "fps"),
        (["update", "cam1"], "nothing to change"),
    ]
    for args, field in cases:
        code, out, err = await cameras_cli(url, *args)
        assert code == 2, f"{args}: exit {code}\n{out}{err}"
        assert field in err, f"{args}: {err!r} does not name {field!r}"
    # Nothing of it reached the bucket; cam1 kept its fps.
    rows = await listed(url)
    assert set(rows) == {"cam1"} and rows["cam1"]["config"]["fps"] == 5


async def test_update_changes_only_what_is_given_and_remove_deletes(
    fresh_nats: NatsServer, tmp_path: Path
) -> None:
    url = fresh_nats.url
    good = tmp_path / "cam.json"
    good.write_text(json.dumps({"id": "door", "source": "rtsp://cam/door", "fps": 8}))
    await ok(url, "add", "--from-file", str(good), "--group", "entrance")
    await ok(
        url, "update", "door", "--fps", "3", "--rtsp-transport", "tcp", "--capture-size", "640x480"
    )
    config = (await listed(url))["door"]["config"]
    want = CameraConfig(
        id="door",
        source="rtsp://cam/door",
        fps=3,
        group="entrance",
        options={"rtsp_transport": "tcp", "capture_width": 640, "capture_height": 480},
    )
    assert CameraConfig.model_validate(config) == want
    await ok(url, "update", "door", "--open-timeout", "3")
    config = (await listed(url))["door"]["config"]
    assert config["options"]["rtsp_transport"] == "tcp" and config["options"]["open_timeout_s"] == 3
    assert "no cameras" not in await ok(url, "list")
    await ok(url, "remove", "door")
    assert await listed(url) == {}
    code, _, err = await cameras_cli(url, "remove", "door")
    assert code == 1 and "no camera 'door'" in err
    code, _, err = await cameras_cli(url, "update", "door", "--fps", "2")
    assert code == 1 and "no camera 'door'" in err


async def test_unreachable_nats_is_exit_3() -> None:
    code, _, err = await cameras_cli(f"nats://127.0.0.1:{free_port()}", "list", "--timeout", "2")
    assert code == 3 and "unreachable" in err


# ---- capture follows the bucket ------------------------------------------------------------


@pytest.mark.slow
async def test_cameras_added_and_removed_live_others_lose_no_frame(
    fresh_nats: NatsServer, start_service, demo_models: dict[str, Path]
) -> None:
    if YOLO not in demo_models:
        pytest.skip(f"demo package {YOLO} not built")
    url = fresh_nats.url
    pub = start_service("publisher", url)  # its one port is the harness's metrics port
    inf = start_service("inference", url, model=demo_models[YOLO], threads=1)
    for camera in ("a", "b", "c"):
        await ok(url, "add", camera, "test", "--fps", str(FPS), "--width", "320", "--height", "240")
    frames = await Frames().start(url, ["a", "b", "c", "d"])
    cap = start_capture(start_service, url)
    pub.wait_healthy(60)
    inf.wait_healthy(120)
    await until(lambda: all(frames.count(c) >= 3 for c in "abc"), 30, "frames of a, b and c")
    await until_listed(
        url, lambda r: all(state(r, c) == "running" for c in "abc"), 30, "a, b, c running"
    )

    # `lensbus watch` of every camera, live: its first line says it is reading.
    watch = await asyncio.create_subprocess_exec(
        *LENSBUS,
        "watch",
        "*",
        "--json",
        "--nats-url",
        url,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    try:
        assert watch.stdout is not None
        async with asyncio.timeout(120):
            assert await watch.stdout.readline(), "lensbus watch printed nothing"

        await ok(url, "remove", "b")
        removed_at = time.monotonic()
        await ok(url, "add", "d", "test", "--fps", str(FPS), "--width", "320", "--height", "240")
        added_at = time.monotonic()
        async with asyncio.timeout(30):
            while True:
                line = await watch.stdout.readline()
                assert line, "lensbus watch ended"
                if json.loads(line)["camera"] == "d":
                    break
        seen_after = time.monotonic() - added_at
        assert seen_after < 5.0, f"d's first result came {seen_after:.1f} s after the add"
    finally:
        watch.send_signal(signal.SIGINT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watch.communicate(), 30)

    # b stopped within 2 s: a and c went on for 3 s more without a frame of b.
    a_then = frames.count("a")
    await until(lambda: frames.count("a") >= a_then + 3 * FPS, 30, "3 s more of a")
    assert frames.last_at("b") - removed_at < 2.0, "b still published 2 s after its removal"
    rows = await until_listed(
        url, lambda r: state(r, "d") == "running" and "b" not in r, 30, "d running, b gone"
    )
    assert {c for c in rows} == {"a", "c", "d"}
    for camera in ("a", "c"):
        frames.assert_contiguous(camera)
    await frames.close()
    assert cap.stop() == 0, cap.log


@pytest.mark.slow
async def test_a_source_that_cannot_open_is_retrying_with_its_reason(
    fresh_nats: NatsServer, start_service
) -> None:
    url = fresh_nats.url
    pub = start_service("publisher", url)  # the page shows the bucket's cameras and states
    await ok(url, "add", "good", "test", "--fps", str(FPS), "--width", "320", "--height", "240")
    frames = await Frames().start(url, ["good"])
    cap = start_capture(start_service, url)
    pub.wait_healthy(60)
    await until(lambda: frames.count("good") >= 3, 30, "frames of good")
    await ok(url, "add", "gone", "/dev/video97", "--fps", "5")
    await ok(url, "add", "nowhere", "rtsp://127.0.0.1:9/none", "--open-timeout", "2")
    rows = await until_listed(
        url,
        lambda r: state(r, "gone") == "retrying" and state(r, "nowhere") == "retrying",
        60,
        "both bad sources retrying",
    )
    for camera in ("gone", "nowhere"):
        reason = rows[camera]["state"]["reason"]
        assert reason, f"{camera} retrying without a reason"
    assert "/dev/video97" in rows["gone"]["state"]["reason"]
    # Bad cameras beside a good one do not make capture unhealthy (a healthcheck restart cannot
    # mend a bad URL); they are named in its health detail instead.
    code, health = cap.healthz()
    assert code == 200, f"capture unhealthy while 'good' runs: {health}"
    table = await ok(url, "list")
    assert "retrying" in table and "gone:" in table
    # The page's camera list shows the same, live: state and reason; a removed camera leaves it.
    page = await until_page(pub, lambda c: page_state(c, "gone") == "retrying", "gone on the page")
    assert "/dev/video97" in page["gone"]["state"]["reason"]
    await ok(url, "remove", "gone")
    await until_page(pub, lambda c: "gone" not in c and "good" in c, "gone off the page")
    # ... and retried, while good streams on, without a lost frame.
    good_then = frames.count("good")
    await until(lambda: frames.count("good") >= good_then + 2 * FPS, 30, "2 s more of good")
    assert state(await listed(url), "good") == "running"
    frames.assert_contiguous("good")
    await frames.close()
    assert cap.stop() == 0, cap.log
    assert pub.stop() == 0, pub.log


@pytest.mark.slow
async def test_capture_killed_and_restarted_takes_its_cameras_back_from_the_bucket(
    fresh_nats: NatsServer, start_service
) -> None:
    url = fresh_nats.url
    for camera in ("k1", "k2"):
        await ok(url, "add", camera, "test", "--fps", str(FPS), "--width", "320", "--height", "240")
    frames = await Frames().start(url, ["k1", "k2", "own"])
    first = start_capture(start_service, url, instance="first")
    await until(lambda: frames.count("k1") >= 2 and frames.count("k2") >= 2, 30, "frames")
    first.kill()  # SIGKILL: no goodbye
    assert first.proc.wait(10) == -signal.SIGKILL
    before = {c: frames.count(c) for c in ("k1", "k2")}
    # The new instance has no camera of its own: everything comes from the bucket.
    start_capture(start_service, url, instance="second")
    await until(lambda: all(frames.count(c) >= before[c] + 3 for c in before), 30, "k1, k2 back")
    rows = await until_listed(
        url,
        lambda r: all(
            (r.get(c, {}).get("state") or {}).get("instance") == "second" for c in before
        ),
        30,
        "states written by the second instance",
    )
    assert all(state(rows, c) == "running" for c in before)
    await frames.close()


@pytest.mark.slow
async def test_both_the_settings_camera_wins_an_id_clash(
    fresh_nats: NatsServer, start_service
) -> None:
    url = fresh_nats.url
    await ok(url, "add", "own", "/dev/video97")  # would never open
    await ok(url, "add", "extra", "test", "--fps", str(FPS), "--width", "320", "--height", "240")
    frames = await Frames().start(url, ["own", "extra"])
    cap = start_service(
        "capture", url, cameras_from="both", camera="own", source="test", fps=FPS, width=320
    )
    cap.wait_healthy(60)
    await until(lambda: frames.count("own") >= 2 and frames.count("extra") >= 2, 30, "frames")
    rows = await until_listed(
        url, lambda r: state(r, "own") == "running", 30, "the settings camera running"
    )
    assert "ignored" in rows["own"]["state"]["reason"]
    assert cap.metric("lensbus_capture_desired_ignored_total", 'reason="clash"') == 1
    # A clean stop marks the cameras stopped (still wanted, nobody runs them).
    assert cap.stop() == 0, cap.log
    rows = await listed(url)
    assert state(rows, "extra") == "stopped", rows
    await frames.close()


async def test_views_follow_changes_and_survive_a_nats_restart(tmp_path: Path) -> None:
    port = free_port()
    server = NatsServer(tmp_path / "nats", port=port).start()
    nc = await nats_py.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    bucket = await CamerasBucket.open(nc.jetstream(timeout=2))
    stop = asyncio.Event()
    views: list[set[str]] = []

    async def follow() -> None:
        async for view in bucket.views(stop, states=False):
            views.append(set(view.configs))

    task = asyncio.create_task(follow())
    try:
        await until(lambda: views == [set()], 10, "the empty initial view")
        await bucket.add(CameraConfig(id="v1", source="test"))
        await until(lambda: views[-1] == {"v1"}, 10, "v1 in the view")
        server.stop()
        server = NatsServer(tmp_path / "nats", port=port).start()  # same store, same port
        await until(lambda: nc.is_connected, 20, "the reconnect")
        deadline = time.monotonic() + 20
        while True:  # JetStream answers a moment after the server: retry until it does
            try:
                await bucket.add(CameraConfig(id="v2", source="test"))
                break
            except CameraExists:
                break  # it was stored; only the answer was lost
            except nats_py.errors.TimeoutError:
                assert time.monotonic() < deadline, "JetStream never came back"
        await until(lambda: views[-1] == {"v1", "v2"}, 20, "v2 in a view after the restart")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await nc.close()
        server.stop()


async def test_a_reader_that_may_not_create_the_bucket_waits_for_it(
    fresh_nats: NatsServer,
) -> None:
    nc = await nats_py.connect(fresh_nats.url)
    js = nc.jetstream(timeout=2)
    reader = CamerasBucket(js, create=False)  # as the publisher: it may only read
    stop = asyncio.Event()
    views: list[set[str]] = []

    async def follow() -> None:
        async for view in reader.views(stop):
            views.append(set(view.configs))

    task = asyncio.create_task(follow())
    try:
        with pytest.raises(BucketNotFoundError):
            await CamerasBucket.open(js, create=False)
        writer = await CamerasBucket.open(js)  # capture or the CLI makes it
        await writer.add(CameraConfig(id="late", source="test"))
        await until(lambda: bool(views) and views[-1] == {"late"}, 20, "the late bucket's view")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await nc.close()
