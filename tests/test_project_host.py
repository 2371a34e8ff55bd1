"""A project's host (``python -m lensbus.projects.host``) as a real process on a real
nats-server, driven over its control protocol by the test as the projects service would:
real results and real JPEG frames in, ctx's outputs decoded from NATS, beats read back.
Also the mailbox's logic, and ``lensbus project run``'s reload (devrun) as a real process."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import msgpack
import numpy as np
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from lensbus import Subjects, decode, encode
from lensbus.bus import connect
from lensbus.natsprojects import project_permissions, project_user
from lensbus.natsserver import NatsServer
from lensbus.projects import control
from lensbus.projects.context import parse_cameras
from lensbus.projects.mailbox import Mailbox
from lensbus.schemas.event import Event
from lensbus.schemas.frame import FrameEnvelope
from lensbus.schemas.project import Overlay, ProjectMessage
from lensbus.schemas.result import Box, Detection, ModelRef, Result

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PHOTO = Path("/usr/share/darknet/data/dog.jpg")
TIMEOUT = 30.0


# ---- helpers --------------------------------------------------------------------------------


def unique(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


def write_project(root: Path, handler: str, **manifest: Any) -> Path:
    """A project folder: project.json (a unique name unless given) and handler.py."""
    folder = root / unique("proj")
    folder.mkdir(parents=True)
    doc = {"name": unique("p"), "version": "1", **manifest}
    (folder / "project.json").write_text(json.dumps(doc))
    (folder / "handler.py").write_text(textwrap.dedent(handler))
    return folder


def result(camera: str, seq: int, labels: tuple[str, ...] = ("dog",)) -> Result:
    box = Box.from_normalized(0.1, 0.2, 0.5, 0.6, 768, 576)
    dets = [Detection(label=lb, class_id=i, score=0.9, box=box) for i, lb in enumerate(labels)]
    now = time.time_ns()
    return Result(
        camera=camera,
        seq=seq,
        capture_ns=now - 1000,
        result_ns=now,
        width=768,
        height=576,
        model=ModelRef(name="yolo", version="1"),
        task="detection",
        detections=dets,
    )


def frame(camera: str, seq: int, jpeg: bytes) -> FrameEnvelope:
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    h, w = image.shape[:2]
    return FrameEnvelope(
        camera=camera, seq=seq, capture_ns=time.time_ns(), width=w, height=h, data=jpeg
    )


@dataclass
class HostRun:
    """A host process and what it wrote on its protocol stream."""

    proc: asyncio.subprocess.Process
    log_path: Path
    messages: asyncio.Queue[dict[str, Any]]
    beat: control.Beat

    @classmethod
    async def start(
        cls,
        project: Path,
        server: NatsServer,
        prefix: str,
        cameras: str = "*",
        extra_env: dict[str, str] | None = None,
    ) -> HostRun:
        env = {
            **os.environ,
            control.ENV_DIR: str(project),
            control.ENV_NATS_URL: server.url,
            control.ENV_PREFIX: prefix,
            control.ENV_CAMERAS: cameras,
            control.ENV_INSTANCE: "test",
            **(extra_env or {}),
        }
        log_path = project.parent / f"{project.name}-{uuid.uuid4().hex[:6]}.log"
        with open(log_path, "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "lensbus.projects.host",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env=env,
                cwd=str(ROOT),
            )
        run = cls(proc, log_path, asyncio.Queue(), control.Beat())
        asyncio.get_running_loop().create_task(run._read())
        return run

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            message = control.parse(line)  # anything else on this stream fails the test
            if message["t"] == "beat":
                self.beat = control.parse_beat(message)
            await self.messages.put(message)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def expect(self, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next message of ``kind`` (beats in between are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(self.messages.get(), max(left, 0.01))
            except TimeoutError:
                raise AssertionError(f"no {kind!r} from the host; its log:\n{self.log}") from None
            if message["t"] == kind:
                return message
            if message["t"] != "beat":
                raise AssertionError(f"expected {kind!r}, got {message}; log:\n{self.log}")

    async def beat_until(
        self, check: Callable[[control.Beat], bool], timeout: float = TIMEOUT
    ) -> control.Beat:
        deadline = time.monotonic() + timeout
        while not check(self.beat):
            if time.monotonic() > deadline:
                raise AssertionError(f"beats never matched; last {self.beat}; log:\n{self.log}")
            await self.expect("beat", timeout=max(deadline - time.monotonic(), 0.01))
        return self.beat

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(control.dump(message).encode())

    async def stop(self) -> dict[str, Any]:
        self.send({"t": "stop"})
        stopped = await self.expect("stopped")
        assert await asyncio.wait_for(self.proc.wait(), TIMEOUT) == 0, self.log
        return stopped

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


@pytest.fixture
async def hosts() -> AsyncIterator[list[HostRun]]:
    started: list[HostRun] = []
    yield started
    for run in started:
        run.kill()
        await run.proc.wait()


@pytest.fixture
async def nc(nats: NatsServer) -> AsyncIterator[Client]:
    conn = await connect(nats.url, name="test-project-host", timeout_s=10)
    yield conn
    await conn.close()


async def collect(nc: Client, subject: str) -> asyncio.Queue[Msg]:
    queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def cb(msg: Msg) -> None:
        await queue.put(msg)

    await nc.subscribe(subject, cb=cb)
    await nc.flush()
    return queue


async def take(queue: asyncio.Queue[Msg], n: int, timeout: float = TIMEOUT) -> list[Msg]:
    out = []
    for _ in range(n):
        out.append(await asyncio.wait_for(queue.get(), timeout))
    return out


async def send_results(nc: Client, s: Subjects, camera: str, seqs: range) -> None:
    for seq in seqs:
        await nc.publish(s.results(camera), encode(result(camera, seq)))
    await nc.flush()


# ---- the mailbox (pure logic) ---------------------------------------------------------------


@dataclass
class It:
    camera: str
    seq: int


def test_mailbox_holds_until_go_then_drops_oldest_and_takes_turns() -> None:
    box: Mailbox[It] = Mailbox(2, hold_limit=3)
    for seq in range(1, 6):
        box.put(It("a", seq))
    assert box.take() is None  # held before "go"
    assert box.dropped == 2  # past the hold limit: 1, 2
    box.put(It("b", 1))
    box.go({"a": 3})
    assert box.skipped == 1  # a3: the old version handled it, not a drop
    assert box.dropped == 2
    order = [box.take(), box.take(), box.take(), box.take()]
    assert [(i.camera, i.seq) for i in order if i] == [("a", 4), ("b", 1), ("a", 5)]
    for seq in range(6, 10):
        box.put(It("a", seq))
    assert box.dropped == 4 and [box.take(), box.take()] == [It("a", 8), It("a", 9)]
    box.put(It("a", 1))  # the camera restarted: it left "after" at its first newer seq
    assert box.take() == It("a", 1)
    box.put(It("b", 2))
    assert box.retain(["a"]) == 1 and box.take() is None


def test_cameras_parsed_as_the_protocol_says() -> None:
    assert parse_cameras("*") is None and parse_cameras("") is None and parse_cameras(None) is None
    assert parse_cameras(" cam1, cam2 ,") == {"cam1", "cam2"}
    assert parse_cameras([]) == frozenset()  # "cameras": []: none of them


# ---- the host -------------------------------------------------------------------------------

OUTPUTS = """
    import hashlib, time

    def on_start(ctx):
        print("printed by on_start")  # must land in the log, not the protocol
        ctx.log.info("started %s %s", ctx.project, ctx.settings["greeting"])

    def on_result(result, ctx):
        image = ctx.frame()
        assert ctx.frame() is image  # decoded once per result
        ctx.publish("seen", {"seq": result.seq, "labels": [d.label for d in result.detections],
                             "sha": hashlib.sha256(image.tobytes()).hexdigest(),
                             "shape": list(image.shape)})
        ctx.event("dog", 0.75, box=(0.1, 0.2, 0.5, 0.6), detail={"why": "test"})
        ctx.overlay([{"shape": "box", "points": [[0.1, 0.2], [0.5, 0.6]], "text": "dog"}],
                    ttl_s=2.0)
        ctx.counter("seen", "results seen").inc()
        ctx.gauge("last_seq").set(result.seq)
"""


async def test_ready_go_outputs_frame_and_metrics(
    nats: NatsServer, nc: Client, hosts: list[HostRun], tmp_path: Path
) -> None:
    if not PHOTO.is_file():
        pytest.skip("Debian package darknet (real photos) is not installed")
    jpeg = PHOTO.read_bytes()
    prefix, name = unique("t"), unique("out")
    s = Subjects(prefix)
    project = write_project(tmp_path, OUTPUTS, name=name, frames=True, settings={"greeting": "hi"})
    outputs = await collect(nc, s.project_output(name, "cam1", "seen"))
    events = await collect(nc, s.project_event(name, "cam1"))
    overlays = await collect(nc, s.project_overlay(name, "cam1"))
    hosts.append(run := await HostRun.start(project, nats, prefix))
    await run.expect("ready")
    for seq in (1, 2, 3):  # held until "go"
        await nc.publish(s.frames("cam1"), encode(frame("cam1", seq, jpeg)))
        await nc.publish(s.results("cam1"), encode(result("cam1", seq)))
    await nc.flush()
    await run.expect("beat")
    await run.expect("beat")
    assert run.beat.handled == 0 and outputs.empty()
    run.send({"t": "go", "after": None})

    messages = [decode(m.data, ProjectMessage) for m in await take(outputs, 3)]
    assert [m.payload["seq"] for m in messages] == [1, 2, 3]
    expected = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert expected is not None
    first = messages[0]
    assert first.payload["sha"] == hashlib.sha256(expected.tobytes()).hexdigest()
    assert first.payload["shape"] == list(expected.shape)
    assert (first.project, first.version, first.camera, first.topic) == (name, "1", "cam1", "seen")
    assert first.payload["labels"] == ["dog"] and first.capture_ns > 0

    event = decode((await take(events, 1))[0].data, Event)
    assert (event.trigger, event.project, event.rule, event.label) == ("project", name, name, "dog")
    assert event.seq == 1 and event.detail == {"why": "test"} and event.score == 0.75
    assert event.box is not None and event.box.left == round(0.1 * 768)
    assert event.model is not None and event.model.name == "yolo"
    overlay = decode((await take(overlays, 1))[0].data, Overlay)
    assert overlay.seq == 1 and overlay.ttl_s == 2.0 and overlay.shapes[0].text == "dog"

    beat = await run.beat_until(lambda b: b.handled == 3 and len(b.metrics) == 2)
    metrics = {m.name: (m.kind, m.value) for m in beat.metrics}
    assert metrics == {"seen": ("counter", 3.0), "last_seq": ("gauge", 3.0)}
    assert beat.errors == 0 and beat.dropped == 0 and beat.last == {"cam1": 3}
    stopped = await run.stop()
    assert stopped["last"] == {"cam1": 3}
    assert "printed by on_start" in run.log and "started" in run.log


STATEFUL = """
    import asyncio

    async def on_start(ctx):
        ctx.counter("starts").inc()

    async def on_result(result, ctx):
        await asyncio.sleep(0)
        count = ctx.state.get("count", 0) + 1
        ctx.state.set("count", count)
        ctx.state.set("gone", 1)
        ctx.state.delete("gone")
        ctx.publish("count", {"count": count, "keys": ctx.state.keys()})

    def on_stop(ctx):
        ctx.publish("bye", {"count": ctx.state.get("count")}, camera="cam1")
"""


async def test_async_handler_state_survives_a_restart(
    nats: NatsServer, nc: Client, hosts: list[HostRun], tmp_path: Path
) -> None:
    prefix, name = unique("t"), unique("state")
    s = Subjects(prefix)
    project = write_project(tmp_path, STATEFUL, name=name)
    counts = await collect(nc, s.project_output(name, "cam1", "count"))
    byes = await collect(nc, s.project_output(name, "cam1", "bye"))
    for seqs in (range(1, 3), range(3, 4)):  # a second host: the state it finds
        hosts.append(run := await HostRun.start(project, nats, prefix))
        await run.expect("ready")
        run.send({"t": "go", "after": None})
        await send_results(nc, s, "cam1", seqs)
        got = [decode(m.data, ProjectMessage).payload for m in await take(counts, len(seqs))]
        assert [g["count"] for g in got] == list(seqs)
        assert got[-1]["keys"] == ["count"]
        assert (await run.stop())["last"] == {"cam1": seqs[-1]}
        bye = decode((await take(byes, 1))[0].data, ProjectMessage)
        assert bye.payload == {"count": seqs[-1]}


COUNTER = """
    def on_result(result, ctx):
        n = ctx.state.get("n", 0) + 1
        ctx.state.set("n", n)
        ctx.publish("n", [result.seq, n, ctx.state.get("stops", 0)])

    def on_stop(ctx):
        ctx.state.set("stops", ctx.state.get("stops", 0) + 1)
"""


async def test_a_new_version_takes_over_the_state_the_old_one_left(
    nats: NatsServer, nc: Client, hosts: list[HostRun], tmp_path: Path
) -> None:
    """A swap: v2 starts (reading the state) while v1 still handles and writes; at "go" v2
    sees every count v1 made and what v1's on_stop saved."""
    prefix, name = unique("t"), unique("swap")
    s = Subjects(prefix)
    outputs = await collect(nc, s.project_output(name, "cam1", "n"))
    old = write_project(tmp_path / "v1", COUNTER, name=name, limits={"mailbox": 16})
    hosts.append(v1 := await HostRun.start(old, nats, prefix))
    await v1.expect("ready")
    v1.send({"t": "go", "after": None})
    await send_results(nc, s, "cam1", range(1, 4))
    await take(outputs, 3)
    new = write_project(tmp_path / "v2", COUNTER, name=name, version="2", limits={"mailbox": 16})
    hosts.append(v2 := await HostRun.start(new, nats, prefix))
    await v2.expect("ready")  # its state was read here: n == 3
    await send_results(nc, s, "cam1", range(4, 7))  # v1 handles these, v2 holds them
    await take(outputs, 3)
    last = (await v1.stop())["last"]
    assert last == {"cam1": 6}
    v2.send({"t": "go", "after": last})
    await send_results(nc, s, "cam1", range(7, 8))
    got = decode((await take(outputs, 1))[0].data, ProjectMessage).payload
    assert got == [7, 7, 1]  # not [7, 4, 0]: v2 re-read the state when it took over


SLOW = """
    import time

    def on_result(result, ctx):
        time.sleep(3.0 if result.seq == 12 else 0.3)  # 12: long enough for a beat to see it
        ctx.publish("done", result.seq)
"""


async def test_slow_handler_gets_the_newest_and_counts_drops(
    nats: NatsServer, nc: Client, hosts: list[HostRun], tmp_path: Path
) -> None:
    prefix = unique("t")
    s = Subjects(prefix)
    project = write_project(tmp_path, SLOW, limits={"mailbox": 1})
    hosts.append(run := await HostRun.start(project, nats, prefix))
    await run.expect("ready")
    run.send({"t": "go", "after": None})
    await send_results(nc, s, "cam1", range(1, 2))  # handled: the host has taken over
    await run.beat_until(lambda b: b.handled == 1 and b.busy_s is None)
    await send_results(nc, s, "cam1", range(2, 12))
    beat = await run.beat_until(lambda b: b.handled + b.dropped == 11 and b.busy_s is None)
    assert beat.dropped >= 3, beat  # ten in ~0 s, one handled per 0.3 s
    assert beat.last == {"cam1": 11}  # the newest is handled, the oldest were dropped
    await send_results(nc, s, "cam1", range(12, 13))
    busy = await run.beat_until(lambda b: b.busy_s is not None)
    assert busy.busy_s is not None and 0 <= busy.busy_s < 3.0
    stopped = await run.stop()  # while 12 is in hand: it finishes first
    assert stopped["last"] == {"cam1": 12}


RAISING = """
    def on_result(result, ctx):
        if result.seq % 2 == 0:
            raise ValueError("even seq refused")
        if result.seq == 3:
            ctx.frame()  # "frames" is false: a ProjectError, counted like any other
        ctx.publish("ok", result.seq)
"""


async def test_raising_handler_counted_logged_once_and_keeps_going(
    nats: NatsServer, nc: Client, hosts: list[HostRun], tmp_path: Path
) -> None:
    prefix = unique("t")
    s = Subjects(prefix)
    project = write_project(tmp_path, RAISING, limits={"mailbox": 16})
    name = json.loads((project / "project.json").read_text())["name"]
    oks = await collect(nc, s.project_output(name, "cam1", "ok"))
    hosts.append(run := await HostRun.start(project, nats, prefix))
    await run.expect("ready")
    run.send({"t": "go", "after": None})
    await send_results(nc, s, "cam1", range(1, 8))
    await nc.publish(s.results("cam1"), b"\x93not a result")
    await nc.flush()
    beat = await run.beat_until(lambda b: b.handled == 7 and b.rejected)
    assert beat.errors == 4 and beat.last == {"cam1": 7}
    assert beat.rejected == {"result_malformed": 1}
    assert [decode(m.data, ProjectMessage).payload for m in await take(oks, 3)] == [1, 5, 7]
    log = run.log
    assert log.count("handler raised ValueError: even seq refused") == 1, log
    assert 'ProjectError: ctx.frame() needs "frames": true' in log


BASE_EXCEPTIONS = """
    import asyncio

    class Quit(BaseException):
        pass

    async def on_result(result, ctx):
        if result.seq == 2:
            raise Quit("a library's own BaseException")
        if result.seq == 3:
            raise asyncio.CancelledError()  # awaited a task someone cancelled
        ctx.publish("ok", result.seq)
"""


async def test_a_base_exception_is_counted_and_the_next_result_handled(
    nats: NatsServer, nc: Client, hosts: list[HostRun], tmp_path: Path
) -> None:
    """Before: the dispatch task died, beats went on saying idle, nothing more was handled."""
    prefix = unique("t")
    s = Subjects(prefix)
    project = write_project(tmp_path, BASE_EXCEPTIONS, limits={"mailbox": 16})
    name = json.loads((project / "project.json").read_text())["name"]
    ok = await collect(nc, s.project_output(name, "cam1", "ok"))
    hosts.append(run := await HostRun.start(project, nats, prefix))
    await run.expect("ready")
    run.send({"t": "go", "after": None})
    await send_results(nc, s, "cam1", range(1, 6))
    got = [decode(m.data, ProjectMessage).payload for m in await take(ok, 3)]
    assert got == [1, 4, 5]
    beat = await run.beat_until(lambda b: b.handled == 5)
    assert beat.errors == 2


ECHO = """
    def on_result(result, ctx):
        ctx.publish("seq", [result.camera, result.seq])
"""


async def test_go_after_skips_exactly_what_the_old_version_handled(
    nats: NatsServer, nc: Client, hosts: list[HostRun], tmp_path: Path
) -> None:
    prefix = unique("t")
    s = Subjects(prefix)
    project = write_project(tmp_path, ECHO)
    name = json.loads((project / "project.json").read_text())["name"]
    seen = await collect(nc, f"{prefix}.projects.{name}.*.seq")
    hosts.append(run := await HostRun.start(project, nats, prefix, cameras="cam1,cam2"))
    await run.expect("ready")
    await send_results(nc, s, "cam1", range(1, 7))
    await send_results(nc, s, "cam2", range(1, 3))
    await send_results(nc, s, "cam3", range(1, 3))  # not one of its cameras
    await run.expect("beat")
    run.send({"t": "go", "after": {"cam1": 3}})
    got = [tuple(decode(m.data, ProjectMessage).payload) for m in await take(seen, 5)]
    assert sorted(got) == [("cam1", 4), ("cam1", 5), ("cam1", 6), ("cam2", 1), ("cam2", 2)]
    beat = await run.beat_until(lambda b: b.handled == 5)
    assert beat.dropped == 0 and beat.last == {"cam1": 6, "cam2": 2}
    run.send({"t": "cameras", "cameras": ["cam3"]})
    await run.expect("beat")
    await send_results(nc, s, "cam3", range(5, 6))
    await send_results(nc, s, "cam1", range(7, 8))
    got = [tuple(decode(m.data, ProjectMessage).payload) for m in await take(seen, 1)]
    assert got == [("cam3", 5)]
    assert (await run.stop())["last"] == {"cam1": 6, "cam2": 2, "cam3": 5}
    assert seen.empty()


@pytest.mark.parametrize(
    ("handler", "cause"),
    [
        ("import no_such_module_xyz\ndef on_result(r, ctx): pass\n", "ModuleNotFoundError"),
        ("def on_result(r, ctx):\n    return (\n", "SyntaxError"),
        (
            "def on_start(ctx):\n    raise RuntimeError('no camera\\nconfigured')\n"
            "def on_result(r, ctx): pass\n",
            "RuntimeError: no camera configured",
        ),
        ("def on_start(ctx): pass\n", "AttributeError: handler.py has no on_result"),
    ],
)
async def test_a_failed_start_says_why(
    nats: NatsServer, hosts: list[HostRun], tmp_path: Path, handler: str, cause: str
) -> None:
    project = write_project(tmp_path, handler)
    hosts.append(run := await HostRun.start(project, nats, unique("t")))
    failed = await run.expect("failed")
    assert cause in failed["reason"] and "\n" not in failed["reason"], failed
    if cause == "ModuleNotFoundError":
        assert "no_such_module_xyz" in failed["reason"]
    assert await asyncio.wait_for(run.proc.wait(), TIMEOUT) == 1


# A DeepLens inference function's shape (no model: the loop, the frame, drawing, publishing).
DEEPLENS = """
    import json, os
    import awscam, cv2, greengrasssdk

    client = greengrasssdk.client("iot-data")
    iot_topic = "$aws/things/{}/infer".format(os.environ["AWS_IOT_THING_NAME"])

    def infinite_infer_run():
        while True:
            ret, frame = awscam.getLastFrame()
            if not ret:
                raise Exception("Failed to get frame from the stream")
            cv2.rectangle(frame, (10, 10), (60, 60), (0, 0, 255), -1)
            with open("/tmp/results.mjpeg", "wb") as display:
                display.write(cv2.imencode(".jpg", frame)[1].tobytes())
            client.publish(topic=iot_topic, payload=json.dumps({"shape": list(frame.shape)}))

    infinite_infer_run()
"""


async def test_deeplens_function_runs_after_go_and_stops(
    nats: NatsServer, nc: Client, hosts: list[HostRun], tmp_path: Path
) -> None:
    if not PHOTO.is_file():
        pytest.skip("Debian package darknet (real photos) is not installed")
    jpeg = PHOTO.read_bytes()
    prefix, name = unique("t"), unique("dl")
    s = Subjects(prefix)
    project = write_project(tmp_path, DEEPLENS, name=name, runtime="deeplens")
    infer = await collect(nc, s.project_output(name, "cam1", "infer"))
    drawn = await collect(nc, s.project_frame(name, "cam1"))
    hosts.append(run := await HostRun.start(project, nats, prefix, cameras="cam1"))
    await run.expect("ready")
    run.send({"t": "go", "after": None})
    seq = 0
    while infer.empty() or drawn.empty():  # frames until the function answered both ways
        seq += 1
        assert seq < 200, run.log
        await nc.publish(s.frames("cam1"), encode(frame("cam1", seq, jpeg)))
        await asyncio.sleep(0.1)
    message = decode((await take(infer, 1))[0].data, ProjectMessage)
    assert message.topic == f"$aws/things/{name}/infer" and message.camera == "cam1"
    expected = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert expected is not None and message.payload == {"shape": list(expected.shape)}
    picture = decode((await take(drawn, 1))[0].data, FrameEnvelope)
    pixels = cv2.imdecode(np.frombuffer(picture.data, np.uint8), cv2.IMREAD_COLOR)
    assert pixels is not None and pixels[35, 35, 2] > 200 and pixels[35, 35, 0] < 60  # red
    beat = await run.beat_until(lambda b: b.handled >= 1)
    assert beat.busy_s is None and beat.last["cam1"] >= 1
    stopped = await run.stop()
    assert 1 <= stopped["last"]["cam1"] <= seq


async def test_host_runs_as_the_projects_own_nats_user(
    fresh_nats: NatsServer, hosts: list[HostRun], tmp_path: Path
) -> None:
    """With nothing but the project user's permissions (lensbus.natsprojects): results in,
    ctx.publish/event out, ctx.state in its own bucket (made beforehand, as the service does)."""
    prefix, name = unique("t"), unique("own")
    s = Subjects(prefix)
    user, password = project_user(name), "p" + uuid.uuid4().hex
    users = [
        {"user": "admin", "password": "admin-secret-0123456789"},
        {"user": user, "password": password, "permissions": project_permissions(name, prefix)},
    ]
    server = NatsServer(
        tmp_path / "authnats",
        extra_config=f"authorization {json.dumps({'users': users})}",
        log_file=tmp_path / "authnats.log",
    ).start()
    try:
        admin = await connect(
            server.url, name="admin", user="admin", password="admin-secret-0123456789", timeout_s=10
        )
        kv = await admin.jetstream().create_key_value(bucket=s.project_state_bucket(name))
        await kv.put("n", msgpack.packb(10))
        outputs = await collect(admin, s.project_output(name, "cam1", "n"))
        events = await collect(admin, s.project_event(name, "cam1"))
        project = write_project(tmp_path, OWN_USER, name=name)
        env = {control.ENV_USER: user, control.ENV_PASSWORD: password}
        hosts.append(run := await HostRun.start(project, server, prefix, extra_env=env))
        await run.expect("ready")
        run.send({"t": "go", "after": None})
        await send_results(admin, s, "cam1", range(1, 3))
        got = [decode(m.data, ProjectMessage).payload for m in await take(outputs, 2)]
        assert got == [11, 12]
        assert decode((await take(events, 1))[0].data, Event).project == name
        await run.stop()
        assert msgpack.unpackb((await kv.get("n")).value) == 12
        assert "Permissions Violation" not in (tmp_path / "authnats.log").read_text()
        await admin.close()
    finally:
        server.stop()


OWN_USER = """
    def on_result(result, ctx):
        n = ctx.state.get("n") + 1
        ctx.state.set("n", n)
        ctx.publish("n", n)
        ctx.event("seen")
"""


# ---- lensbus project run (devrun) -----------------------------------------------------------

DEV = """
    VERSION = "{version}"

    def on_result(result, ctx):
        ctx.publish("dev", {{"version": VERSION, "seq": result.seq}})
        ctx.event("dev-seen", detail={{"version": VERSION}})
"""


async def test_devrun_prints_outputs_and_reloads_on_change(
    nats: NatsServer, nc: Client, tmp_path: Path
) -> None:
    prefix = unique("t")
    s = Subjects(prefix)
    project = write_project(tmp_path, DEV.format(version="first"))
    code = (
        "import sys; from lensbus.projects.devrun import run_dev; "
        f"sys.exit(run_dev({str(project)!r}, ['cam1'], {nats.url!r}, '', '', {prefix!r}))"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, cwd=str(ROOT)
    )
    assert proc.stdout is not None
    try:
        lines = await _until_printed(proc.stdout, nc, s, '"version": "first"')
        lines += await _until_printed(proc.stdout, nc, s, '"event": "dev-seen"')
        assert any('"topic": "dev"' in line and '"camera": "cam1"' in line for line in lines)
        (project / "handler.py").write_text(textwrap.dedent(DEV.format(version="second")))
        await _until_printed(proc.stdout, nc, s, '"version": "second"')
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _until_printed(
    out: asyncio.StreamReader, nc: Client, s: Subjects, text: str
) -> list[str]:
    """Publish results until ``text`` is printed (the host may be (re)starting meanwhile);
    the lines printed until then."""
    lines: list[str] = []
    seq = 0
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        seq += 1
        await send_results(nc, s, "cam1", range(seq, seq + 1))
        try:
            line = await asyncio.wait_for(out.readline(), 0.5)
        except TimeoutError:
            continue
        assert line, "devrun exited"
        lines.append(line.decode())
        if text in lines[-1]:
            return lines
    raise AssertionError(f"devrun never printed {text!r}")


TLS_ECHO = """
    def on_result(result, ctx):
        ctx.publish("seen", {"seq": result.seq})
"""


async def test_the_host_connects_over_tls_with_the_services_ca(
    hosts: list[HostRun], tmp_path: Path
) -> None:
    """``lensbus up`` and compose run NATS with TLS: a project's process trusts the CA the
    projects service gives it (``LENSBUS_PROJECT_TLS_CA``), not the system's."""
    from lensbus.bus import tls_context
    from lensbus.natstls import ensure_tls

    files = ensure_tls(tmp_path / "tls", ["localhost", "127.0.0.1"])
    server = NatsServer(tmp_path / "nats-tls", tls=files, log_file=tmp_path / "n.log").start()
    conn = await connect(server.url, name="test-tls", timeout_s=10, tls=tls_context(files.ca))
    try:
        prefix, name = unique("t"), unique("tls")
        s = Subjects(prefix)
        outputs = await collect(conn, s.project_output(name, "cam1", "seen"))
        project = write_project(tmp_path, TLS_ECHO, name=name)
        env = {control.ENV_TLS_CA: str(files.ca)}
        hosts.append(run := await HostRun.start(project, server, prefix, extra_env=env))
        await run.expect("ready")
        run.send({"t": "go", "after": None})
        await send_results(conn, s, "cam1", range(1, 3))
        seen = [decode(m.data, ProjectMessage).payload["seq"] for m in await take(outputs, 2)]
        assert seen == [1, 2]
    finally:
        await conn.close()
        server.stop()
