"""The projects service as a real process on a real nats-server: a project deployed (its
packed folder in ``lensbus-projects``, its record in the deployments bucket) runs in a host
process of its own and reports ``running``; results published on ``results.cam1`` are
handled (its ``ctx.publish`` output arrives); a v2 swapped in while results flow handles
every result v1 did not, none twice; a v3 whose ``on_start`` raises is reported ``failed``
with the cause while v2 keeps handling."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats as nats_py
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig, ObjectStoreConfig
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError
from test_deployer import build_face

from lensbus import Subjects, decode, encode
from lensbus.cameras import CamerasBucket
from lensbus.deployclient import DeployClient
from lensbus.natsserver import NatsServer
from lensbus.projects.mailbox import AFTER_WINDOW_S
from lensbus.projects.package import pack
from lensbus.schemas import CameraConfig, Result
from lensbus.schemas.project import (
    ProjectDeployment,
    ProjectMessage,
    ProjectRelease,
    ProjectReport,
    project_key,
    project_object_name,
    project_report_key,
)
from lensbus.schemas.result import ModelRef
from lensbus.subjects import DEPLOYMENTS_BUCKET, PROJECTS_BUCKET

pytestmark = pytest.mark.slow

S = Subjects()
INSTANCE = "proj-test"

# A handler that publishes the seq of each result it handles, and which version handled it.
ECHO = """
def on_result(result, ctx):
    ctx.publish("seen", {"seq": result.seq, "v": ctx.version})
"""
# The models its project.json names, each unpacked in a folder of LENSBUS_PROJECT_MODELS.
MODELS_LISTED = """
import os
from pathlib import Path

def on_result(result, ctx):
    root = Path(os.environ["LENSBUS_PROJECT_MODELS"])
    models = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    has = all((root / m / "model.json").is_file() for m in models)
    ctx.publish("seen", {"seq": result.seq, "v": ctx.version, "models": models, "manifest": has})
"""
START_RAISES = """
def on_start(ctx):
    raise RuntimeError("no licence key in the settings")

def on_result(result, ctx):
    pass
"""


def write_project(
    root: Path, name: str, version: str, handler: str = ECHO, **manifest: Any
) -> Path:
    folder = root / f"{name}-{version}"
    folder.mkdir(parents=True, exist_ok=True)
    # A mailbox deep enough that a loaded test machine drops nothing: what is checked is
    # the handover, not the handler keeping up.
    data = {"name": name, "version": version, "limits": {"mailbox": 256}, **manifest}
    (folder / "project.json").write_text(json.dumps(data))
    (folder / "handler.py").write_text(handler)
    return folder


async def kv_bucket(nc: Client, bucket: str, history: int = 5) -> Any:
    js = nc.jetstream()
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        return await js.create_key_value(KeyValueConfig(bucket=bucket, history=history))


async def deploy(
    nc: Client, folder: Path, name: str, version: str, groups: tuple[str, ...] = ("default",)
) -> ProjectRelease:
    """What the deployer does: the packed folder into the object store, the record into the
    deployments bucket."""
    data = pack(folder)
    js = nc.jetstream()
    try:
        store = await js.object_store(PROJECTS_BUCKET)
    except (BucketNotFoundError, NotFoundError):
        store = await js.create_object_store(PROJECTS_BUCKET, ObjectStoreConfig())
    await store.put(project_object_name(name, version), data)
    release = ProjectRelease(
        version=version,
        groups=list(groups),
        sha256=hashlib.sha256(data).hexdigest(),
        deployed_ns=time.time_ns(),
        reason="deploy",
    )
    kv = await kv_bucket(nc, DEPLOYMENTS_BUCKET)
    await kv.put(project_key(name), encode(ProjectDeployment(name=name, current=release)))
    return release


async def report(nc: Client, name: str, instance: str = INSTANCE) -> ProjectReport | None:
    kv = await kv_bucket(nc, DEPLOYMENTS_BUCKET)
    try:
        entry = await kv.get(project_report_key(name, instance))
    except KeyNotFoundError:
        return None
    return decode(entry.value or b"", ProjectReport)


async def wait_report(
    nc: Client,
    name: str,
    ok: Callable[[ProjectReport], bool],
    within_s: float = 30.0,
    instance: str = INSTANCE,
) -> ProjectReport:
    deadline = time.monotonic() + within_s
    last = None
    while time.monotonic() < deadline:
        last = await report(nc, name, instance)
        if last is not None and ok(last):
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"no such report of {name} in {within_s} s; last: {last}")


def result(camera: str, seq: int) -> Result:
    now = time.time_ns()
    return Result(
        camera=camera,
        seq=seq,
        capture_ns=now,
        result_ns=now,
        width=640,
        height=480,
        model=ModelRef(name="yolo", version="1"),
        task="detection",
    )


class Seen:
    """Every ProjectMessage on a subject, by seq."""

    def __init__(self) -> None:
        self.messages: list[ProjectMessage] = []
        self.changed = asyncio.Event()

    async def cb(self, msg: Msg) -> None:
        self.messages.append(decode(msg.data, ProjectMessage))
        self.changed.set()

    def seqs(self, version: str | None = None) -> list[int]:
        return [
            int(m.payload["seq"])
            for m in self.messages
            if version is None or m.payload["v"] == version
        ]

    async def wait(self, ok: Callable[[], bool], within_s: float = 20.0) -> None:
        deadline = time.monotonic() + within_s
        while not ok():
            left = deadline - time.monotonic()
            if left <= 0:
                got = [(m.payload["v"], m.payload["seq"]) for m in self.messages]
                raise AssertionError(f"not seen in {within_s} s; seen {got}")
            self.changed.clear()
            await asyncio.wait([asyncio.ensure_future(self.changed.wait())], timeout=left)


@pytest.fixture
async def nc(fresh_nats: NatsServer) -> AsyncIterator[Client]:
    client = await nats_py.connect(fresh_nats.url)
    yield client
    await client.drain()


def start_projects(start_service: Any, url: str, tmp_path: Path, **extra: object) -> Any:
    svc = start_service(
        "projects",
        url,
        instance=INSTANCE,
        cache_dir=tmp_path / "cache",
        report_s=0.5,
        restart_backoff_s=0.2,
        **extra,
    )
    svc.wait_healthy(30)
    return svc


async def test_deploy_swap_and_failed_start(
    fresh_nats: NatsServer, nc: Client, start_service: Any, tmp_path: Path
) -> None:
    svc = start_projects(start_service, fresh_nats.url, tmp_path)
    seen = Seen()
    await nc.subscribe(S.project_output("echo", "cam1", "seen"), cb=seen.cb)

    await deploy(nc, write_project(tmp_path, "echo", "1"), "echo", "1")
    rep = await wait_report(nc, "echo", lambda r: r.state == "running" and r.version == "1")
    assert rep.serving == "1"
    await nc.publish(S.results("cam1"), encode(result("cam1", 1)))
    await seen.wait(lambda: seen.seqs() == [1])

    # v2 swapped in while results flow at a steady 50/s.
    async def flow(first: int, last: int) -> None:
        for seq in range(first, last + 1):
            await nc.publish(S.results("cam1"), encode(result("cam1", seq)))
            await asyncio.sleep(0.02)

    sender = asyncio.create_task(flow(2, 200))
    await asyncio.sleep(0.5)
    await deploy(nc, write_project(tmp_path, "echo", "2"), "echo", "2")
    await wait_report(nc, "echo", lambda r: r.state == "running" and r.serving == "2")
    await sender
    await seen.wait(lambda: len(seen.seqs()) >= 200)
    await nc.flush()
    await asyncio.sleep(0.3)  # nothing more may come: a duplicate would show now
    seqs = seen.seqs()
    assert sorted(seqs) == list(range(1, 201)), f"missing or twice: {_diff(seqs, 200)}"
    v1, v2 = seen.seqs("1"), seen.seqs("2")
    assert v1 and v2, "both versions handled results"
    assert max(v1) < min(v2), "v2 took over after v1's last result"

    # v3's on_start raises: failed with the cause, v2 keeps handling.
    await deploy(nc, write_project(tmp_path, "echo", "3", START_RAISES), "echo", "3")
    rep = await wait_report(nc, "echo", lambda r: r.state == "failed")
    assert rep.version == "3" and rep.serving == "2"
    assert "no licence key" in rep.reason
    await flow(201, 210)
    await seen.wait(lambda: len(seen.seqs()) >= 210)
    assert seen.seqs("2")[-10:] == list(range(201, 211))
    assert svc.metric("lensbus_project_starts_total", 'outcome="failed",project="echo"') >= 1
    # Counted from the hosts' beats (a stopping host beats once more before "stopped").
    handled = await wait_metric(svc, "lensbus_project_results_handled_total", 'project="echo"', 210)
    assert handled == 210
    assert svc.metric("lensbus_project_state", 'project="echo",state="failed"') == 1
    assert svc.stop() == 0


async def test_a_capture_restart_does_not_make_the_next_version_skip(
    fresh_nats: NatsServer, nc: Client, start_service: Any, tmp_path: Path
) -> None:
    """Capture numbers frames from 0 again when it restarts. Before, the service kept the
    highest seq ever handled and a new version skipped every result below it."""
    start_projects(start_service, fresh_nats.url, tmp_path)
    seen = Seen()
    await nc.subscribe(S.project_output("echo", "cam1", "seen"), cb=seen.cb)
    await deploy(nc, write_project(tmp_path, "echo", "1"), "echo", "1")
    await wait_report(nc, "echo", lambda r: r.state == "running")
    for seq in range(1, 41):
        await nc.publish(S.results("cam1"), encode(result("cam1", seq)))
    await seen.wait(lambda: len(seen.seqs()) == 40)
    await deploy(nc, write_project(tmp_path, "echo", "2"), "echo", "2")
    await wait_report(nc, "echo", lambda r: r.state == "running" and r.serving == "2")
    # A result at or below v1's last seq is taken for one v1 handled only this long after
    # the take-over (a late delivery); the restart comes later, as restarts do.
    await asyncio.sleep(AFTER_WINDOW_S + 0.5)
    for seq in range(1, 6):  # a restarted capture's frames 1..5
        await nc.publish(S.results("cam1"), encode(result("cam1", seq)))
    await seen.wait(lambda: seen.seqs("2") == [1, 2, 3, 4, 5])
    await deploy(nc, write_project(tmp_path, "echo", "3"), "echo", "3")
    await wait_report(nc, "echo", lambda r: r.state == "running" and r.serving == "3")
    for seq in range(6, 9):
        await nc.publish(S.results("cam1"), encode(result("cam1", seq)))
    await seen.wait(lambda: seen.seqs("3") == [6, 7, 8])


async def test_the_deploys_groups_choose_the_cameras(
    fresh_nats: NatsServer, nc: Client, start_service: Any, tmp_path: Path
) -> None:
    """`lensbus project deploy --group yard` of a project whose project.json says default
    runs on the yard's cameras only (before: on every camera, project.json's groups)."""
    cameras = await CamerasBucket.open(nc.jetstream())
    await cameras.add(CameraConfig(id="cam2", source="test", group="yard"))
    start_projects(start_service, fresh_nats.url, tmp_path)
    seen = Seen()
    await nc.subscribe(f"{S.prefix}.projects.echo.*.seen", cb=seen.cb)
    await deploy(nc, write_project(tmp_path, "echo", "1"), "echo", "1", groups=("yard",))
    await wait_report(nc, "echo", lambda r: r.state == "running")
    for camera in ("cam1", "cam2"):
        await nc.publish(S.results(camera), encode(result(camera, 1)))
    await seen.wait(lambda: len(seen.messages) >= 1)
    await nc.publish(S.results("cam1"), encode(result("cam1", 2)))
    await nc.publish(S.results("cam2"), encode(result("cam2", 2)))  # after cam1's 2
    await seen.wait(lambda: len(seen.messages) >= 2)
    assert [(m.camera, m.payload["seq"]) for m in seen.messages] == [("cam2", 1), ("cam2", 2)]


async def wait_metric(svc: Any, name: str, labels: str, at_least: float) -> float:
    # Generous: a restart waits for its deadline and back-off, slow on a busy 2-core box.
    deadline = time.monotonic() + 30.0
    while (value := svc.metric(name, labels)) < at_least and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return float(value)


def _diff(seqs: list[int], n: int) -> str:
    missing = sorted(set(range(1, n + 1)) - set(seqs))
    twice = sorted({s for s in seqs if seqs.count(s) > 1})
    return f"missing {missing[:20]}, twice {twice[:20]}"


async def test_removed_project_stops(
    fresh_nats: NatsServer, nc: Client, start_service: Any, tmp_path: Path
) -> None:
    """A deleted record stops the project (its on_stop runs): reported stopped, nothing more
    handled; a project's own metrics show on the service's /metrics."""
    counting = """
def on_start(ctx):
    ctx.n = ctx.counter("handled_here", "results this project saw")

def on_result(result, ctx):
    ctx.n.inc()
    ctx.gauge("last_seq").set(result.seq)
    ctx.publish("seen", {"seq": result.seq, "v": ctx.version})

def on_stop(ctx):
    ctx.publish("seen", {"seq": -1, "v": ctx.version}, camera="cam1")
"""
    svc = start_projects(start_service, fresh_nats.url, tmp_path)
    seen = Seen()
    await nc.subscribe(S.project_output("counter", "cam1", "seen"), cb=seen.cb)
    await deploy(nc, write_project(tmp_path, "counter", "1", counting), "counter", "1")
    await wait_report(nc, "counter", lambda r: r.state == "running")
    for seq in (1, 2, 3):
        await nc.publish(S.results("cam1"), encode(result("cam1", seq)))
    await seen.wait(lambda: seen.seqs() == [1, 2, 3])
    labels = 'name="handled_here",project="counter"'
    assert await wait_metric(svc, "lensbus_project_counter_total", labels, 3) == 3
    assert svc.metric("lensbus_project_gauge", 'name="last_seq",project="counter"') == 3

    kv = await kv_bucket(nc, DEPLOYMENTS_BUCKET)
    await kv.delete(project_key("counter"))
    await wait_report(nc, "counter", lambda r: r.state == "stopped")
    await seen.wait(lambda: -1 in seen.seqs())  # on_stop ran
    await nc.publish(S.results("cam1"), encode(result("cam1", 4)))
    await nc.flush()
    await asyncio.sleep(0.5)
    assert 4 not in seen.seqs()
    assert svc.stop() == 0


async def test_cli_deploy_and_automatic_rollback(
    fresh_nats: NatsServer, nc: Client, start_service: Any, tmp_path: Path
) -> None:
    """End to end with the real deployer: `lensbus project deploy` -> the projects service
    runs it; a v2 whose on_start raises is reported failed, the deployer rolls the record back
    to v1, and v1 (which never stopped) is reported running again."""
    start_service("deployer", fresh_nats.url, work_dir=tmp_path / "deployer").wait_healthy()
    svc = start_projects(start_service, fresh_nats.url, tmp_path)
    seen = Seen()
    await nc.subscribe(S.project_output("roll", "cam1", "seen"), cb=seen.cb)

    def cli_deploy(folder: Path) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "lensbus.cli.main", "project", "deploy", "-q", str(folder)],
            env={**cli_env(), "LENSBUS_NATS_URL": fresh_nats.url},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr

    # v1 names a stored model: the service fetches it for the project's process.
    async with await DeployClient.connect(fresh_nats.url, timeout_s=30) as dc:
        await dc.upload(build_face(tmp_path / "face"))
    v1 = write_project(tmp_path, "roll", "1", MODELS_LISTED, models=["face-ssd:1"])
    await asyncio.to_thread(cli_deploy, v1)
    await wait_report(nc, "roll", lambda r: r.state == "running" and r.serving == "1")
    await asyncio.to_thread(cli_deploy, write_project(tmp_path, "roll", "2", START_RAISES))
    await wait_report(nc, "roll", lambda r: r.state == "failed" and r.version == "2")

    kv = await kv_bucket(nc, DEPLOYMENTS_BUCKET)

    async def rolled_back() -> ProjectDeployment | None:
        record = decode((await kv.get(project_key("roll"))).value or b"", ProjectDeployment)
        return record if record.current.version == "1" else None

    deadline = time.monotonic() + 20
    while (record := await rolled_back()) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert record is not None and record.state == "rolled_back", record
    assert "no licence key" in record.reason
    rep = await wait_report(nc, "roll", lambda r: r.state == "running" and r.version == "1")
    assert rep.serving == "1" and rep.restarts == 0
    await nc.publish(S.results("cam1"), encode(result("cam1", 7)))
    await seen.wait(lambda: seen.seqs("1") == [7])
    assert seen.messages[-1].payload["models"] == ["face-ssd-1"]
    assert seen.messages[-1].payload["manifest"] is True
    assert svc.stop() == 0


def cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LENSBUS_")}


SLOW_START = """
import time

def on_start(ctx):
    time.sleep(3.5)  # a model to load, a device to open: longer than deadline_s

def on_result(result, ctx):
    ctx.publish("seen", {"seq": result.seq, "v": ctx.version})
"""


async def test_a_start_longer_than_the_deadline_is_not_taken_for_silence(
    fresh_nats: NatsServer, nc: Client, start_service: Any, tmp_path: Path
) -> None:
    """A host beats from "ready" on. Before, the watchdog timed its silence from the
    process's spawn: a start (on_start) longer than deadline_s got it killed as ``silent``
    the moment it began serving, and again after every restart."""
    svc = start_projects(start_service, fresh_nats.url, tmp_path)
    seen = Seen()
    await nc.subscribe(S.project_output("slow", "cam1", "seen"), cb=seen.cb)
    folder = write_project(tmp_path, "slow", "1", SLOW_START, limits={"deadline_s": 2.0})
    await deploy(nc, folder, "slow", "1")
    await wait_report(nc, "slow", lambda r: r.state == "running", within_s=60)
    for seq in range(1, 6):
        await nc.publish(S.results("cam1"), encode(result("cam1", seq)))
        await asyncio.sleep(0.2)
    await seen.wait(lambda: len(seen.seqs()) == 5)
    rep = await report(nc, "slow")
    assert rep is not None and rep.restarts == 0, rep
    silent = 'project="slow",reason="silent"'
    assert svc.metric("lensbus_project_restarts_total", silent) == 0
