"""The publisher with what running projects send: overlays (``ctx.overlay``) drawn on the
project stream (boxes, blurred regions; the device stream untouched), frames a project drew
itself shown instead of the drawn results while they come, and project events
(``ctx.event``, on the project's own ``_event`` subject) with their snapshot, page entry and
the selecting rule's webhook, republished on the events subjects; one naming another
project than its subject, or a project event on the events subjects, is not taken.

A real nats-server, a real publisher process, real JPEG frames; the project messages are
published as a project's process publishes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import nats as nats_py
import numpy as np
import pytest
from photos import photos
from test_publisher import Part, Receiver, Viewer, get_json, start_publisher, until

from lensbus import Subjects, decode, encode
from lensbus.errors import Rejected
from lensbus.images import decode_jpeg, encode_jpeg
from lensbus.natsserver import NatsServer
from lensbus.schemas import Event, FrameEnvelope, snapshot_name
from lensbus.schemas.project import Overlay, Shape
from lensbus.subjects import SNAPSHOTS_BUCKET
from lensbus_publisher.config import Rule
from lensbus_publisher.projects import DRAWN_FRESH_S, MAX_PROJECTS, ProjectFrame, ProjectInputs
from lensbus_publisher.render import draw

CAM = "porch"
S = Subjects()
RED = (0, 0, 255)  # BGR
GREEN = (0, 255, 0)
BOX = ((0.55, 0.15), (0.9, 0.5))  # the red box, normalised
BLUR = ((0.05, 0.5), (0.45, 0.95))  # the blurred region


def checkerboard(w: int = 640, h: int = 480, cell: int = 8) -> np.ndarray:
    """Black and white cells: as high-contrast as a frame gets."""
    ys, xs = np.mgrid[0:h, 0:w]
    on = ((xs // cell + ys // cell) % 2).astype(np.uint8) * 255
    return np.dstack([on, on, on])


def share(pixels: np.ndarray, color: tuple[int, int, int]) -> float:
    """Fraction of ``pixels`` within JPEG's tolerance of ``color``."""
    if pixels.size == 0:
        return 0.0
    diff = np.abs(pixels.astype(int) - np.array(color)).max(axis=-1)
    return float((diff < 70).mean())


def region(img: np.ndarray, corners: tuple[tuple[float, float], ...]) -> np.ndarray:
    h, w = img.shape[:2]
    (x0, y0), (x1, y1) = corners
    return img[round(y0 * h) : round(y1 * h), round(x0 * w) : round(x1 * w)]


def box_shape(corners: tuple[tuple[float, float], ...], color: str, text: str = "") -> Shape:
    return Shape(shape="box", points=list(corners), color=color, text=text, thickness=4)


def overlay(project: str, seq: int, *shapes: Shape, ttl_s: float = 30.0) -> Overlay:
    return Overlay(project=project, camera=CAM, seq=seq, shapes=list(shapes), ttl_s=ttl_s)


# ---- pure logic --------------------------------------------------------------------------------


def test_a_frame_gets_its_own_overlay_else_the_newest_live_one() -> None:
    inputs = ProjectInputs()
    a, b = box_shape(BOX, "#ff0000"), box_shape(BLUR, "#00ff00")
    inputs.add_overlay(overlay("p", 5, a, ttl_s=1.0), now=100.0)
    inputs.add_overlay(overlay("p", 6, b, ttl_s=1.0), now=100.1)
    assert inputs.shapes_for("", 5, 0, 100.2) == [("p", [a])]  # its own seq
    assert inputs.shapes_for("", 9, 0, 100.2) == [("p", [b])]  # else the newest
    assert inputs.shapes_for("", 5, 0, 101.05) == [("p", [b])]  # its own one expired
    assert inputs.shapes_for("", 5, 0, 101.2) == []  # every one expired
    # An overlay made before the capture restarted is not the same frame's.
    inputs.add_overlay(overlay("p", 7, a).model_copy(update={"capture_ns": 11}), now=200.0)
    inputs.add_overlay(overlay("p", 8, b).model_copy(update={"capture_ns": 12}), now=200.1)
    assert inputs.shapes_for("", 7, 11, 200.2) == [("p", [a])]
    assert inputs.shapes_for("", 7, 99, 200.2) == [("p", [b])]
    # One project's view has only that project's shapes.
    inputs.add_overlay(overlay("q", 8, a), now=200.1)
    assert inputs.shapes_for("q", 8, 12, 200.2) == [("q", [a])]
    assert len(inputs.shapes_for("", 8, 12, 200.2)) == 2


def test_drawn_frames_are_fresh_for_a_while_and_projects_are_bounded() -> None:
    inputs = ProjectInputs()
    frame = ProjectFrame(1, 1, -1, b"jpeg", rendered=10.0, drawn_by="dl")
    inputs.add_drawn(frame, 10.0)
    assert inputs.drawn_for("", 10.5) is frame and inputs.drawn_for("dl", 10.5) is frame
    assert inputs.drawn_for("other", 10.5) is None
    assert inputs.drawn_for("", 10.0 + DRAWN_FRESH_S) is None
    for i in range(MAX_PROJECTS - 1):
        inputs.add_overlay(overlay(f"p{i}", 1, ttl_s=60.0), now=11.0)
    with pytest.raises(Rejected, match="projects on one camera") as err:
        inputs.add_overlay(overlay("late", 1), now=11.5)
    assert err.value.reason == "too_many_projects"
    # Once the drawn frame is stale its project's place is free again.
    inputs.add_overlay(overlay("late", 1), now=10.0 + DRAWN_FRESH_S + 1)
    assert "dl" not in inputs.drawn


def test_a_drawn_frame_never_hides_another_projects_blur() -> None:
    """Before: with a DeepLens function drawing frames beside privacy-blur, the stream of
    every project showed the drawn frame and the faces unblurred."""
    inputs = ProjectInputs()
    frame = ProjectFrame(1, 1, -1, b"jpeg", rendered=10.0, drawn_by="dl")
    inputs.add_drawn(frame, 10.0)
    inputs.add_overlay(overlay("privacy", 1, box_shape(BLUR, "#000000"), ttl_s=1.0), now=10.0)
    assert inputs.drawn_for("", 10.2) is None  # drawn by the publisher, the blur on it
    assert inputs.drawn_for("dl", 10.2) is frame  # its own view still shows it
    assert inputs.drawn_for("", 11.5) is frame  # the blur's overlay expired


def test_rules_select_project_events_by_name() -> None:
    def ev(project: str, trigger: str = "project") -> Event:
        return Event(
            rule=project,
            camera=CAM,
            label="hot dog",
            score=1.0,
            seq=1,
            capture_ns=1,
            event_ns=1,
            trigger=trigger,
            project=project,
        )

    hot = Rule.model_validate({"name": "hot", "projects": ["hotdog-alert"]})
    assert hot.triggers == {"project"} and not hot.on_results
    assert hot.selects(ev("hotdog-alert")) and not hot.selects(ev("people"))
    anyone = Rule(name="any", triggers=frozenset({"project"}))
    assert anyone.selects(ev("people")) and not anyone.selects(ev("people", "cross"))
    zones = Rule(name="z", triggers=frozenset({"cross"}))
    assert not zones.selects(ev("hotdog-alert"))
    with pytest.raises(ValueError, match="project name"):
        Rule.model_validate({"name": "bad", "projects": ["no.dots"]})


def test_blur_makes_a_region_unrecognisable_and_shapes_draw_in_their_colour() -> None:
    img = checkerboard()
    before = region(img, BLUR).astype(float).var()
    draw(img, None, shapes=[Shape(shape="blur", points=list(BLUR)), box_shape(BOX, "#ff0000")])
    assert region(img, BLUR).astype(float).var() < 0.02 * before
    assert region(img, ((0.5, 0.0), (1.0, 0.45))).astype(float).var() > 0.5 * before
    h, w = img.shape[:2]
    edge = img[round(0.3 * h), round(0.9 * w) - 3 : round(0.9 * w) + 2]  # the right edge
    assert share(edge, RED) > 0.5


# ---- the real thing ----------------------------------------------------------------------------


class Feed:
    """A camera publishing a JPEG at 20 fps, and what it sent (seq: capture_ns)."""

    def __init__(self, nc: nats_py.NATS, jpeg: bytes, width: int, height: int) -> None:
        self.nc, self.jpeg, self.width, self.height = nc, jpeg, width, height
        self.sent: dict[int, int] = {}
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        seq = 0
        while True:
            seq += 1
            ns = time.time_ns()
            env = FrameEnvelope(
                camera=CAM,
                seq=seq,
                capture_ns=ns,
                width=self.width,
                height=self.height,
                data=self.jpeg,
            )
            await self.nc.publish(S.frames(CAM), encode(env))
            self.sent[seq] = ns
            await asyncio.sleep(0.05)

    async def __aenter__(self) -> Feed:
        self.task = asyncio.create_task(self._run())
        await until(lambda: len(self.sent) >= 3, 20, "frames sent")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    @property
    def newest(self) -> int:
        return max(self.sent)


async def frame_where(
    http: aiohttp.ClientSession, url: str, check: Callable[[Part], bool], limit: int = 200
) -> Part:
    """The first part of the MJPEG stream at ``url`` that ``check`` accepts (of ``limit``)."""
    viewer = Viewer()
    stop = asyncio.Event()
    seen = 0
    found: list[Part] = []

    async def watch() -> None:
        nonlocal seen
        while not stop.is_set():
            await asyncio.sleep(0.02)
            for part in viewer.parts[seen:]:
                seen += 1
                if check(part):
                    found.append(part)
                    stop.set()
                    return
            if seen >= limit:
                stop.set()

    watching = asyncio.create_task(watch())
    try:
        await asyncio.wait_for(viewer.read(http, url, stop=stop), 60)
    finally:
        watching.cancel()
    assert found, f"no such frame in the {seen} read from {url}"
    return found[0]


async def test_overlays_box_and_blur_on_the_project_stream_only(
    nats: NatsServer, start_service
) -> None:
    jpeg = encode_jpeg(checkerboard(), 95)
    device_img = decode_jpeg(jpeg)
    nc = await nats_py.connect(nats.url)
    pub = start_publisher(start_service, nats.url)
    base = f"http://127.0.0.1:{pub.port}"
    try:
        async with Feed(nc, jpeg, 640, 480) as feed, aiohttp.ClientSession() as http:
            seq = feed.newest
            red = box_shape(BOX, "#ff0000", text="hot dog")
            blur = Shape(shape="blur", points=list(BLUR))
            await nc.publish(
                S.project_overlay("hotdog", CAM), encode(overlay("hotdog", seq, red, blur))
            )
            green = box_shape(((0.1, 0.1), (0.3, 0.3)), "#00ff00")
            await nc.publish(S.project_overlay("other", CAM), encode(overlay("other", seq, green)))
            # Bad ones: counted, the rest goes on.
            await nc.publish(S.project_overlay("hotdog", CAM), b"\x93not an overlay")
            wrong = overlay("intruder", seq, green)  # names another project than its subject
            await nc.publish(S.project_overlay("hotdog", CAM), encode(wrong))
            await nc.flush()

            def drawn_after(part: Part) -> bool:  # drawn once the overlays were in
                return part.seq > seq + 2

            url = f"{base}/cameras/{CAM}/project.mjpeg"
            img = decode_jpeg((await frame_where(http, url, drawn_after)).body)
            h, w = img.shape[:2]
            (x0, y0), (x1, y1) = BOX
            right_edge = img[
                round(0.25 * h) : round(0.45 * h), round(x1 * w) - 3 : round(x1 * w) + 2
            ]
            assert share(right_edge, RED) > 0.5
            assert share(region(img, BOX), RED) > 0.03  # the outline (and label) inside
            outside = img[:, : round(0.5 * w)]  # left of the box and its label
            assert share(outside, RED) < 0.001
            assert share(region(img, ((0.1, 0.1), (0.3, 0.3))), GREEN) > 0.03  # other's box
            inside = region(img, BLUR).astype(float).var()
            assert inside < 0.05 * region(device_img, BLUR).astype(float).var()

            # One project's stream: its shapes only.
            one = f"{url}?project=hotdog"
            img = decode_jpeg((await frame_where(http, one, lambda p: True)).body)
            assert share(region(img, BOX), RED) > 0.03
            assert share(region(img, ((0.1, 0.1), (0.3, 0.3))), GREEN) < 0.001
            async with http.get(f"{url}?project=no.such") as resp:
                assert resp.status == 400

            # The device stream: the frames exactly as published, the region sharp.
            part = await frame_where(http, f"{base}/cameras/{CAM}/device.mjpeg", lambda p: True)
            assert part.body == jpeg
    finally:
        await nc.close()
    assert pub.metric("lensbus_publisher_project_overlays_total", 'project="hotdog"') == 1
    assert pub.metric("lensbus_publisher_project_overlays_drawn_total", 'project="hotdog"') >= 2
    for reason in ("malformed", "project_mismatch"):
        assert pub.metric("lensbus_messages_rejected_total", f'reason="{reason}"') == 1
    assert pub.proc.poll() is None
    assert pub.stop() == 0


async def test_frames_a_project_drew_replace_the_drawn_results_while_they_come(
    nats: NatsServer, start_service
) -> None:
    jpeg = encode_jpeg(checkerboard(), 90)
    solid = np.zeros((480, 640, 3), np.uint8)
    solid[:] = (255, 0, 0)  # BGR blue: nothing the publisher draws is that
    blue = encode_jpeg(solid, 90)
    nc = await nats_py.connect(nats.url)
    pub = start_publisher(start_service, nats.url)
    base = f"http://127.0.0.1:{pub.port}"
    url = f"{base}/cameras/{CAM}/project.mjpeg"

    def is_blue(part: Part) -> bool:
        return share(decode_jpeg(part.body), (255, 0, 0)) > 0.95

    async def drawing(stop: asyncio.Event) -> None:  # a DeepLens function's display
        seq = 0
        while not stop.is_set():
            seq += 1
            env = FrameEnvelope(
                camera=CAM, seq=seq, capture_ns=time.time_ns(), width=640, height=480, data=blue
            )
            await nc.publish(S.project_frame("deeplens-od", CAM), encode(env))
            await asyncio.sleep(0.1)

    stop = asyncio.Event()
    draws: asyncio.Task[None] | None = None
    try:
        async with Feed(nc, jpeg, 640, 480), aiohttp.ClientSession() as http:
            before = await frame_where(http, url, lambda p: True)
            assert not is_blue(before) and before.headers["x-project"] == "-"
            draws = asyncio.create_task(drawing(stop))
            part = await frame_where(http, url, is_blue)
            assert part.headers["x-project"] == "deeplens-od"
            part = await frame_where(http, f"{url}?project=deeplens-od", lambda p: True)
            assert is_blue(part)
            other = await frame_where(http, f"{url}?project=someone-else", lambda p: True)
            assert not is_blue(other)
            stop.set()
            await draws
            # Drawn frames stale: the publisher draws the camera's frames again.
            again = await frame_where(http, url, lambda p: p.headers["x-project"] == "-", limit=400)
            assert not is_blue(again)
    finally:
        stop.set()
        await nc.close()
    assert pub.metric("lensbus_publisher_project_frames_total", 'project="deeplens-od"') >= 1
    assert pub.metric("lensbus_publisher_project_frames_shown_total", 'project="deeplens-od"') >= 1
    assert pub.stop() == 0


def project_event(feed: Feed, project: str, back: int) -> Event:
    """What ``ctx.event`` of ``project`` sends for a frame the publisher surely has."""
    seq = feed.newest - back
    return Event(
        rule=project,
        camera=CAM,
        label="hot dog",
        score=0.8,
        seq=seq,
        capture_ns=feed.sent[seq],
        event_ns=time.time_ns(),
        trigger="project",
        project=project,
        detail={"seen": 3},
    )


async def publish_refused(nc: nats_py.NATS, hot: Event) -> None:
    """Events the publisher must not take: not what their subject (the sender, as NATS
    checked it) says, and a project event on the events subjects, where only the
    publisher's own come now."""
    await nc.publish(S.project_event("stranger", CAM), encode(hot))
    other_cam = hot.model_copy(update={"camera": "yard"})
    await nc.publish(S.project_event("hotdog", CAM), encode(other_cam))
    zone = hot.model_copy(update={"trigger": "cross", "zone": "door", "project": ""})
    await nc.publish(S.project_event("hotdog", CAM), encode(zone))
    await nc.publish(S.events(CAM), encode(hot.model_copy(update={"label": "forged"})))


async def test_project_events_get_a_snapshot_and_the_selecting_rules_webhook(
    nats: NatsServer, start_service, tmp_path: Path
) -> None:
    jpeg = (photos(tmp_path, "dog.jpg") / "dog.jpg").read_bytes()
    h, w = decode_jpeg(jpeg).shape[:2]
    nc = await nats_py.connect(nats.url)
    on_bus: list[Event] = []  # what programs see on the events subjects

    async def on_event(msg: nats_py.aio.msg.Msg) -> None:
        if (event := decode(msg.data, Event)).label != "forged":
            on_bus.append(event)

    await nc.subscribe(S.events(CAM), cb=on_event)
    async with Receiver() as hooks:
        rules = [
            {"name": "hot", "projects": ["hotdog"], "cooldown_s": 0, "webhook": hooks.url("/hook")},
            {"name": "none", "projects": ["nobody"], "webhook": hooks.url("/fail")},
        ]
        pub = start_publisher(start_service, nats.url, rules=rules)
        base = f"http://127.0.0.1:{pub.port}"
        try:
            async with Feed(nc, jpeg, w, h) as feed, aiohttp.ClientSession() as http:
                await until(lambda: len(feed.sent) >= 6, 20, "frames sent")
                stranger, hot = project_event(feed, "stranger", 3), project_event(feed, "hotdog", 2)
                for ev in (stranger, hot):
                    await nc.publish(S.project_event(ev.project, CAM), encode(ev))
                await publish_refused(nc, hot)
                await until(lambda: len(hooks.hook) >= 1, 20, "the webhook")
                hot2 = project_event(feed, "hotdog", 1)
                await nc.publish(S.project_event("hotdog", CAM), encode(hot2))
                await until(lambda: len(hooks.hook) >= 2, 20, "the second webhook")
                await until(lambda: len(on_bus) >= 3, 20, "the republished events")

                name = snapshot_name(CAM, hot.seq, hot.capture_ns)
                assert Event.model_validate(hooks.hook[0][1]) == hot.model_copy(
                    update={"snapshot": name}
                )
                assert [e[1]["project"] for e in hooks.hook] == ["hotdog", "hotdog"]
                listed = (await get_json(http, f"{base}/api/events"))["events"]
                assert [(e["trigger"], e["project"]) for e in listed] == [
                    ("project", "hotdog"),
                    ("project", "hotdog"),
                    ("project", "stranger"),
                ]
                assert listed[1]["snapshot_url"] == f"/snapshots/{name}"
                assert listed[1]["detail"] == {"seen": 3}
                async with http.get(f"{base}{listed[1]['snapshot_url']}") as resp:
                    assert resp.status == 200 and await resp.read() == jpeg
                # Republished once each, with the snapshot, for programs and the results stream.
                assert [e.seq for e in on_bus] == [stranger.seq, hot.seq, hot2.seq]  # in order
                assert on_bus[1] == hot.model_copy(update={"snapshot": name}), on_bus

                def ignored() -> float:  # three republished coming back, one forged
                    labels = 'reason="own_project"'
                    return pub.metric("lensbus_publisher_zone_events_ignored_total", labels)

                await until(lambda: ignored() >= 4, 20, "the events coming back ignored")
            snaps = await nc.jetstream().object_store(SNAPSHOTS_BUCKET)
            stored = await snaps.get(snapshot_name(CAM, stranger.seq, stranger.capture_ns))
            assert stored.data == jpeg
        finally:
            await nc.close()
        assert len(hooks.hook) == 2 and hooks.fail == 0
        assert pub.metric("lensbus_publisher_project_events_total", 'project="hotdog"') == 2
        for reason in ("project_mismatch", "camera_mismatch", "not_project_event"):
            assert pub.metric("lensbus_messages_rejected_total", f'reason="{reason}"') == 1
        assert ignored() == 4
        assert pub.proc.poll() is None
        assert pub.stop() == 0
