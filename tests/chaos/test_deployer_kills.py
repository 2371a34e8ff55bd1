"""The deployer SIGKILLed mid-upload, mid-commit (its put into the object store in flight)
and mid-deploy (an activate in flight): after a restart no partial model is listed, no
``.part`` file or orphan chunk is left, and the group's deployment converges."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import nats as nats_py
import pytest
from chaos_kit import YOLO, Services, healthy, record, until
from test_swap import version_of

from lensbus.deployclient import DeployClient
from lensbus.natsserver import NatsServer
from lensbus.processes import ServiceProcess
from lensbus.subjects import MODELS_BUCKET

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

MODELS_STREAM = f"OBJ_{MODELS_BUCKET}"
ORPHAN_GRACE_S = 3.0
CLEAN_BOUND_S = 20.0  # start-up clean-up of what a killed deployer left


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    s = NatsServer(tmp_path / "nats", log_file=tmp_path / "nats.log").start()
    yield s
    s.kill()


class Deployer:
    def __init__(self, services: Services, server: NatsServer, tmp: Path) -> None:
        self.work = tmp / "deployer"
        # Chunks of a put younger than orphan_grace_s are kept (another deployer may be
        # mid-put); a short grace lets the test see the purge within its bound.
        self.sp: ServiceProcess = services.start(
            "deployer", server.url, work_dir=self.work, orphan_grace_s=ORPHAN_GRACE_S
        )
        self.url = server.url

    def part_files(self) -> list[str]:
        folder = self.work / "uploads"
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    async def chunks(self) -> tuple[int, int]:
        """(chunk messages in the models stream, chunk subjects no object refers to)."""
        nc = await nats_py.connect(self.url)
        try:
            js = nc.jetstream()
            try:
                info = await js.stream_info(
                    MODELS_STREAM, subjects_filter=f"$O.{MODELS_BUCKET}.C.>"
                )
            except Exception:  # the bucket is not there yet
                return 0, 0
            subjects = info.state.subjects or {}
            obs = await js.object_store(MODELS_BUCKET)
            try:
                live = {o.nuid for o in await obs.list(ignore_deletes=True)}
            except Exception:  # no object at all
                live = set()
            orphans = sum(1 for s in subjects if s.rsplit(".", 1)[-1] not in live)
            return sum(subjects.values()), orphans
        finally:
            await nc.close()

    async def leftovers(self) -> tuple[list[str], int]:
        return self.part_files(), (await self.chunks())[1]

    async def clean(self) -> bool:
        parts, orphans = await self.leftovers()
        return not parts and orphans == 0


async def restart_and_check(dep: Deployer, fault: str, killed: float) -> None:
    dep.sp.start()
    healthy(dep.sp)
    back = time.monotonic() - killed
    async with await DeployClient.connect(dep.url, timeout_s=30) as client:
        listed = [f"{m.name}:{m.version}" for m in await client.list()]
    try:
        clean = await until(dep.clean, CLEAN_BOUND_S, "no .part file and no orphan chunk")
    except AssertionError:
        parts, orphans = await dep.leftovers()
        record(fault, healthy_after_s=round(back, 2), part_files=parts, orphan_chunks=orphans)
        raise AssertionError(
            f"leftovers: .part files {parts}, {orphans} orphan chunk subjects"
        ) from None
    record(fault, healthy_after_s=round(back, 2), clean_after_s=round(clean, 2), listed=listed)
    assert listed == [], f"a partial model is listed: {listed}"


async def kill_during_upload(
    dep: Deployer, package: Path, under_way: Callable[[], object], what: str
) -> float:
    """Upload ``package`` and SIGKILL the deployer once ``under_way()``: when it was killed."""
    client = await DeployClient.connect(dep.url, timeout_s=30)
    upload = asyncio.ensure_future(client.upload(package))
    try:
        await until(under_way, 120, what)
        dep.sp.kill()
        return time.monotonic()
    finally:
        upload.cancel()
        with contextlib.suppress(BaseException):
            await upload
        await client.close()


async def test_deployer_sigkill_mid_upload(
    server: NatsServer, services: Services, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    dep = Deployer(services, server, tmp_path)
    healthy(dep.sp)

    # Some chunks are in the deployer's .part file: the upload is under way.
    def receiving() -> bool:
        folder = dep.work / "uploads"
        return any(p.stat().st_size > 0 for p in folder.glob("*")) if folder.is_dir() else False

    killed = await kill_during_upload(dep, demo_models[YOLO], receiving, "an upload under way")
    assert dep.part_files(), "the kill came after the upload"
    await restart_and_check(dep, "deployer SIGKILL mid-upload", killed)


async def test_deployer_sigkill_mid_commit(
    server: NatsServer, services: Services, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    dep = Deployer(services, server, tmp_path)
    healthy(dep.sp)

    # The commit's put is in flight: chunks are stored, the object's meta is not.
    async def putting() -> bool:
        return (await dep.chunks())[0] > 0

    killed = await kill_during_upload(dep, demo_models[YOLO], putting, "the commit's put")
    _, orphans = await dep.chunks()
    assert orphans > 0, "the kill came after the put completed"
    await restart_and_check(dep, "deployer SIGKILL mid-commit", killed)


async def test_deployer_sigkill_mid_deploy(
    server: NatsServer, services: Services, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    v1 = version_of(demo_models[YOLO], tmp_path / "v1", "chaos-1")
    v2 = version_of(demo_models[YOLO], tmp_path / "v2", "chaos-2")
    dep = Deployer(services, server, tmp_path)
    healthy(dep.sp)
    async with await DeployClient.connect(server.url, timeout_s=60) as client:
        for pkg in (v1, v2):
            await client.upload(pkg)
        await client.activate("chaosgroup", YOLO, "chaos-1")
        inf = services.start(
            "inference",
            server.url,
            group="chaosgroup",
            cameras="none",
            instance="chaos-follower",
            model_cache=tmp_path / "cache",
        )
        healthy(inf)
        activate = asyncio.ensure_future(client.activate("chaosgroup", YOLO, "chaos-2"))
        await asyncio.sleep(0)  # the request is on its way
        dep.sp.kill()
        killed = time.monotonic()
        with contextlib.suppress(BaseException):
            await activate
    dep.sp.start()
    healthy(dep.sp)
    async with await DeployClient.connect(server.url, timeout_s=30) as client:

        async def converged() -> bool:
            (group,) = await client.status("chaosgroup")
            want = group.deployment.model if group.deployment else None
            serving = [i.serving for i in group.instances if i.instance == "chaos-follower"]
            return want is not None and serving == [want]

        took = await until(converged, 90, "the follower serving the group's desired model")
        (group,) = await client.status("chaosgroup")
        listed = sorted(f"{m.name}:{m.version}" for m in await client.list())
    assert group.deployment is not None
    record(
        "deployer SIGKILL mid-deploy",
        converged_after_s=round(time.monotonic() - killed, 2),
        converge_wait_s=round(took, 2),
        desired=f"{group.deployment.model.name}:{group.deployment.model.version}",
        state=group.deployment.state,
        swaps_failed=inf.metric("lensbus_inference_swaps_total", 'outcome="failed"'),
    )
    assert listed == [f"{YOLO}:chaos-1", f"{YOLO}:chaos-2"]
    assert group.deployment.state == "active", group.deployment
    assert group.deployment.model.version in ("chaos-1", "chaos-2")
    assert await dep.clean()
