"""The publisher's page in a real browser (headless Chromium over the DevTools protocol) while
real capture and inference run: both streams show pictures, the results list fills with
the real model's labels. The screenshot is kept in ``test-artifacts/publisher.png``."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import aiohttp
import nats as nats_py
import numpy as np
import pytest
from browser import Browser, available
from test_publisher import (
    ROOT,
    YOLO,
    Viewer,
    photos,
    start_publisher,
    until,
    wait_camera,
)

from lensbus import Subjects, encode
from lensbus.images import encode_jpeg
from lensbus.natsserver import NatsServer
from lensbus.schemas import Box, Detection, FrameEnvelope, ModelRef, Result

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not available(), reason="Debian package chromium is not installed"),
]

ARTIFACTS = ROOT / "test-artifacts"
COCO_SEEN = {"dog", "person", "horse", "sheep", "car", "truck", "bicycle"}

# Measures the live view's canvas, or an <img> (the current frame of its MJPEG stream) drawn
# on a canvas.
PIXELS_JS = """
(() => {
  const stats = (id) => {
    let c = document.getElementById(id);
    if (c.tagName === "IMG") {
      const img = c;
      if (!img.complete || !img.naturalWidth || img.hidden) return null;
      c = document.createElement("canvas");
      c.width = img.naturalWidth; c.height = img.naturalHeight;
      c.getContext("2d").drawImage(img, 0, 0);
    } else if (!c.dataset.seq) return null;  // the live view has drawn no frame yet
    const ctx = c.getContext("2d");
    const d = ctx.getImageData(0, 0, c.width, c.height).data;
    let n = 0, sum = 0, sq = 0, lit = 0;
    for (let i = 0; i < d.length; i += 4 * 7) {
      const y = 0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2];
      n++; sum += y; sq += y * y; if (y > 16) lit++;
    }
    const mean = sum / n;
    return {w: c.width, h: c.height, mean, std: Math.sqrt(sq / n - mean * mean), lit: lit / n};
  };
  return {live: stats("live"), project: stats("project")};
})()
"""


async def test_page_shows_both_streams_and_live_results(
    nats: NatsServer, start_service, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    inf = start_service("inference", nats.url, model=demo_models[YOLO], cameras="porch")
    # A slideshow changes the whole picture every frame: let the project stream wait for
    # each frame's own result (it comes within ~0.1 s) so the boxes match the photo.
    pub = start_publisher(start_service, nats.url, result_wait_s=1.0)
    inf.wait_healthy(60)
    folder = photos(tmp_path, "dog.jpg", "person.jpg", "horses.jpg")
    start_service("capture", nats.url, camera="porch", source=folder, fps=2, loop="true")
    base = f"http://127.0.0.1:{pub.port}"
    async with aiohttp.ClientSession() as http:
        await wait_camera(http, base, "porch", results=True)
        # With result_wait_s, each project frame carries its own result (joined by seq).
        parts = await asyncio.wait_for(
            Viewer().read(http, f"{base}/cameras/porch/project.mjpeg", count=4), 30
        )
        assert all(p.result_seq == p.seq for p in parts), [(p.seq, p.result_seq) for p in parts]

    async with Browser.launch(tmp_path) as browser:
        page = await browser.new_page(1400, 900)
        await page.goto(f"{base}/")
        # The page picks the camera, opens its live view and the results feed; the project
        # stream (drawn by the server) only when asked for.
        await page.wait_for("document.getElementById('camera-id').textContent === 'porch'", 30)
        assert await page.eval("document.getElementById('project').hidden")
        await page.eval("document.getElementById('project-toggle').click()")
        pixels = await page.wait_for(
            f"(() => {{ const s = {PIXELS_JS}; return s.live && s.project && s; }})()", 30
        )
        for name in ("live", "project"):
            s = pixels[name]
            assert s["w"] >= 600 and s["h"] >= 400, (name, s)
            assert s["std"] > 20 and s["lit"] > 0.5, f"{name} stream looks blank: {s}"
        rows = await page.wait_for(
            "(() => { const r = [...document.querySelectorAll('#results li.result')];"
            " return r.length >= 4 && r.map(li => li.textContent); })()",
            30,
        )
        labels = await page.eval(
            "[...document.querySelectorAll('#results .label')].map(e => e.firstChild.textContent"
            ".trim())"
        )
        assert COCO_SEEN & set(labels), (labels, rows)
        assert {"dog", "person", "horse"} <= set(labels) or len(rows) < 6, labels
        model = await page.eval("document.getElementById('model').textContent")
        assert YOLO in model or "yolov3" in model, model
        assert "yolov3" in rows[0], rows[0]
        # The camera list and the service badges come from the API.
        assert await page.eval("document.querySelector('#cameras li').dataset.camera") == "porch"
        badges = await page.wait_for(
            "(() => { const b = [...document.querySelectorAll('#services .badge')]"
            ".map(e => e.textContent); return b.length >= 3 && b; })()",
            10,
        )
        assert {"capture running", "inference running", "publisher running"} <= set(badges)
        await asyncio.sleep(1.0)  # a frame with boxes in view for the screenshot
        png = await page.screenshot()
        assert not page.errors, page.errors
        assert not page.csp_violations(), page.csp_violations()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "publisher.png").write_bytes(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    # The browser closed its streams (the server sees it at the next frame it writes).
    await until(
        lambda: (
            pub.metric("lensbus_publisher_viewers", 'camera="porch",stream="device"') == 0
            and pub.metric("lensbus_publisher_viewers", 'camera="porch",stream="project"') == 0
        ),
        10,
        "streams closed",
    )


async def test_page_runs_under_a_strict_csp_with_a_token(
    nats: NatsServer, start_service, tmp_path: Path
) -> None:
    """Off loopback with a token: the page's script and styles load with its ?token=, run
    under a CSP without 'unsafe-inline', and the CSP refuses an injected inline handler."""
    secret = "tok-" + secrets.token_hex(12)
    pub = start_service("publisher", nats.url, host="0.0.0.0", token=secret)
    pub.wait_healthy(30)
    ramp = np.tile((np.arange(640) % 256).astype(np.uint8)[None, :, None], (480, 1, 3))
    jpeg = encode_jpeg(ramp)
    nc = await nats_py.connect(nats.url)

    async def camera() -> None:
        # A live camera: a browser shows a multipart part once the next one starts.
        for seq in range(1, 10_000):
            env = FrameEnvelope(
                camera="gate", seq=seq, capture_ns=time.time_ns(), width=640, height=480, data=jpeg
            )
            await nc.publish(Subjects().frames("gate"), encode(env))
            await asyncio.sleep(0.2)

    feed = asyncio.create_task(camera())
    try:
        await browse_with_token(tmp_path, pub.port, secret)
    finally:
        feed.cancel()
        await nc.close()
    assert pub.stop() == 0


async def browse_with_token(tmp_path: Path, port: int, secret: str) -> None:
    async with Browser.launch(tmp_path) as browser:
        page = await browser.new_page(1200, 800)
        await page.goto(f"http://127.0.0.1:{port}/?token={secret}")
        # The script ran: it listed the camera and opened its stream (with the token).
        await page.wait_for("document.getElementById('camera-id').textContent === 'gate'", 30)
        assert await page.eval("document.querySelector('#cameras li').dataset.camera") == "gate"
        await page.wait_for("document.getElementById('live').width === 640", 30)
        # The stylesheet applied (the header is a flex row only by app.css).
        assert await page.eval("getComputedStyle(document.querySelector('header')).display") == (
            "flex"
        )
        await page.wait_for("document.getElementById('conn').textContent === 'connected'", 10)
        assert not page.errors, page.errors
        assert not page.csp_violations(), page.csp_violations()
        # The check can fail: an injected inline handler is refused, and the log says so.
        await page.eval(
            "document.body.insertAdjacentHTML('beforeend',"
            ' \'<img src="/nothing.png" onerror="window.injected = 1">\')'
        )
        await page.wait_for("document.querySelector('img[onerror]') !== null", 5)
        deadline = time.monotonic() + 10
        while not page.csp_violations() and time.monotonic() < deadline:
            await page.eval("new Promise((ok) => requestAnimationFrame(() => ok(1)))")
        assert page.csp_violations(), page.log
        assert await page.eval("window.injected === undefined")


# The live view's canvas and the result drawn on it, read in one go (the next frame may be
# drawn a moment later): the box edge's colour and the grey inside and beside the box.
OVERLAY_JS = """
(() => {
  const c = document.getElementById("live");
  if (!c.dataset.seq) return null;
  const seq = +c.dataset.seq, rseq = c.dataset.resultSeq === "" ? null : +c.dataset.resultSeq;
  const ctx = c.getContext("2d");
  const at = (x, y) => Array.from(ctx.getImageData(x, y, 1, 1).data.slice(0, 3));
  const r = window.lensbusLive.results.get(rseq);
  if (!r) return {seq, rseq};
  const b = r.detections[0].box, lw = Math.max(3, Math.round(Math.min(c.width, c.height) / 270));
  const mid = Math.round((b.top + b.bottom) / 2);
  return {seq, rseq, w: c.width, h: c.height, left: b.left,
          edge: at(b.left + Math.floor(lw / 2), mid),
          inside: at(Math.round((b.left + b.right) / 2), mid),
          before: at(b.left - 20, mid), stats: window.lensbusLive.stats};
})()
"""
GREY = 90
GREEN = [0, 255, 0]  # class 2's colour (render.py's palette, drawn the same by live.js)


def box_for(seq: int) -> Box:
    """A different box for every seq: a frame drawn with another frame's result shows it."""
    left = 100 + (seq % 5) * 60
    return Box.from_normalized(left / 640, 120 / 480, (left + 160) / 640, 360 / 480, 640, 480)


async def test_live_view_draws_each_results_box_over_its_own_frame(
    nats: NatsServer, start_service, tmp_path: Path
) -> None:
    """The page draws the results itself, joined by seq: published frames (flat grey) and a
    result per frame (a box that moves with the seq) come through the real publisher; the
    canvas's pixels show the box of the frame's own result, in the project stream's colour."""
    pub = start_publisher(start_service, nats.url)
    jpeg = encode_jpeg(np.full((480, 640, 3), GREY, np.uint8))
    nc = await nats_py.connect(nats.url)
    s = Subjects()

    async def camera() -> None:
        for seq in range(1, 10_000):
            now = time.time_ns()
            env = FrameEnvelope(
                camera="overlay", seq=seq, capture_ns=now, width=640, height=480, data=jpeg
            )
            await nc.publish(s.frames("overlay"), encode(env))
            await asyncio.sleep(0.05)  # the result comes after its frame, as inference's do
            det = Detection(label="car", class_id=2, score=0.9, box=box_for(seq))
            result = Result(
                camera="overlay", seq=seq, capture_ns=now, result_ns=time.time_ns(),
                width=640, height=480, model=ModelRef(name="test", version="1"),
                task="detection", detections=[det],
            )  # fmt: skip
            await nc.publish(s.results("overlay"), encode(result))
            await asyncio.sleep(0.25)

    feed = asyncio.create_task(camera())
    try:
        async with Browser.launch(tmp_path) as browser:
            page = await browser.new_page(1400, 900)
            await page.goto(f"http://127.0.0.1:{pub.port}/?camera=overlay")
            await page.wait_for("window.lensbusLive && window.lensbusLive.stats.joined >= 3", 30)
            seen = []
            for _ in range(3):
                got = await page.wait_for(
                    f"(() => {{ const o = {OVERLAY_JS}; return o && o.edge && o; }})()", 10
                )
                seen.append(got)
                await page.eval("new Promise((ok) => setTimeout(ok, 300))")
            assert not page.errors, page.errors
            assert not page.csp_violations(), page.csp_violations()
        # The server drew nothing: nobody asked for the project stream.
        assert pub.metric("lensbus_publisher_viewers", 'camera="overlay",stream="project"') == 0
    finally:
        feed.cancel()
        await nc.close()
    for got in seen:
        assert (got["w"], got["h"]) == (640, 480), got
        assert got["rseq"] == got["seq"], got  # its own result, not the newest
        assert got["left"] == box_for(got["seq"]).left, got
        assert got["edge"] == GREEN, got
        assert all(abs(v - GREY) <= 3 for v in got["inside"]), got
        assert all(abs(v - GREY) <= 3 for v in got["before"]), got
    assert len({got["seq"] for got in seen}) >= 2, seen  # it kept drawing new frames
    assert pub.stop() == 0
