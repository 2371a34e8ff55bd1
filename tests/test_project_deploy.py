"""Projects through the deployer, as a real process against a real nats-server: ``lensbus
project deploy|list|status|rollback|remove`` as a user runs them (``python -m
lensbus.cli.main``), bad projects refused by the deployer itself (the CLI's local check
bypassed), a corrupted upload, and the automatic rollback of a version that fails to start.
The model a project names is a real package (OpenCV's res10 face SSD)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import queue
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import nats as nats_py
import pytest
from nats.js.errors import KeyNotFoundError
from test_deployer import build_face, start_deployer, wait_for

from lensbus import decode, encode
from lensbus.deployclient import DeployClient, DeployError
from lensbus.natsserver import NatsServer
from lensbus.projects import package, scaffold
from lensbus.schemas import (
    Box,
    Deployment,
    Detection,
    ModelRef,
    PipelineDeployment,
    ProjectDeployment,
    ProjectReport,
    ProjectUploadReply,
    Reply,
    Result,
)
from lensbus.schemas.deploy import UploadBegin, UploadChunk, UploadCommit, UploadStarted
from lensbus.schemas.project import project_key, project_report_key
from lensbus.subjects import DEPLOYMENTS_BUCKET, Subjects

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def face_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_face(tmp_path_factory.mktemp("project-face") / "face-ssd")


def lensbus(*args: str, url: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LENSBUS_")}
    env["LENSBUS_NATS_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "lensbus.cli.main", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def make_project(dest: Path, name: str = "counter", **fields: object) -> Path:
    """``lensbus project init``'s project, with ``fields`` over its project.json."""
    root = scaffold.init(name, dest)
    manifest = json.loads((root / "project.json").read_text())
    manifest.update(fields)
    (root / "project.json").write_text(json.dumps(manifest, indent=2))
    return root


def set_fields(root: Path, **fields: object) -> Path:
    manifest = json.loads((root / "project.json").read_text())
    manifest.update(fields)
    (root / "project.json").write_text(json.dumps(manifest, indent=2))
    return root


async def kv_get(url: str, key: str) -> tuple[bytes, int] | None:
    nc = await nats_py.connect(url)
    try:
        kv = await nc.jetstream().key_value(DEPLOYMENTS_BUCKET)
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return None
        return entry.value or b"", entry.revision or 0
    finally:
        await nc.close()


async def record(url: str, name: str) -> tuple[ProjectDeployment | None, int]:
    got = await kv_get(url, project_key(name))
    return (decode(got[0], ProjectDeployment), got[1]) if got else (None, 0)


async def put_report(url: str, report: ProjectReport) -> None:
    """What a projects-service instance writes, with plain nats-py."""
    nc = await nats_py.connect(url)
    try:
        kv = await nc.jetstream().key_value(DEPLOYMENTS_BUCKET)
        await kv.put(project_report_key(report.project, report.instance), encode(report))
    finally:
        await nc.close()


def report(project: str, version: str, state: str, **fields: object) -> ProjectReport:
    values: dict[str, object] = {
        "project": project,
        "instance": "box-a",
        "version": version,
        "state": state,
        "report_ns": time.time_ns(),
    }
    values.update(fields)
    return ProjectReport.model_validate(values)


# ---- the CLI round trip ----------------------------------------------------------------------


async def test_cli_deploy_list_status_second_version_rollback_remove(
    fresh_nats: NatsServer, start_service, tmp_path: Path, face_pkg: Path
) -> None:
    dep = start_deployer(start_service, fresh_nats, tmp_path)
    url = fresh_nats.url
    async with await DeployClient.connect(url) as dc:
        await dc.upload(face_pkg)
    root = make_project(tmp_path / "counter", models=["face-ssd:1"], groups=["lobby"])

    r = lensbus("project", "deploy", str(root), url=url)
    assert r.returncode == 0, r.stderr
    assert "stored project counter version 1" in r.stdout
    assert "group lobby: model face-ssd:1 activated" in r.stdout
    assert "project counter: version 1 desired on lobby" in r.stdout
    assert "100%" in r.stderr  # the progress bar
    rec, _ = await record(url, "counter")
    assert rec is not None and rec.current.version == "1" and rec.current.groups == ["lobby"]
    assert rec.current.sha256 == hashlib.sha256(package.pack(root)).hexdigest()
    group = await kv_get(url, "group.lobby")
    assert group is not None and decode(group[0], Deployment).model.ref == "face-ssd:1"

    # The same folder again: nothing stored twice, the model already desired.
    r = lensbus("project", "deploy", str(root), "-q", url=url)
    assert r.returncode == 0, r.stderr
    assert "already stored, identical" in r.stdout and "face-ssd:1 already desired" in r.stdout

    # Version 2, on two groups given on the command line.
    set_fields(root, version="2", settings={"label": "face"})
    r = lensbus("project", "deploy", str(root), "-q", "-g", "lobby", "-g", "door", url=url)
    assert r.returncode == 0, r.stderr
    assert "group door: model face-ssd:1 activated" in r.stdout
    assert "version 2 desired on lobby, door (was 1)" in r.stdout
    rec, _ = await record(url, "counter")
    assert rec is not None and [h.version for h in rec.history] == ["1"]

    # A version never changes: other content under version 2 is refused.
    (root / "extra.txt").write_text("more")
    r = lensbus("project", "deploy", str(root), "-q", url=url)
    assert r.returncode == 1 and "refused (conflict)" in r.stderr
    assert "version 2 is already stored with different content" in r.stderr
    (root / "extra.txt").unlink()

    r = lensbus("project", "list", "--json", url=url)
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert [(p["name"], p["version"]) for p in listed["projects"]] == [
        ("counter", "1"),
        ("counter", "2"),
    ]
    assert [d["current"]["version"] for d in listed["deployments"]] == ["2"]
    r = lensbus("project", "list", url=url)
    assert r.returncode == 0 and "on lobby,door" in r.stdout.splitlines()[2]

    await put_report(
        url, report("counter", "2", "running", serving="2", handled=5, errors=1, dropped=2)
    )
    r = lensbus("project", "status", "counter", url=url)
    assert r.returncode == 0, r.stderr
    assert "desired   version 2 on lobby, door  [active]" in r.stdout
    assert "instance  box-a  running  serving 2  handled 5  errors 1  dropped 2" in r.stdout
    assert "up to date" in r.stdout
    r = lensbus("project", "status", "--json", url=url)
    (status,) = json.loads(r.stdout)
    assert status["deployment"]["current"]["version"] == "2" and len(status["reports"]) == 1

    r = lensbus("project", "rollback", "counter", url=url)
    assert r.returncode == 0, r.stderr
    assert "project counter: version 1 on lobby [rolled_back] (rollback from version 2)" in (
        r.stdout
    )
    r = lensbus("project", "rollback", "counter", url=url)
    assert r.returncode == 1 and "nothing to roll back to" in r.stderr

    r = lensbus("project", "remove", "counter", url=url)
    assert r.returncode == 0 and "removed (was version 1)" in r.stdout
    assert (await record(url, "counter"))[0] is None
    r = lensbus("project", "remove", "counter", url=url)
    assert r.returncode == 1 and "refused (not_found)" in r.stderr
    r = lensbus("project", "status", "counter", url=url)
    assert "desired   (none: not deployed" in r.stdout
    # Deployed again after its removal: a fresh record.
    r = lensbus("project", "deploy", str(root), "-q", url=url)
    assert r.returncode == 0 and "version 2 desired on lobby" in r.stdout, r.stderr
    rec, _ = await record(url, "counter")
    assert rec is not None and rec.current.version == "2" and rec.history == []
    outcomes = 'outcome="ok",verb="deploy"'
    assert dep.metric("lensbus_deployer_project_changes_total", outcomes) == 4
    assert (
        dep.metric("lensbus_deployer_project_changes_total", 'outcome="created",verb="upload"') == 2
    )
    assert dep.metric("lensbus_deployer_projects_stored") == 2


async def test_a_pipeline_is_set_on_each_group_and_a_missing_model_refused(
    fresh_nats: NatsServer, start_service, tmp_path: Path, face_pkg: Path
) -> None:
    start_deployer(start_service, fresh_nats, tmp_path)
    url = fresh_nats.url
    pipeline = {"stages": [{"stage": "model", "model": "face-ssd:1"}]}
    async with await DeployClient.connect(url) as dc:
        missing = make_project(tmp_path / "m", "needs-yolo", models=["yolov3-tiny:1"])
        await dc.project_upload(missing)
        with pytest.raises(DeployError) as info:
            await dc.project_deploy("needs-yolo")
        assert info.value.code == "not_found"
        assert "model yolov3-tiny:1 (project.json) is not in the model store" in str(info.value)
        assert (await record(url, "needs-yolo"))[0] is None  # nothing written

        await dc.upload(face_pkg)
        piped = make_project(tmp_path / "p", "piped", pipeline=pipeline, groups=["a", "b"])
        await dc.project_upload(piped)
        reply = await dc.project_deploy("piped")
        assert reply.changes[:2] == [
            "group a: pipeline set (revision 1, model face-ssd:1)",
            "group b: pipeline set (revision 1, model face-ssd:1)",
        ]
        got = await kv_get(url, "pipeline.a")
        assert got is not None
        assert decode(got[0], PipelineDeployment).pipeline.primary.model == "face-ssd:1"
        again = await dc.project_deploy("piped", "1", ["a"])
        assert again.changes[0] == "group a: already runs the project's pipeline"
        assert again.deployment is not None and again.deployment.current.groups == ["a"]
        with pytest.raises(DeployError, match="no piped version 9 in the store"):
            await dc.project_deploy("piped", "9")


# ---- refusals --------------------------------------------------------------------------------


BAD_PROJECTS: dict[str, tuple[dict[str, object], str | None, str]] = {
    "missing handler": ({}, None, "handler.py is not in the project"),
    "syntax error": ({}, "def on_result(result, ctx)\n", "handler.py: syntax error at line 1"),
    "import error": ({}, "import nope_nope\n", "No module named 'nope_nope'"),
    "no on_result": ({}, "def on_start(ctx):\n    pass\n", "no on_result(result, ctx)"),
    "unknown key": ({"handlr": "x.py"}, "", "handlr: Extra inputs are not permitted"),
    "bad settings": ({"settings": {"label": 7}}, "", "settings.label: 7 is not of type"),
}


async def test_bad_projects_are_refused_by_the_deployer_naming_the_cause(
    fresh_nats: NatsServer, start_service, tmp_path: Path
) -> None:
    dep = start_deployer(start_service, fresh_nats, tmp_path)
    url = fresh_nats.url
    async with await DeployClient.connect(url, timeout_s=30) as dc:
        for i, (what, (fields, code, cause)) in enumerate(BAD_PROJECTS.items()):
            root = make_project(tmp_path / f"bad{i}", f"bad{i}", **fields)
            if code is None:
                (root / "handler.py").unlink()
            elif code:
                (root / "handler.py").write_text(code)
            # The client packs and uploads as it is: the deployer's checks alone decide.
            with pytest.raises(DeployError) as info:
                await dc.project_upload(root)
            assert info.value.code == "invalid_package", what
            assert cause in info.value.message and "invalid project" in info.value.message, what
            assert str(tmp_path) not in info.value.message  # no deployer paths in it

        # An archive whose member leaves the project.
        evil = tmp_path / "evil.tar.gz"
        with tarfile.open(evil, "w:gz") as tar:
            for name, data in (("project.json", b'{"name":"e","version":"1"}'), ("../x", b"x")):
                info_ = tarfile.TarInfo(name)
                info_.size = len(data)
                tar.addfile(info_, io.BytesIO(data))
        with pytest.raises(DeployError, match="'..' leaves the package"):
            await dc.project_upload(evil)

        # Bytes that are not those announced: refused at the commit.
        data = package.pack(make_project(tmp_path / "ok", "ok"))
        subjects = Subjects()

        async def call(verb: str, msg: object, cls: type[Reply]) -> Reply:
            got = await dc.nc.request(subjects.deployer_api(verb), encode(msg), timeout=30)
            return decode(got.data, cls)

        wrong = hashlib.sha256(data + b"x").hexdigest()
        started = await call(
            "project_upload_begin", UploadBegin(size=len(data), sha256=wrong), UploadStarted
        )
        assert isinstance(started, UploadStarted) and started.ok, started.error
        chunk = UploadChunk(upload_id=started.upload_id, offset=0, data=data)
        assert (await call("project_upload_chunk", chunk, Reply)).ok
        done = await call(
            "project_upload_commit", UploadCommit(upload_id=started.upload_id), ProjectUploadReply
        )
        assert not done.ok and done.code == "bad_request" and "corrupted in transit" in done.error

        listed = await dc.project_list()
        assert listed.projects == []  # nothing refused was stored
    n = len(BAD_PROJECTS) + 1
    upload = 'outcome="invalid_package",verb="upload"'
    assert dep.metric("lensbus_deployer_project_changes_total", upload) == n
    corrupt = 'outcome="bad_request",verb="upload"'
    assert dep.metric("lensbus_deployer_project_changes_total", corrupt) == 1
    assert not any((tmp_path / "deployer-work" / "unpack").iterdir())  # nothing left behind

    # Through the CLI, a bad project fails its local check before any upload.
    bad = make_project(tmp_path / "cli-bad", "clibad", settings={"label": 7})
    r = lensbus("project", "deploy", str(bad), url=url)
    assert r.returncode == 1 and "invalid project: project.json: settings.label" in r.stderr
    assert "uploading" not in r.stderr
    assert dep.metric("lensbus_deployer_project_changes_total", upload) == n


# ---- automatic rollback ----------------------------------------------------------------------


async def test_a_version_that_fails_to_start_is_rolled_back_once(
    fresh_nats: NatsServer, start_service, tmp_path: Path
) -> None:
    dep = start_deployer(start_service, fresh_nats, tmp_path)
    url = fresh_nats.url
    root = make_project(tmp_path / "p", "flaky")
    async with await DeployClient.connect(url, timeout_s=30) as dc:
        await dc.project_upload(root)
        await dc.project_deploy("flaky")
        (root / "handler.py").write_text(
            (root / "handler.py")
            .read_text()
            .replace("def on_start(ctx):", "def on_start(ctx):\n    1 / 0")
        )
        await dc.project_upload(set_fields(root, version="2"))
        await dc.project_deploy("flaky", "2")
        _, before = await record(url, "flaky")

        # The projects service says version 1 runs fine: nothing happens.
        await put_report(url, report("flaky", "1", "running", serving="1"))
        reason = "on_start raised ZeroDivisionError: division by zero"
        await put_report(url, report("flaky", "2", "failed", reason=reason, serving="1"))

        async def rolled_back() -> ProjectDeployment | None:
            rec, _ = await record(url, "flaky")
            return rec if rec is not None and rec.current.version == "1" else None

        rec = await wait_for(rolled_back, what="flaky back on version 1")
        assert isinstance(rec, ProjectDeployment)
        assert rec.state == "rolled_back" and rec.history == []
        assert rec.reason.startswith("auto-rollback: ") and reason in rec.reason
        _, after = await record(url, "flaky")
        assert after == before + 3  # two reports, then exactly one write

        # The same failure from another instance: nothing more.
        await put_report(url, report("flaky", "2", "failed", reason=reason, instance="box-b"))
        await asyncio.sleep(1.5)
        rec2, rev = await record(url, "flaky")
        assert rec2 == rec and rev == after
        status = (await dc.project_status("flaky"))[0]
        assert [r.instance for r in status.reports] == ["box-a", "box-b"]

        # A forged report (its key names another instance) is refused.
        nc = await nats_py.connect(url)
        kv = await nc.jetstream().key_value(DEPLOYMENTS_BUCKET)
        forged = report("flaky", "1", "failed", instance="box-c")
        await kv.put(project_report_key("flaky", "box-z"), encode(forged))
        await nc.close()
        await asyncio.sleep(1.0)
        assert (await record(url, "flaky"))[0] == rec

        # A first version failing has nothing to go back to: said once, release kept.
        solo = make_project(tmp_path / "solo", "solo")
        await dc.project_upload(solo)
        await dc.project_deploy("solo")
        await put_report(url, report("solo", "1", "failed", reason="ImportError: x"))

        async def noted() -> bool:
            rec, _ = await record(url, "solo")
            return rec is not None and "nothing to roll back to" in rec.reason

        await wait_for(noted, what="solo's failure noted")
        rec3, _ = await record(url, "solo")
        assert rec3 is not None and rec3.current.version == "1" and rec3.state == "active"
    auto = 'outcome="ok",verb="auto_rollback"'
    assert dep.metric("lensbus_deployer_project_changes_total", auto) == 1
    assert dep.metric("lensbus_messages_rejected_total", 'reason="key_mismatch"') == 1


# ---- init, run, watch ------------------------------------------------------------------------


def lines_of(stream: Any) -> queue.Queue[str]:
    """The lines a child writes, as they come (a thread reads them)."""
    out: queue.Queue[str] = queue.Queue()

    def read() -> None:
        with contextlib.suppress(ValueError, OSError):  # closed at the end of the test
            for line in stream:
                out.put(line)

    threading.Thread(target=read, daemon=True).start()
    return out


def popen(*args: str, url: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LENSBUS_")}
    env["LENSBUS_NATS_URL"] = url
    return subprocess.Popen(
        [sys.executable, "-m", "lensbus.cli.main", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def person(seq: int) -> Result:
    now = time.time_ns()
    box = Box.from_normalized(0.1, 0.2, 0.3, 0.6, 640, 480)
    return Result(
        camera="cam1",
        seq=seq,
        capture_ns=now,
        result_ns=now,
        width=640,
        height=480,
        model=ModelRef(name="m", version="1"),
        task="detection",
        detections=[Detection(label="person", class_id=0, score=0.9, box=box)],
    )


async def test_init_then_run_and_watch_against_a_live_bus(
    fresh_nats: NatsServer, tmp_path: Path
) -> None:
    """``lensbus project init`` writes a project that runs at once: ``lensbus project run``
    hosts it against the bus, and ``lensbus project watch`` shows its counts."""
    url = fresh_nats.url
    r = lensbus("project", "init", "hello", str(tmp_path / "hello"), url=url)
    assert r.returncode == 0 and "wrote project hello" in r.stdout, r.stderr
    r = lensbus("project", "init", "hello", str(tmp_path / "hello"), url=url)
    assert r.returncode == 1 and "not an empty folder" in r.stderr
    bad = make_project(tmp_path / "bad", "bad", settings={"label": 3})
    r = lensbus("project", "run", str(bad), "--camera", "cam1", url=url)
    assert r.returncode == 1 and "invalid project: project.json: settings.label" in r.stderr

    run = popen("project", "run", str(tmp_path / "hello"), "--camera", "cam1", url=url)
    watch = popen("project", "watch", "hello", "--topic", "count", "--count", "1", url=url)
    try:
        ran, watched = lines_of(run.stdout), lines_of(watch.stdout)
        logs = lines_of(run.stderr), lines_of(watch.stderr)
        nc = await nats_py.connect(url)
        subject = Subjects().results("cam1")
        seen: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        seq = 0
        # A result every 0.2 s until both the run and the watch (each subscribing when it
        # is ready) have shown a count.
        want = {"run", "watch", "overlay", "event"}
        while time.monotonic() < deadline and set(seen) != want:
            seq += 1
            await nc.publish(subject, encode(person(seq)))
            await asyncio.sleep(0.2)
            while not ran.empty():
                line = json.loads(ran.get())
                kind = "run" if line.get("topic") == "count" else next(iter(line))
                seen.setdefault(kind, line)
            if not watched.empty():
                seen["watch"] = json.loads(watched.get())
        await nc.close()
        assert want <= set(seen), (seen, [list(q.queue) for q in logs])
        (shape,) = seen["overlay"]["shapes"]
        assert shape["shape"] == "box" and shape["text"] == "person 0.90"
        assert seen["event"]["event"] == "person" and seen["event"]["detail"] == {
            "first_seen": True
        }
        assert seen["run"]["payload"]["label"] == "person"
        assert seen["run"]["camera"] == "cam1"
        line = seen["watch"]
        assert (line["project"], line["camera"], line["topic"]) == ("hello", "cam1", "count")
        assert line["payload"]["label"] == "person" and line["seq"] > 0
        assert watch.wait(timeout=30) == 0  # --count 1 reached
    finally:
        for proc in (run, watch):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        assert run.wait(timeout=30) in (0, 130, -signal.SIGINT)
        watch.kill()
        watch.wait(timeout=10)
        for proc in (run, watch):
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
