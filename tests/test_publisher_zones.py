"""The publisher with the analytics service's output: zone and line events get a snapshot
(under the derived name), a clip and the selecting rule's webhook; the project stream draws
track ids, attributes, zones and lines with live counts; the API and SSE carry the counts.

A real nats-server, a real publisher process, real JPEGs; the results and zone events are
published as the analytics service publishes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import nats as nats_py
import numpy as np
import pytest
from browser import Browser, available
from nats.js.errors import BucketNotFoundError, ObjectNotFoundError
from photos import photos
from test_publisher import Receiver, Viewer, get_json, start_publisher, until

from lensbus import Subjects, encode
from lensbus.images import decode_jpeg
from lensbus.natsserver import NatsServer
from lensbus.schemas import (
    Attribute,
    Box,
    Detection,
    Event,
    FrameEnvelope,
    ModelRef,
    Result,
    clip_id,
    snapshot_name,
)
from lensbus.schemas.deploy import PipelineDeployment, PipelineRevision, pipeline_key
from lensbus.schemas.pipeline import Pipeline
from lensbus.shapes import inside_polygon
from lensbus.subjects import CLIPS_BUCKET, DEPLOYMENTS_BUCKET, SNAPSHOTS_BUCKET
from lensbus_publisher.config import Rule
from lensbus_publisher.render import FONT, LINE_COLOR, ZONE_COLOR, color_for, det_text
from lensbus_publisher.rules import RuleEngine

pytestmark = pytest.mark.slow

CAM = "yard"
MODEL = ModelRef(name="yolo", version="1", framework="onnx", device="cpu")
PIPELINE = {
    "stages": [
        {"stage": "model", "model": "yolo:1"},
        {"stage": "track"},
        {
            "stage": "zones",
            "cameras": {
                CAM: {
                    "zones": [
                        {
                            "name": "lawn",
                            "points": [[0.05, 0.05], [0.5, 0.05], [0.5, 0.7], [0.05, 0.7]],
                        }
                    ],
                    "lines": [{"name": "gate", "a": [0.1, 0.9], "b": [0.9, 0.9]}],
                }
            },
        },
    ]
}
DOG_BOX = Box.from_normalized(
    0.1, 0.2, 0.4, 0.6, 768, 576
)  # bottom centre (0.25, 0.6): on the lawn
DOG = Detection(
    label="dog",
    class_id=16,
    score=0.9,
    box=DOG_BOX,
    track_id=12,
    track_label="dog",
    track_since_ns=1,
    attributes=[Attribute(stage="breed", model="breeds:1", label="husky", class_id=3, score=0.91)],
)

# ---- pure logic --------------------------------------------------------------------------------


def test_labels_and_point_in_polygon() -> None:
    assert det_text(DOG) == "#12 dog 0.90 | husky 0.91"
    plain = DOG.model_copy(update={"track_id": None, "attributes": []})
    assert det_text(plain) == "dog 0.90"
    square = [(0.1, 0.1), (0.5, 0.1), (0.5, 0.5), (0.1, 0.5)]
    assert inside_polygon(square, (0.3, 0.3)) and not inside_polygon(square, (0.6, 0.3))
    assert not inside_polygon(square, (0.3, 0.55))


def test_rules_select_zone_events_by_trigger_zone_and_cooldown() -> None:
    gate = Rule(name="gate", triggers=frozenset({"cross"}), zones=frozenset({"gate"}), cooldown_s=1)
    dog = Rule(name="dog", labels=frozenset({"dog"}))  # a plain rule: results only
    engine = RuleEngine([gate, dog])

    def ev(trigger: str, zone: str, t_s: float, camera: str = CAM) -> Event:
        return Event(
            rule=zone,
            camera=camera,
            label="dog",
            score=0.9,
            seq=1,
            capture_ns=int(t_s * 1e9),
            event_ns=1,
            trigger=trigger,
            zone=zone,
            direction="in" if trigger == "cross" else "",
        )

    assert engine.select(ev("cross", "gate", 10)) == [gate]
    assert engine.select(ev("cross", "gate", 10.5)) == []  # cooldown, in frame time
    assert engine.select(ev("cross", "gate", 10.5, camera="other")) == [gate]
    assert engine.select(ev("cross", "gate", 11)) == [gate]
    assert (
        engine.select(ev("cross", "door", 20)) == []
        and engine.select(ev("enter", "gate", 30)) == []
    )
    # A zone-only rule needs no labels and never fires on results.
    result = Result(
        camera=CAM,
        seq=1,
        capture_ns=1,
        result_ns=1,
        width=8,
        height=8,
        model=MODEL,
        task="detection",
        detections=[DOG],
    )
    assert [f.rule.name for f in engine.feed(result)] == ["dog"]
    with pytest.raises(ValueError, match="labels"):
        Rule(name="x", triggers=frozenset({"rule", "cross"}))


# ---- the real thing ----------------------------------------------------------------------------


class Camera:
    """Frames of a real photo at 10 fps, each with the result analytics would publish."""

    def __init__(self, nc: nats_py.NATS, jpeg: bytes, width: int, height: int) -> None:
        self.nc, self.jpeg, self.width, self.height = nc, jpeg, width, height
        self.sent: dict[int, int] = {}  # seq: capture_ns
        self.seq = 0

    async def run(self) -> None:
        s = Subjects()
        while True:
            self.seq += 1
            ns = time.time_ns()
            env = FrameEnvelope(
                camera=CAM,
                seq=self.seq,
                capture_ns=ns,
                width=self.width,
                height=self.height,
                data=self.jpeg,
            )
            await self.nc.publish(s.frames(CAM), encode(env))
            result = Result(
                camera=CAM,
                seq=self.seq,
                capture_ns=ns,
                result_ns=time.time_ns(),
                width=self.width,
                height=self.height,
                model=MODEL,
                task="detection",
                detections=[DOG],
            )
            await self.nc.publish(s.results(CAM), encode(result))
            self.sent[self.seq] = ns
            await asyncio.sleep(0.1)

    def event(self, trigger: str, zone: str, back: int = 1, **more: object) -> Event:
        seq = max(self.sent) - back  # a frame the publisher surely has
        return Event(
            rule=zone,
            camera=CAM,
            label="dog",
            score=0.9,
            seq=seq,
            capture_ns=self.sent[seq],
            event_ns=time.time_ns(),
            trigger=trigger,
            zone=zone,
            track_id=12,
            box=DOG_BOX,
            **more,
        )


def color_share(pixels: np.ndarray, color: tuple[int, int, int]) -> float:
    """Fraction of ``pixels`` within JPEG's tolerance of ``color``."""
    diff = np.abs(pixels.astype(int) - np.array(color)).max(axis=-1)
    return float((diff < 60).mean())


def check_overlay(img: np.ndarray) -> None:
    h, w = img.shape[:2]
    # The line, across its right half (its label sits at its left end).
    y = round(0.9 * h)
    hits = [
        color_share(img[y - 2 : y + 3, x], LINE_COLOR) > 0 for x in range(w // 2, int(0.88 * w))
    ]
    assert np.mean(hits) > 0.9, np.mean(hits)
    # The zone's right edge, below the box.
    x = round(0.5 * w)
    hits = [
        color_share(img[yy, x - 2 : x + 3], ZONE_COLOR) > 0
        for yy in range(round(0.62 * h), round(0.68 * h))
    ]
    assert np.mean(hits) > 0.9, np.mean(hits)
    # The box label is the long one ("#12 dog 0.90 | husky 0.91"): its filled background
    # reaches well past where the plain "dog 0.90" would end.
    scale = max(0.45, min(w, h) / 900)
    thick = max(1, round(scale * 2))
    (plain_w, th), _ = cv2.getTextSize("dog 0.90", FONT, scale, thick)
    (full_w, _), _ = cv2.getTextSize(det_text(DOG), FONT, scale, thick)
    left, top = round(DOG_BOX.xmin * w), round(DOG_BOX.ymin * h)
    band = img[top - th - 4 : top - 2, left + plain_w + 20 : left + full_w - 10]
    assert band.size and color_share(band, color_for(DOG.class_id)) > 0.3


async def first_counts(
    http: aiohttp.ClientSession, url: str, listening: asyncio.Event
) -> list[dict[str, Any]]:
    """The first ``counts`` Server-Sent Event from ``url`` (a list of one, as read_sse gives);
    ``listening`` is set once any event came through, so the stream is subscribed."""
    async with http.get(url) as resp:
        assert resp.status == 200
        event, data = "", ""
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
            elif not line and data:
                listening.set()
                if event == "counts":
                    return [json.loads(data)]
                event, data = "", ""
    return []


async def test_zone_events_snapshots_clips_webhooks_overlay_and_counts(
    nats: NatsServer, start_service, tmp_path: Path
) -> None:
    src = photos(tmp_path, "dog.jpg") / "dog.jpg"
    jpeg = src.read_bytes()
    h, w = decode_jpeg(jpeg).shape[:2]
    nc = await nats_py.connect(nats.url)
    js = nc.jetstream()
    try:  # the session's server may have it already (another test's deployer made it)
        kv = await js.key_value(DEPLOYMENTS_BUCKET)
    except BucketNotFoundError:
        kv = await js.create_key_value(bucket=DEPLOYMENTS_BUCKET)  # as the deployer makes it
    current = PipelineRevision(
        revision=1, pipeline=Pipeline.model_validate(PIPELINE), activated_ns=time.time_ns()
    )
    record = PipelineDeployment(group="default", current=current)
    await kv.put(pipeline_key("default"), encode(record))
    cam = Camera(nc, jpeg, w, h)
    feeding: asyncio.Task[None] | None = None
    async with Receiver() as hooks:
        rules = [
            {
                "name": "gate",
                "triggers": ["cross"],
                "zones": ["gate"],
                "cooldown_s": 0,
                "webhook": hooks.url("/hook"),
            },
        ]
        pub = start_publisher(start_service, nats.url, rules=rules, clip_pre_s=0.5, clip_post_s=0.5)
        base = f"http://127.0.0.1:{pub.port}"
        try:
            feeding = asyncio.create_task(cam.run())
            async with aiohttp.ClientSession() as http:
                zones_url = f"{base}/api/cameras/{CAM}/zones"

                async def zones() -> dict:
                    async with http.get(zones_url) as resp:
                        return await resp.json() if resp.status == 200 else {}

                async def poll(check: Callable[[dict], bool], what: str) -> None:
                    deadline = time.monotonic() + 30
                    while not check(state := await zones()):
                        assert time.monotonic() < deadline, (what, state)
                        await asyncio.sleep(0.1)

                await poll(lambda z: z.get("lines") and z["zones"][0]["occupancy"] == 1, "zones")
                listening = asyncio.Event()
                counts = asyncio.create_task(
                    first_counts(http, f"{base}/cameras/{CAM}/results", listening)
                )
                # Subscribed once a result came through it; the events need earlier frames.
                await asyncio.wait_for(listening.wait(), 20)
                await until(lambda: len(cam.sent) >= 5, 20, "five frames sent")
                cross = cam.event("cross", "gate", direction="in")
                loiter = cam.event("loiter", "lawn", back=3, dwell_s=12.0)
                own = cam.event("rule", "")
                s = Subjects()
                for ev in (cross, loiter, own):
                    await nc.publish(s.events(CAM), encode(ev))
                await nc.publish(s.events(CAM), b"\x93not an event")
                await nc.publish(s.events("elsewhere"), encode(cross))  # wrong subject
                await nc.flush()
                got = await asyncio.wait_for(counts, 20)
                assert got == [{"camera": CAM, "lines": {"gate": {"in": 1, "out": 0}}}]
                await poll(lambda z: z["lines"][0]["in"] == 1 and z["lines"][0]["out"] == 0, "in")

                # The webhook got the crossing (the rule selects 'cross' on 'gate' only).
                await until(lambda: len(hooks.hook) >= 1, 20, "the webhook")
                sent = Event.model_validate(hooks.hook[0][1])
                name = snapshot_name(CAM, cross.seq, cross.capture_ns)
                assert sent == cross.model_copy(update={"snapshot": name})

                # The page's list: both zone events with their snapshot; the rule event not.
                listed = (await get_json(http, f"{base}/api/events"))["events"]
                assert [(e["trigger"], e["zone"]) for e in listed] == [
                    ("loiter", "lawn"),
                    ("cross", "gate"),
                ]
                assert listed[1]["snapshot_url"] == f"/snapshots/{name}"
                async with http.get(f"{base}{listed[1]['snapshot_url']}") as resp:
                    assert resp.status == 200 and await resp.read() == jpeg

                # The project stream draws the line, the zone and the long label.
                parts = await Viewer().read(http, f"{base}/cameras/{CAM}/project.mjpeg", count=3)
                check_overlay(decode_jpeg(parts[-1].body))

            if available():  # the page shows the counts, track ids and attributes
                async with Browser.launch(tmp_path) as browser:
                    page = await browser.new_page(1200, 800)
                    await page.goto(f"{base}/?camera={CAM}")
                    badges = await page.wait_for(
                        "(() => { const t = document.getElementById('zones').textContent;"
                        " return t.includes('gate: in 1 · out 0') && t; })()",
                        30,
                    )
                    assert "lawn: 1 inside" in badges, badges
                    label = await page.wait_for(
                        "(() => { const e = document.querySelector('#results .label');"
                        " return e && e.textContent; })()",
                        30,
                    )
                    assert label.startswith("#12 dog · husky 0.91"), label
                    assert not page.csp_violations()

            # Snapshots under the derived names; the crossing's clip kept.
            snaps = await js.object_store(SNAPSHOTS_BUCKET)
            for ev in (cross, loiter):
                stored = await snaps.get(snapshot_name(CAM, ev.seq, ev.capture_ns))
                assert stored.data == jpeg
            clips = await js.object_store(CLIPS_BUCKET)

            async def clip_kept() -> bool:
                with contextlib.suppress(Exception):
                    await clips.get_info(clip_id(CAM, cross.seq, cross.capture_ns))
                    return True
                return False

            deadline = time.monotonic() + 20
            while not await clip_kept():
                assert time.monotonic() < deadline, "no clip"
                await asyncio.sleep(0.2)
            with pytest.raises(ObjectNotFoundError):  # the loiter event no rule selects: none
                await clips.get_info(clip_id(CAM, loiter.seq, loiter.capture_ns))
        finally:
            if feeding is not None:
                feeding.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feeding
            await nc.close()
        assert len(hooks.hook) == 1
        assert pub.metric("lensbus_publisher_zone_events_ignored_total", 'reason="own_rule"') == 1
        assert (
            pub.metric(
                "lensbus_publisher_zone_events_total", f'camera="{CAM}",trigger="cross",zone="gate"'
            )
            == 1
        )
        for reason in ("camera_mismatch", "malformed"):  # counted, not taken
            assert pub.metric("lensbus_messages_rejected_total", f'reason="{reason}"') == 1
        assert pub.proc.poll() is None
        assert pub.stop() == 0
