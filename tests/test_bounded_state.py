"""Issue 13, finding 6: state that bad input could grow without bound is bounded.

Archives with a huge member count are refused from their headers (nothing unpacked); the
deployer refuses them at upload, quickly. A deployer killed mid-upload leaves nothing once
restarted: no ``.part`` file, no chunks of an object whose meta was never written.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import nats as nats_py
import pytest
from nats.nuid import NUID
from photos import photos

from lensbus import decode, encode
from lensbus.deployclient import DeployClient, DeployError
from lensbus.modelpkg import MANIFEST, MAX_MEMBERS, PackageError, extract_archive
from lensbus.natsserver import NatsServer
from lensbus.schemas import FrameEnvelope, Reply
from lensbus.schemas.deploy import UploadBegin, UploadChunk, UploadStarted
from lensbus.subjects import MODELS_BUCKET, Subjects

MANY = 100_000
LEFTOVER_BYTES = "lensbus_deployer_leftover_bytes_removed_total"


async def wait_for(check: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``check`` (sync or async) until it is true: tests wait for the event."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: last {last!r}")


def many_members(dest: Path, count: int = MANY) -> Path:
    """A .tar.gz of ``count`` empty files plus a model.json: small, but 100,000 entries."""
    with tarfile.open(dest, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo(MANIFEST)
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
        for i in range(count):
            tar.addfile(tarfile.TarInfo(f"f/{i}"))
    return dest


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return many_members(tmp_path_factory.mktemp("swarm") / "swarm.tar.gz")


def test_member_count_limit_is_checked_before_unpacking(tmp_path: Path, swarm: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    t0 = time.perf_counter()
    with pytest.raises(PackageError, match=f"more than {MAX_MEMBERS} members"):
        extract_archive(swarm, work)
    took = time.perf_counter() - t0
    assert list(work.iterdir()) == [], "members were unpacked before the archive was refused"
    assert took < 2.0, f"refusing took {took:.2f} s: the whole index was read"


def test_archive_at_the_member_limit_is_fine(tmp_path: Path) -> None:
    archive = many_members(tmp_path / "ok.tar.gz", MAX_MEMBERS - 1)
    work = tmp_path / "w"
    work.mkdir()
    assert extract_archive(archive, work) == work  # a count under the limit unpacks
    assert (work / "f" / "0").exists()


async def test_deployer_refuses_a_swarm_at_upload(
    fresh_nats: NatsServer, start_service, tmp_path: Path, swarm: Path
) -> None:
    dep = start_service("deployer", fresh_nats.url, work_dir=tmp_path / "work")
    dep.wait_healthy()
    async with await DeployClient.connect(fresh_nats.url, timeout_s=30.0) as dc:
        t0 = time.perf_counter()
        with pytest.raises(DeployError) as exc:
            await dc.upload(swarm)
        took = time.perf_counter() - t0
        assert exc.value.code == "invalid_package"
        assert f"more than {MAX_MEMBERS} members" in exc.value.message
        assert await dc.list() == []
    print(f"deployer refused a {MANY}-member archive in {took:.2f} s")
    assert took < 5.0, f"{took:.2f} s"
    assert list((tmp_path / "work" / "unpack").iterdir()) == []


# ---- deployer: a killed upload leaves nothing behind -----------------------------------------


async def _start_upload(url: str, data: bytes) -> str:
    """Begin an upload and send its first chunk, as the CLI does; the rest never comes."""
    subjects = Subjects()
    nc = await nats_py.connect(url)
    try:
        begin = UploadBegin(size=len(data), sha256=hashlib.sha256(data).hexdigest())
        msg = await nc.request(subjects.deployer_api("upload_begin"), encode(begin), timeout=10)
        started = decode(msg.data, UploadStarted)
        assert started.ok, started.error
        chunk = UploadChunk(upload_id=started.upload_id, offset=0, data=data[: len(data) // 2])
        msg = await nc.request(subjects.deployer_api("upload_chunk"), encode(chunk), timeout=10)
        assert decode(msg.data, Reply).ok
        return started.upload_id
    finally:
        await nc.close()


async def _orphan_chunks(url: str, count: int, size: int) -> str:
    """What a deployer killed inside an object put leaves: chunks, no meta. A complete object
    beside them must survive the purge."""
    nc = await nats_py.connect(url)
    try:
        js = nc.jetstream()
        obs = await js.object_store(MODELS_BUCKET)
        await obs.put("keep/1", os.urandom(size))
        nuid = NUID().next().decode()
        for _ in range(count):
            await js.publish(f"$O.{MODELS_BUCKET}.C.{nuid}", os.urandom(size))
        return nuid
    finally:
        await nc.close()


async def _chunk_subjects(url: str) -> set[str]:
    nc = await nats_py.connect(url)
    try:
        info = await nc.jetstream().stream_info(
            f"OBJ_{MODELS_BUCKET}", subjects_filter=f"$O.{MODELS_BUCKET}.C.>"
        )
        return set(info.state.subjects or {})
    finally:
        await nc.close()


async def test_killed_upload_leaves_no_part_file_nor_orphan_chunks(
    fresh_nats: NatsServer, start_service, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    first = start_service("deployer", fresh_nats.url, work_dir=work)
    first.wait_healthy()
    await _start_upload(fresh_nats.url, os.urandom(300_000))
    parts = list((work / "uploads").iterdir())
    assert len(parts) == 1 and parts[0].stat().st_size == 150_000
    nuid = await _orphan_chunks(fresh_nats.url, count=4, size=100_000)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    assert parts[0].exists() and f"$O.{MODELS_BUCKET}.C.{nuid}" in await _chunk_subjects(
        fresh_nats.url
    )

    second = start_service("deployer", fresh_nats.url, work_dir=work, orphan_grace_s=0.2)
    second.wait_healthy()
    assert list((work / "uploads").iterdir()) == [], "the killed upload's .part is still there"
    freed = 'kind="orphan_chunks"'
    await wait_for(lambda: second.metric(LEFTOVER_BYTES, freed) > 0, 15, "the orphan purge")
    left = await _chunk_subjects(fresh_nats.url)
    assert f"$O.{MODELS_BUCKET}.C.{nuid}" not in left and len(left) == 1, left
    assert second.metric(LEFTOVER_BYTES, 'kind="upload_file"') == 150_000
    assert second.metric(LEFTOVER_BYTES, freed) >= 400_000
    assert "freed" in second.log and "146.5 KiB" in second.log, second.log
    assert second.stop() == 0


# ---- inference: a package that fails leaves no folder in the model cache -----------------


async def test_failed_package_leaves_no_folder_and_stale_ones_go_at_start(
    fresh_nats: NatsServer, start_service, demo_models, tmp_path: Path
) -> None:
    from test_swap import YOLO, Watch, version_of

    cache = tmp_path / "cache"
    stale = cache / YOLO
    dead = subprocess.Popen(["true"])
    dead.wait()
    (stale / f"old.unpacking-{dead.pid}").mkdir(parents=True)  # a killed instance's unpack
    (stale / f"old.unpacking-{dead.pid}" / "w.bin").write_bytes(bytes(50_000))
    (stale / "older.d").mkdir()  # what a failed load used to leave
    (stale / "older.d" / "w.bin").write_bytes(bytes(50_000))
    (stale / f"old.tar.gz.part-{dead.pid}").write_bytes(bytes(1000))  # a killed download
    good = version_of(demo_models[YOLO], tmp_path / "good", "good-c")
    bad = version_of(demo_models[YOLO], tmp_path / "bad", "bad-c", "corrupt")
    dep = start_service("deployer", fresh_nats.url, work_dir=tmp_path / "deployer")
    dep.wait_healthy(30)
    w = await Watch().start(fresh_nats.url, "cc")
    try:
        async with await DeployClient.connect(fresh_nats.url, timeout_s=30.0) as dc:
            await dc.upload(good)
            await dc.upload(bad)  # a valid package: it fails only when loaded
            await dc.activate("cg", YOLO, "good-c")
            inf = start_service(
                "inference",
                fresh_nats.url,
                group="cg",
                cameras="cc",
                instance="ci",
                model_cache=cache,
            )
            await w.until(lambda: w.serving("ci") == f"{YOLO}:good-c", 60, "good model serving")
            assert sorted(p.name for p in stale.iterdir()) == ["good-c.d", "good-c.tar.gz"]
            freed = inf.metric("lensbus_inference_cache_bytes_removed_total", 'kind="stale"')
            assert freed == 101_000, freed
            await dc.activate("cg", YOLO, "bad-c")
            await w.until(lambda: "bad-c" in w.last_failure("ci"), 30, "the swap to fail")
        left = sorted(p.name for p in stale.iterdir() if p.is_dir())
        assert left == ["good-c.d"], f"the failed package left {left}"
        assert inf.metric("lensbus_inference_cache_bytes_removed_total", 'kind="failed"') > 0
        assert inf.stop() == 0 and dep.stop() == 0
    finally:
        await w.nc.close()


# ---- publisher: fake camera ids cannot fill the camera table ---------------------------------


async def _fake_frames(url: str, cameras: list[str], jpeg: bytes) -> None:
    """One frame on each of ``cameras``: ids no capture runs (what an attacker sends)."""
    subjects = Subjects()
    nc = await nats_py.connect(url)
    try:
        for cam in cameras:
            env = FrameEnvelope(
                camera=cam, seq=1, capture_ns=time.time_ns(), width=768, height=576, data=jpeg
            )
            await nc.publish(subjects.frames(cam), encode(env))
        await nc.flush()
    finally:
        await nc.close()


async def test_fake_cameras_are_evicted_then_forgotten(
    nats: NatsServer, start_service, tmp_path: Path
) -> None:
    jpeg = (photos(tmp_path, "dog.jpg") / "dog.jpg").read_bytes()
    pub = start_service("publisher", nats.url, max_cameras=4, camera_forget_s=3.0)
    pub.wait_healthy(30)
    base = f"http://127.0.0.1:{pub.port}"
    fakes = [f"fake-{i}" for i in range(6)]
    async with aiohttp.ClientSession() as http:

        async def listed() -> set[str]:
            async with http.get(f"{base}/api/cameras") as resp:
                return {c["id"] for c in (await resp.json())["cameras"]}

        await _fake_frames(nats.url, fakes, jpeg)
        await wait_for(
            lambda: (
                pub.metric("lensbus_publisher_cameras_forgotten_total", 'reason="evicted"') >= 2
            ),
            10,
            "fakes over the table's size evicting the longest silent",
        )
        assert len(await listed()) == 4
        cap = start_service(
            "capture", nats.url, camera="real-cam", source="test", fps=5, width=320, height=240
        )
        await wait_for(lambda: _has(listed(), "real-cam"), 30, "the real camera served")
        await wait_for(lambda: _only(listed(), {"real-cam"}), 30, "the silent fakes forgotten")
        assert pub.metric("lensbus_publisher_cameras_forgotten_total", 'reason="silent"') >= 3
        # A forgotten camera comes back when its frames come back.
        await _fake_frames(nats.url, ["fake-0"], jpeg)
        await wait_for(lambda: _has(listed(), "fake-0"), 10, "fake-0 back")
        cap.stop()
    assert pub.stop() == 0


async def _has(names: object, name: str) -> bool:
    return name in await names  # type: ignore[misc]


async def _only(names: object, want: set[str]) -> bool:
    return await names == want  # type: ignore[misc]
