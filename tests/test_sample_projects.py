"""The three sample projects shipped in ``projects/`` (hot dog alert, people counter, privacy
blur).

Pure: each ``project.json`` is a valid manifest whose settings meet their own schema and whose
models are the demo packages' real names; each handler runs inside the real ``ctx``
(:class:`lensbus.projects.context.Context`, its messages encoded as on the wire and read
back) on hand-made results (the hot dog streak rule, the blur boxes), and the people
counter on the real detector's output of the tracking sequence (tests/mot_sequence.py),
tracked by the real analytics code, against analytics' own count of the same line and against
the ground truth.

End to end: each sample deployed with ``lensbus project deploy`` to a running system (real
nats-server, deployer, capture playing real photos or the street sequence, inference on the
demo model, analytics, publisher, the projects service); its outputs on its topic, its
drawing checked in pixels of ``/cameras/<id>/project.mjpeg``; the people counter swapped to
a v2 while frames flow, its counts going on.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import aiohttp
import cv2
import jsonschema
import msgpack
import nats as nats_py
import numpy as np
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import BucketNotFoundError, NoKeysError
from photos import photos

from lensbus.codec import decode
from lensbus.natsserver import NatsServer
from lensbus.projects.context import Context
from lensbus.projects.state import State
from lensbus.schemas import Event, Result
from lensbus.schemas.project import (
    Overlay,
    ProjectManifest,
    ProjectMessage,
    ProjectReport,
    project_report_key,
)
from lensbus.schemas.result import Box, Detection, ModelRef
from lensbus.subjects import DEPLOYMENTS_BUCKET, Subjects

ROOT = Path(__file__).resolve().parent.parent
PROJECTS = ROOT / "projects"
SAMPLES = ("hotdog-alert", "people-counter", "privacy-blur")
S = Subjects()


def manifest(name: str, **settings: Any) -> ProjectManifest:
    data = json.loads((PROJECTS / name / "project.json").read_text())
    data["settings"] = {**data["settings"], **settings}
    return ProjectManifest.model_validate(data)


def handler(name: str) -> ModuleType:
    """A fresh copy of a sample's handler module (each is ``handler``: loaded under its own
    name here, so the three do not share one module, nor one test the last one's globals)."""
    path = PROJECTS / name / "handler.py"
    spec = importlib.util.spec_from_file_location(f"sample_{name.replace('-', '_')}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class MemoryState:
    """``ctx.state`` without a bucket: values kept as the real one keeps them (msgpack round
    trip: tuples come back as lists), so a second ctx given ``values`` is a restart."""

    def __init__(self, values: dict[str, Any] | None = None) -> None:
        self.values = values if values is not None else {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self.values[key] = msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False)

    def delete(self, key: str) -> None:
        self.values.pop(key, None)

    def keys(self) -> list[str]:
        return sorted(self.values)


class Sent:
    """What a handler's ctx sent, decoded from the bytes the host would publish."""

    def __init__(self) -> None:
        self.messages: list[ProjectMessage] = []
        self.events: list[Event] = []
        self.overlays: list[Overlay] = []

    def __call__(self, subject: str, data: bytes) -> None:
        if subject.startswith(S.all_projects()[:-1]) and subject.endswith("._overlay"):
            self.overlays.append(decode(data, Overlay))
        elif subject.startswith(S.all_projects()[:-1]) and subject.endswith("._event"):
            event = decode(data, Event)
            assert event.project and subject == S.project_event(event.project, event.camera)
            self.events.append(event)
        else:
            self.messages.append(decode(data, ProjectMessage))
            assert subject == S.project_output(*S.project_parts(subject))


def context(m: ProjectManifest, state: MemoryState | None = None) -> tuple[Context, Sent]:
    sent = Sent()
    ctx = Context(m, "test", S, sent, cast(State, state or MemoryState()))
    return ctx, sent


def run(module: ModuleType, ctx: Context, results: list[Result]) -> None:
    """What the host does: on_start, then each result in its call, then on_stop."""
    if hasattr(module, "on_start"):
        module.on_start(ctx)
    for r in results:
        ctx.begin(r)
        module.on_result(r, ctx)
    ctx.begin(None)
    if hasattr(module, "on_stop"):
        module.on_stop(ctx)


def metric(ctx: Context, name: str) -> float:
    return next(s.value for s in ctx.samples() if s.name == name)


def det(label: str, box: tuple[float, float, float, float], score: float = 0.9) -> Detection:
    return Detection(label=label, class_id=0, score=score, box=Box.from_normalized(*box, 640, 480))


def result(camera: str, seq: int, *dets: Detection, model: str = "yolov3-tiny") -> Result:
    t = 1_700_000_000_000_000_000 + seq * 100_000_000
    return Result(
        camera=camera,
        seq=seq,
        capture_ns=t,
        result_ns=t + 30_000_000,
        width=640,
        height=480,
        model=ModelRef(name=model, version="1"),
        task="detection",
        detections=list(dets),
    )


# ---- the packages -------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLES)
def test_each_sample_is_a_valid_project(name: str) -> None:
    m = manifest(name)
    assert m.name == name and (PROJECTS / name / m.handler).is_file()
    jsonschema.Draft202012Validator.check_schema(m.settings_schema)
    jsonschema.validate(m.settings, m.settings_schema)
    assert (PROJECTS / name / "README.md").read_text().startswith("# ")
    module = handler(name)
    assert callable(module.on_result)


def test_settings_schemas_refuse_what_the_handlers_cannot_use() -> None:
    refused: dict[str, dict[str, Any]] = {
        "hotdog-alert": {"min_count": 0},
        "people-counter": {"line": {"name": "door", "a": [0.5, 0.0]}},
        "privacy-blur": {"padding": -1},
    }
    for name, bad in refused.items():
        m = manifest(name)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**m.settings, **bad}, m.settings_schema)


def test_the_models_named_are_the_demo_packages(tmp_path_factory: pytest.TempPathFactory) -> None:
    from models_fixture import demo_packages

    built = {
        f"{p.manifest.name}:{p.manifest.version}" for p in demo_packages(tmp_path_factory).values()
    }
    for name in SAMPLES:
        m = manifest(name)
        wanted = set(m.models) | ({m.pipeline.primary.model} if m.pipeline else set())
        assert wanted and wanted <= built, (name, wanted, built)


# ---- hot dog alert --------------------------------------------------------------------------


def test_hotdog_alerts_once_per_streak_and_boxes_each_sighting() -> None:
    m = manifest("hotdog-alert", label="dog", min_count=3)
    ctx, sent = context(m)
    dog = det("dog", (0.2, 0.3, 0.5, 0.9), 0.8)
    faint = det("dog", (0.2, 0.3, 0.5, 0.9), 0.1)  # under min_score: not a sighting
    bike = det("bicycle", (0.1, 0.2, 0.7, 0.8))
    seen = [True, True, False, True, True, True, True, True]
    results = [result("cam1", i, dog if s else faint, bike) for i, s in enumerate(seen)] + [
        result("cam2", 100 + i, dog) for i in range(2)
    ]  # another camera, its own streak
    run(handler("hotdog-alert"), ctx, results)

    assert [e.seq for e in sent.events] == [5]  # the third in a row after the gap, once
    event = sent.events[0]
    assert (event.trigger, event.project, event.rule, event.label) == (
        "project",
        "hotdog-alert",
        "hotdog-alert",
        "dog",
    )
    assert event.camera == "cam1" and event.detail == {"in_a_row": 3}
    assert event.box == dog.box and event.score == pytest.approx(0.8)
    assert event.model is not None and event.model.name == "yolov3-tiny"
    (alert,) = sent.messages
    assert (alert.topic, alert.camera, alert.seq, alert.version) == ("alert", "cam1", 5, "1")
    assert alert.payload == {
        "label": "dog",
        "score": 0.8,
        "in_a_row": 3,
        "box": [0.2, 0.3, 0.5, 0.9],
    }
    # one magenta box per sighting, just outside the model's own box
    assert [o.seq for o in sent.overlays] == [0, 1, 3, 4, 5, 6, 7, 100, 101]
    shape = sent.overlays[0].shapes[0]
    assert (shape.shape, shape.color, shape.text) == ("box", "#ff00ff", "dog!")
    (x0, y0), (x1, y1) = shape.points
    assert x0 < 0.2 < 0.5 < x1 and y0 < 0.3 < 0.9 < y1
    assert metric(ctx, "sightings") == 9 and metric(ctx, "alerts") == 1


# ---- privacy blur ---------------------------------------------------------------------------


def test_privacy_blur_covers_each_face_with_a_padded_box_inside_the_frame() -> None:
    ctx, sent = context(manifest("privacy-blur", padding=0.25))
    faces = [det("face", (0.4, 0.2, 0.6, 0.6), 0.97), det("face", (0.0, 0.8, 0.1, 1.0), 0.9)]
    weak = det("face", (0.7, 0.1, 0.8, 0.3), 0.3)
    run(handler("privacy-blur"), ctx, [result("cam1", 1, *faces, weak), result("cam1", 2)])

    first, empty = sent.overlays
    assert [s.shape for s in first.shapes] == ["blur", "blur"]  # the weak one is not blurred
    assert first.shapes[0].points == [
        pytest.approx((0.35, 0.1)),
        pytest.approx((0.65, 0.7)),
    ]
    assert first.shapes[1].points == [pytest.approx((0.0, 0.75)), pytest.approx((0.125, 1.0))]
    assert empty.seq == 2 and empty.shapes == []  # the faces gone: nothing blurred any more
    assert metric(ctx, "faces") == 2
    assert sent.messages == [] and sent.events == []


# ---- people counter -------------------------------------------------------------------------


def walk(camera: str, track: int, xs: list[float], seq0: int = 0) -> list[Result]:
    """A person (one track) whose feet go through ``xs`` (normalised x), one result each."""
    out = []
    for i, x in enumerate(xs):
        d = det("person", (x - 0.05, 0.3, x + 0.05, 0.8)).model_copy(update={"track_id": track})
        out.append(result(camera, seq0 + i, d))
    return out


def test_people_counter_counts_each_direction_and_draws_the_line() -> None:
    state = MemoryState()
    ctx, sent = context(manifest("people-counter"), state)
    # Line a (0.5, 0.02) -> b (0.5, 0.98) points down the image: its right is the frame's
    # left half, so walking left to right is "out", right to left "in".
    results = walk("cam1", 1, [0.2, 0.4, 0.498, 0.6, 0.8])  # through the line's band: once
    results += walk("cam1", 2, [0.9, 0.7, 0.3], seq0=5)
    untracked = det("person", (0.6, 0.3, 0.7, 0.8))  # no track id: not counted
    results += [result("cam1", 8, untracked), result("cam1", 9, untracked)]
    results += walk("cam2", 3, [0.3, 0.7])  # another camera, its own counts
    run(handler("people-counter"), ctx, results)

    counts = [(m.camera, m.seq, m.payload) for m in sent.messages]
    assert counts == [
        ("cam1", 3, {"line": "door", "in": 0, "out": 1}),
        ("cam1", 7, {"line": "door", "in": 1, "out": 1}),
        ("cam2", 1, {"line": "door", "in": 0, "out": 1}),
    ]
    assert all(m.topic == "counts" for m in sent.messages)
    assert state.get("cam1")["in"] == 1 and state.get("cam1")["out"] == 1
    assert len(sent.overlays) == len(results)  # the line and counts on every frame
    line, text = sent.overlays[7].shapes
    assert (line.shape, line.points, line.color) == ("line", [(0.5, 0.02), (0.5, 0.98)], "#00ffff")
    assert (text.shape, text.text) == ("text", "door: in 1  out 1")
    assert metric(ctx, "people_out") == 1  # the last camera's, as it changed


def test_people_counter_continues_after_a_restart() -> None:
    """The totals and each track's side are in ctx.state: a new process (a restart, a new
    version) reading them carries on, a track half way across included."""
    whole = walk("cam1", 1, [0.2, 0.3, 0.4, 0.6, 0.7]) + walk("cam1", 2, [0.8, 0.6, 0.3], 5)
    once = MemoryState()
    ctx, _ = context(manifest("people-counter"), once)
    run(handler("people-counter"), ctx, whole)

    before = MemoryState()
    ctx, _ = context(manifest("people-counter"), before)
    run(handler("people-counter"), ctx, whole[:3])  # track 1 still left of the line
    after = MemoryState(dict(before.values))  # a new process reads the bucket
    ctx, sent = context(manifest("people-counter", version="2"), after)
    run(handler("people-counter"), ctx, whole[3:])
    assert after.get("cam1") == once.get("cam1")
    assert [m.payload["out"] + m.payload["in"] for m in sent.messages] == [1, 2]


@pytest.fixture(scope="module")
def street() -> Any:
    import mot_sequence

    if not mot_sequence.PHOTOS.is_dir():
        pytest.skip("Debian package darknet (real photos) is not installed")
    return mot_sequence.build()


def test_people_counter_on_the_truth_of_the_street_sequence(street: Any) -> None:
    """Each walker's true box as a track: the counts are the ground truth's."""
    import mot_sequence

    line = json.loads((PROJECTS / "people-counter" / "project.json").read_text())
    line = line["settings"]["line"]
    results = []
    for f, truth in enumerate(street.truth):
        dets = [
            det(street.labels[oid], (x1 / 640, y1 / 480, x2 / 640, y2 / 480)).model_copy(
                update={"track_id": oid}
            )
            for oid, (x1, y1, x2, y2) in sorted(truth.items())
        ]
        results.append(result("cam1", f, *dets))
    state = MemoryState()
    ctx, _ = context(manifest("people-counter"), state)
    run(handler("people-counter"), ctx, results)

    persons = mot_sequence.Sequence(
        frames=[],
        truth=[{k: b for k, b in t.items() if street.labels[k] == "person"} for t in street.truth],
        labels={k: v for k, v in street.labels.items() if v == "person"},
    )
    from lensbus.schemas.pipeline import Line

    truth = persons.gt_crossings(Line(name="door", a=tuple(line["a"]), b=tuple(line["b"])))
    got = state.get("cam1")
    assert (got["in"], got["out"]) == (truth["in"], truth["out"]) == (1, 1)


@pytest.mark.slow
def test_people_counter_agrees_with_analytics_on_the_real_detector(
    street: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """YOLOv3-tiny's real output on the street sequence, tracked by analytics' own code with
    the project's pipeline: the project counts what analytics counts on the same line."""
    import mot_sequence
    from models_fixture import demo_packages

    from lensbus_analytics.camera import CameraAnalytics

    m = manifest("people-counter")
    assert m.pipeline is not None and m.pipeline.tracker and m.pipeline.zones
    package = demo_packages(tmp_path_factory)["yolov3-tiny-onnx"]
    found = mot_sequence.detections(street, package, package.manifest.score_threshold)
    cam = CameraAnalytics("cam1", m.pipeline.tracker, m.pipeline.zones)
    tracked, crossings = [], {"in": 0, "out": 0}
    for f, observations in enumerate(found):
        dets = [
            Detection(
                label=o.label,
                class_id=o.class_id,
                score=o.score,
                box=Box.from_normalized(
                    o.box[0] / 640, o.box[1] / 480, o.box[2] / 640, o.box[3] / 480, 640, 480
                ),
            )
            for o in observations
        ]
        out, events = cam.apply(result("cam1", f, *dets), ("track", "zones"))
        tracked.append(out)
        for e in events:
            if e.trigger == "cross":
                crossings[e.direction] += 1
    state = MemoryState()
    ctx, _ = context(m, state)
    run(handler("people-counter"), ctx, tracked)
    got = state.get("cam1")
    assert (got["in"], got["out"]) == (crossings["in"], crossings["out"])
    assert got["in"] + got["out"] >= 2, got  # both walkers were seen crossing


# ---- end to end: each sample deployed to a running system ------------------------------------
#
# A real nats-server, the deployer with the demo models uploaded, the sample deployed with
# `lensbus project deploy` (which sets its model or pipeline on the group), the projects
# service running it, inference on the real model, the publisher, capture playing real photos
# or the street sequence (and analytics for the people counter's tracker).

GROUP = "default"  # every camera not in the cameras bucket is in it: no camera records needed
PIECES = {
    "lensbus.cli.project": "D's `lensbus project` CLI",
    "lensbus.projects.host": "H's project host",
    "lensbus_projects.app": "R's projects service",
    "lensbus_publisher.projects": "P's project overlays in the publisher",
}


def need_pieces() -> None:
    """Skip, naming them, while pieces of the projects feature are missing."""
    missing = [what for module, what in PIECES.items() if importlib.util.find_spec(module) is None]
    if missing:
        pytest.skip(f"not built yet: {', '.join(missing)}")


def lensbus(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    """The ``lensbus`` command as a user runs it (its own process, only this server)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LENSBUS_")}
    env["LENSBUS_NATS_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "lensbus.cli.main", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def sample_copy(name: str, tmp_path: Path, version: str = "1", **settings: Any) -> Path:
    """The sample as a user would change it: a copy, its version and some settings changed."""
    folder = tmp_path / f"{name}-{version}"
    shutil.copytree(PROJECTS / name, folder, ignore=shutil.ignore_patterns("__pycache__"))
    data = json.loads((folder / "project.json").read_text())
    data["version"] = version
    data["settings"].update(settings)
    (folder / "project.json").write_text(json.dumps(data, indent=2))
    return folder


class Listener:
    """Everything on some subjects, decoded, in arrival order."""

    def __init__(self) -> None:
        self.nc: NATS | None = None
        self.got: dict[str, list[Any]] = {}
        self.last_at: dict[str, float] = {}

    async def start(self, url: str, **subjects: tuple[str, type[Any]]) -> Listener:
        self.nc = await nats_py.connect(url)
        for key, (subject, cls) in subjects.items():
            self.got[key] = []

            async def on(msg: Msg, key: str = key, cls: type[Any] = cls) -> None:
                self.got[key].append(decode(msg.data, cls))
                self.last_at[key] = time.monotonic()

            await self.nc.subscribe(subject, cb=on)
        await self.nc.flush()
        return self

    async def until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()


async def reports(url: str, project: str) -> list[ProjectReport]:
    """What each projects-service instance says it runs of ``project``."""
    nc = await nats_py.connect(url)
    try:
        kv = await nc.jetstream().key_value(DEPLOYMENTS_BUCKET)
        try:
            keys = await kv.keys()
        except NoKeysError:
            return []
        mine = [k for k in keys if k.startswith(project_report_key(project, ""))]
        return [decode((await kv.get(k)).value or b"", ProjectReport) for k in mine]
    except BucketNotFoundError:
        return []
    finally:
        await nc.close()


async def serving(url: str, project: str, version: str, timeout: float = 90) -> ProjectReport:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rep in await reports(url, project):
            if rep.serving == version and rep.state == "running":
                return rep
            assert rep.state != "failed" or rep.version != version, rep
        await asyncio.sleep(0.2)
    raise AssertionError(
        f"{project} {version} not running in {timeout}s: {await reports(url, project)}"
    )


async def handled_more_than(url: str, project: str, version: str, n: int) -> ProjectReport:
    """The report of ``version`` once it has handled more than ``n`` results."""
    deadline = time.monotonic() + 30
    while (rep := await serving(url, project, version)).handled <= n:
        assert time.monotonic() < deadline, f"{project} {version} handled only {rep}"
        await asyncio.sleep(0.2)
    return rep


async def project_metric(system: System, kind: str, labels: str, wanted: float) -> float:
    """``lensbus_project_<kind>{labels}`` of the projects service once it is ``wanted`` (the
    project's metrics come in its beats), or what it is after 10 s."""
    deadline = time.monotonic() + 10
    while (value := system.projects.metric(f"lensbus_project_{kind}", labels)) < wanted:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    return value


async def mjpeg(url: str, count: int, timeout: float = 30) -> list[np.ndarray]:
    """``count`` frames of an MJPEG stream, decoded (BGR)."""
    frames: list[np.ndarray] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        async with http.get(url) as resp:
            assert resp.status == 200, await resp.text()
            while len(frames) < count:
                line = (await resp.content.readline()).strip()
                if not line.lower().startswith(b"content-length:"):
                    continue
                length = int(line.split(b":")[1])
                while (await resp.content.readline()).strip():
                    pass  # the part's other headers, up to the blank line
                jpeg = await resp.content.readexactly(length)
                image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
                assert image is not None, "a part that is not a JPEG"
                frames.append(image)
    return frames


def column_match(img: np.ndarray, x: int, y0: int, y1: int, bgr: tuple[int, int, int]) -> float:
    """Fraction of the rows y0..y1 with ``bgr`` (JPEG-tolerant) within 2 px of column x."""
    band = img[y0:y1, max(0, x - 2) : x + 3].astype(int)
    close = (np.abs(band - np.array(bgr)).max(axis=2) < 70).any(axis=1)
    return float(close.mean()) if close.size else 0.0


class System:
    """The services of one test, on its own nats-server."""

    def __init__(self, url: str, start_service: Any, tmp_path: Path) -> None:
        self.url = url
        self.start = start_service
        self.tmp = tmp_path
        self.publisher: Any = None
        self.projects: Any = None

    def upload(self, *folders: Path) -> None:
        for folder in folders:
            r = lensbus("models", "upload", "-q", str(folder), url=self.url)
            assert r.returncode == 0, r.stderr

    def deploy(self, folder: Path) -> None:
        r = lensbus("project", "deploy", "-q", str(folder), "--group", GROUP, url=self.url)
        assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"

    def services(self, camera: str, source: Path, fps: float, **publisher: Any) -> Any:
        """The projects service, inference, the publisher; then capture (returned)."""
        self.projects = self.start("projects", self.url, cache_dir=self.tmp / "projects")
        self.projects.wait_healthy(30)
        inference = self.start(
            "inference", self.url, group=GROUP, model_cache=self.tmp / "models", threads=2
        )
        self.publisher = self.start("publisher", self.url, **publisher)
        inference.wait_healthy(90)
        self.publisher.wait_healthy(30)
        return self.start("capture", self.url, camera=camera, source=source, fps=fps, loop="true")

    def stream(self, camera: str, kind: str, project: str = "") -> str:
        query = f"?project={project}" if project else ""
        return f"http://127.0.0.1:{self.publisher.port}/cameras/{camera}/{kind}.mjpeg{query}"


@pytest.fixture
def system(fresh_nats: NatsServer, start_service: Any, tmp_path: Path) -> System:
    need_pieces()
    start_service(
        "deployer",
        fresh_nats.url,
        work_dir=tmp_path / "deployer-work",
        max_package_bytes=128 * 1024 * 1024,
    ).wait_healthy(30)
    return System(fresh_nats.url, start_service, tmp_path)


MAGENTA = (255, 0, 255)  # BGR of the hot dog box's "#ff00ff"
CYAN = (255, 255, 0)  # BGR of the people counter's "#00ffff"


@pytest.mark.slow
async def test_hotdog_alert_deployed_alerts_once_with_webhook_and_box(
    system: System, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    """No photo of a hot dog is installed here (none in darknet's, scikit-image's or the
    model packages' data), so the sample runs with ``label`` "dog" on darknet's dog.jpg:
    the same code path, the label a setting."""
    from test_webhooks import Receiver

    cam = "kitchen"
    system.upload(demo_models["yolov3-tiny-onnx"])
    system.deploy(sample_copy("hotdog-alert", tmp_path, label="dog", min_count=3))
    hooks = await Receiver().start()
    events = await Listener().start(
        system.url,
        alerts=(S.project_output("hotdog-alert", cam, "alert"), ProjectMessage),
        events=(S.events(cam), Event),
    )
    try:
        rule = {"name": "hotdog", "projects": ["hotdog-alert"], "webhook": hooks.url("/hook")}
        system.services(cam, photos(tmp_path, "dog.jpg"), 4, rules=json.dumps([rule]))
        await serving(system.url, "hotdog-alert", "1")
        await events.until(lambda: bool(events.got["alerts"]), 90, "the alert")
        await events.until(lambda: bool(hooks.on("/hook")), 30, "the webhook")

        alert = events.got["alerts"][0]
        assert alert.payload["label"] == "dog" and alert.payload["in_a_row"] == 3
        assert alert.payload["score"] > 0.5
        raised = [e for e in events.got["events"] if e.trigger == "project"]
        assert [(e.project, e.label, e.seq) for e in raised] == [("hotdog-alert", "dog", alert.seq)]
        body = json.loads(hooks.on("/hook")[0].body)
        assert body["project"] == "hotdog-alert" and body["seq"] == alert.seq, body

        # The box on the project stream: magenta, just outside the dog's box; not on the
        # device stream. Meanwhile the dog stays in view: no second alert.
        xmin, ymin, xmax, ymax = alert.payload["box"]
        drawn = (await mjpeg(system.stream(cam, "project", "hotdog-alert"), 3))[-1]
        device = (await mjpeg(system.stream(cam, "device"), 1))[0]
        h, w = drawn.shape[:2]
        x, y0, y1 = round((xmin - 0.01) * w), round(ymin * h), round(ymax * h)
        assert column_match(drawn, x, y0, y1, MAGENTA) > 0.9
        assert column_match(device, x, y0, y1, MAGENTA) < 0.1
        await handled_more_than(system.url, "hotdog-alert", "1", 8)
        assert len(events.got["alerts"]) == 1
        counters = 'name="alerts",project="hotdog-alert"'
        assert await project_metric(system, "counter_total", counters, 1) == 1
    finally:
        await events.close()
        await hooks.stop()


@pytest.mark.slow
async def test_privacy_blur_deployed_blurs_the_face_on_the_project_stream_only(
    system: System, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    skdata = pytest.importorskip("skimage.data")
    cam = "lobby"
    folder = tmp_path / "faces"
    folder.mkdir()
    photo = cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR)  # 512x512, one face
    cv2.imwrite(str(folder / "astronaut.jpg"), photo, [cv2.IMWRITE_JPEG_QUALITY, 95])
    system.upload(demo_models["face-ssd-opencv"])
    system.deploy(sample_copy("privacy-blur", tmp_path))
    seen = await Listener().start(
        system.url,
        results=(S.results(cam), Result),
        overlays=(S.project_overlay("privacy-blur", cam), Overlay),
    )
    try:
        system.services(cam, folder, 4)
        await serving(system.url, "privacy-blur", "1")
        await seen.until(lambda: any(o.shapes for o in seen.got["overlays"]), 90, "a blur")
        face = max(
            (d for r in seen.got["results"] for d in r.detections if d.label == "face"),
            key=lambda d: d.score,
        )
        drawn = (await mjpeg(system.stream(cam, "project", "privacy-blur"), 3))[-1]
        device = (await mjpeg(system.stream(cam, "device"), 1))[0]
    finally:
        await seen.close()

    # The middle of the face (clear of the box the publisher draws round it): the variance of
    # its pixels, on the device stream as captured and on the project stream blurred.
    b = face.box
    dx, dy = (b.right - b.left) // 4, (b.bottom - b.top) // 4
    region = (slice(b.top + dy, b.bottom - dy), slice(b.left + dx, b.right - dx))

    def variance(img: np.ndarray) -> float:
        return float(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[region].astype(float).var())

    figures = [round(variance(img)) for img in (photo, device, drawn)]
    print("face variance (photo, device stream, project stream):", figures)
    assert variance(device) == pytest.approx(variance(photo), rel=0.1)  # untouched
    assert variance(drawn) < 0.1 * variance(device), (variance(drawn), variance(device))
    counter = 'name="faces",project="privacy-blur"'
    assert await project_metric(system, "counter_total", counter, 1) >= 1


def street_folder(street: Any, tmp_path: Path) -> Path:
    folder = tmp_path / "street"
    folder.mkdir()
    for i, frame in enumerate(street.frames):
        cv2.imwrite(str(folder / f"{i:04d}.jpg"), frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return folder


def total(m: ProjectMessage) -> int:
    return int(m.payload["in"] + m.payload["out"])


async def line_drawn(system: System, cam: str) -> None:
    """The counter's line (cyan, down the middle) on the project stream, not on the device's."""
    drawn = (await mjpeg(system.stream(cam, "project", "people-counter"), 3))[-1]
    device = (await mjpeg(system.stream(cam, "device"), 1))[0]
    h, w = drawn.shape[:2]
    assert column_match(drawn, w // 2, h // 10, h * 9 // 10, CYAN) > 0.9
    assert column_match(device, w // 2, h // 10, h * 9 // 10, CYAN) < 0.3


@pytest.mark.slow
async def test_people_counter_deployed_counts_draws_and_keeps_counting_across_a_swap(
    system: System, demo_models: dict[str, Path], street: Any, tmp_path: Path
) -> None:
    """The sample's pipeline tracks people (analytics) and counts the same line on cam1; the
    project's counts equal analytics' own, before and after a v2 takes over."""
    cam = "cam1"  # the camera the sample's zones stage names
    system.upload(demo_models["yolov3-tiny-onnx"])
    system.deploy(sample_copy("people-counter", tmp_path))
    analytics = system.start("analytics", system.url, group=GROUP)
    analytics.wait_healthy(30)
    counts = await Listener().start(
        system.url,
        counts=(S.project_output("people-counter", cam, "counts"), ProjectMessage),
        results=(S.results(cam), Result),
    )
    got = counts.got["counts"]

    def agree() -> bool:  # the project's last counts are analytics' own
        labels = f'camera="{cam}",direction="{{}}",label="person",line="door"'
        theirs = [
            analytics.metric("lensbus_analytics_line_crossings_total", labels.format(d))
            for d in ("in", "out")
        ]
        return bool(got) and [got[-1].payload["in"], got[-1].payload["out"]] == theirs

    try:
        capture = system.services(cam, street_folder(street, tmp_path), street.fps)
        await serving(system.url, "people-counter", "1")
        await counts.until(lambda: any(total(m) >= 2 for m in got), 120, "both walkers counted")
        await line_drawn(system, cam)

        # v2 takes over while the street plays on; it counts on from v1's totals.
        before = max(total(m) for m in got)
        system.deploy(sample_copy("people-counter", tmp_path, version="2"))
        await serving(system.url, "people-counter", "2")
        await counts.until(
            lambda: any(m.version == "2" and total(m) >= before + 2 for m in got),
            120,
            "v2 counting the next walkers",
        )
        capture.stop()
        # no result for 2 s: inference, analytics and the project have caught up
        await counts.until(
            lambda: time.monotonic() - counts.last_at.get("results", 0) > 2, 30, "quiet"
        )
        await counts.until(agree, 10, "the project's counts to equal analytics'")
    finally:
        await counts.close()

    print(f"counts: v1 up to {before}, then {[(m.version, m.payload) for m in got]}")
    versions = [m.version for m in got]
    assert versions == sorted(versions) and versions[-1] == "2"  # v1 then v2, never back
    totals = [total(m) for m in got]
    assert totals == sorted(totals)  # counts only go up: v2 started from v1's
    report = await serving(system.url, "people-counter", "2")
    assert report.errors == 0 and report.dropped == 0
    gauge = 'name="people_in",project="people-counter"'
    people_in = got[-1].payload["in"]
    assert await project_metric(system, "gauge", gauge, people_in) == people_in


def test_a_swap_backlog_is_not_dropped_when_the_next_result_comes() -> None:
    """What the new version held while the old one stopped is handled whole, even when a new
    result arrives before the backlog is: the people counter's totals go on across a swap."""
    from dataclasses import dataclass

    from lensbus.projects.mailbox import Mailbox

    @dataclass
    class Item:
        camera: str
        seq: int

    box: Mailbox[Item] = Mailbox(2)
    for seq in range(1, 8):
        box.put(Item("cam1", seq))  # held while the old version finishes 1 and 2
    box.go({"cam1": 2})
    taken = [box.take()]
    for seq in (8, 9, 10):
        box.put(Item("cam1", seq))  # the handler is behind the new arrivals: 8 is dropped
    taken += [box.take() for _ in range(len(box))]
    assert [i.seq for i in taken if i] == [3, 4, 5, 6, 7, 9, 10]
    assert (box.dropped, box.skipped) == (1, 2)
