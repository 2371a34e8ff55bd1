"""lensbus on a 3-node NATS cluster with JetStream replicated (R3): real nats-servers
(``lensbus.natscluster.NatsCluster``), real service processes, a real model.

- A resource made at R1 is raised to R3 in place (``lensbus.jetstream``), its data kept, by
  the helper and by a deployer restarted with ``jetstream_replicas=3``.
- While frames flow and results are stored, one node is SIGKILLed and restarted: no result
  the inference instances published is missing from the results stream, the deployer keeps
  answering, the services that were connected to the dead node are connected to another
  within 5 s, and a deploy made while the node is down reaches the inference instances on
  every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import nats as nats_py
import pytest
from nats.js import api
from test_swap import YOLO, version_of

from lensbus import DecodeError, Subjects, decode
from lensbus.bus import connect_options
from lensbus.deployclient import DeployClient, DeployError
from lensbus.jetstream import ensure_key_value, ensure_object_store, ensure_stream
from lensbus.jsperms import JS_API, kv_stream, obj_stream
from lensbus.natscluster import NatsCluster
from lensbus.schemas import Result, Status
from lensbus.settings import ServiceSettings

ROOT = Path(__file__).resolve().parent.parent
LENSBUS = [sys.executable, "-m", "lensbus.cli.main"]
S = Subjects()
GROUP, CAMERA = "clustergroup", "clustercam"
STORE_METRIC = "lensbus_results_store_total"
KILLED = 1  # the node SIGKILLed: the deployer and inference instance A are connected to it
RECONNECT_S = 5.0
INSTANCES = {"infa": KILLED, "infb": 3}  # inference instance -> the node it connects to


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    c = NatsCluster(tmp_path / "cluster", 3).start()
    yield c
    c.stop()


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def preferred(cluster: NatsCluster, node: int) -> str:
    """A service's ``nats_url`` that puts it on ``node``. With ``dont_randomize`` in
    ``lensbus.bus.connect_options`` a list with that node first does; without it nats-py
    shuffles a list, so the one URL: nats-py adds the servers the cluster announces
    (INFO ``connect_urls``) and reconnects to them."""
    if connect_options(ServiceSettings()).get("dont_randomize"):
        return cluster.urls_from(node)
    return cluster.url(node)


# ---- R1 -> R3 in place ---------------------------------------------------------------------


async def test_resources_raised_from_r1_to_r3_in_place(cluster: NatsCluster) -> None:
    nc = await nats_py.connect(cluster.url_list)
    js = nc.jetstream(timeout=10)
    try:
        stream = api.StreamConfig(name="UPR", subjects=["upr.>"], max_age=600.0)
        await ensure_stream(js, stream, replicas=1)
        kv = await ensure_key_value(js, api.KeyValueConfig(bucket="upkv"), replicas=1)
        obs = await ensure_object_store(js, "upobj", api.ObjectStoreConfig(), replicas=1)
        await js.publish("upr.a", b"one")
        await kv.put("k", b"v")
        await obs.put("o", b"x" * 300_000)
        for name in ("UPR", "KV_upkv", "OBJ_upobj"):
            assert (await js.stream_info(name)).config.num_replicas == 1

        await ensure_stream(js, stream, replicas=3)
        kv = await ensure_key_value(js, api.KeyValueConfig(bucket="upkv"), replicas=3)
        obs = await ensure_object_store(js, "upobj", api.ObjectStoreConfig(), replicas=3)
        for name in ("UPR", "KV_upkv", "OBJ_upobj"):
            await until_replicated(js, name, 3)
        assert (await js.stream_info("UPR")).state.messages == 1
        assert (await kv.get("k")).value == b"v"
        assert (await obs.get("o")).data == b"x" * 300_000
    finally:
        await nc.close()


async def until_replicated(js: Any, stream: str, replicas: int, timeout: float = 30) -> None:
    """Until ``stream`` has ``replicas`` copies, every follower current."""
    deadline = time.monotonic() + timeout
    while True:
        info = await js.stream_info(stream)
        peers = (info.cluster.replicas or []) if info.cluster else []
        if (
            info.config.num_replicas == replicas
            and info.cluster
            and info.cluster.leader
            and len(peers) == replicas - 1
            and all(p.current and not p.offline for p in peers)
        ):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{stream} not at R{replicas} with current peers: {info.cluster}")
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_deployer_restarted_with_three_replicas_raises_its_buckets(
    cluster: NatsCluster, start_service, tmp_path: Path
) -> None:
    work = tmp_path / "dep"
    dep = start_service("deployer", cluster.urls, work_dir=work)
    dep.wait_healthy(30)
    nc = await nats_py.connect(cluster.url_list)
    js = nc.jetstream(timeout=10)
    try:
        streams = [
            obj_stream(S.models_bucket),
            kv_stream(S.deployments_bucket),
            obj_stream(S.projects_bucket),
        ]
        for name in streams:
            assert (await js.stream_info(name)).config.num_replicas == 1
        assert dep.stop() == 0
        dep = start_service("deployer", cluster.urls, work_dir=work, jetstream_replicas=3)
        dep.wait_healthy(30)
        for name in streams:
            await until_replicated(js, name, 3)
        assert "num_replicas 1 -> 3" in dep.log
    finally:
        await nc.close()


# ---- a node killed under load ----------------------------------------------------------------


class Seen:
    """Results of the camera and inference heartbeats, as a subscriber on a surviving node
    sees them."""

    def __init__(self) -> None:
        self.results: list[Result] = []
        self.arrived = 0.0
        self.status: dict[str, Status] = {}

    async def start(self, url: str) -> Seen:
        self.nc = await nats_py.connect(url)

        async def on_result(msg: Any) -> None:
            self.results.append(decode(msg.data, Result))
            self.arrived = time.monotonic()

        async def on_status(msg: Any) -> None:
            with contextlib.suppress(DecodeError):
                st = decode(msg.data, Status)
                self.status[st.instance] = st

        await self.nc.subscribe(S.results(CAMERA), cb=on_result)
        for instance in INSTANCES:
            await self.nc.subscribe(S.status("inference", instance), cb=on_status)
        await self.nc.flush()
        return self

    def serving(self, instance: str) -> str | None:
        st = self.status.get(instance)
        return st.model.version if st and st.model else None

    def results_of(self, instance: str, version: str, since: float = 0) -> int:
        return sum(
            r.instance == instance and r.model.version == version and r.result_ns >= since
            for r in self.results
        )


async def stored_seqs(js: Any, camera: str) -> list[int]:
    """The seq of every result of ``camera`` in the results stream (read message by message:
    no consumer to place on the cluster)."""
    seqs: list[int] = []
    at = 1
    while True:
        try:
            msg = await js.get_msg(S.results_stream, seq=at, next=True, subject=S.results(camera))
        except nats_py.js.errors.NotFoundError:
            return seqs
        seqs.append(decode(msg.data, Result).seq)
        at = msg.seq + 1


async def retried(call: Callable[[], Any], timeout: float, what: str) -> float:
    """Call until it succeeds (a deployer reconnecting, a JetStream leader being elected);
    the seconds it took."""
    t0 = time.monotonic()
    while True:
        try:
            await call()
            return time.monotonic() - t0
        except (DeployError, nats_py.errors.Error, TimeoutError) as exc:
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"{what}: still failing after {timeout} s: {exc}") from exc
            await asyncio.sleep(0.2)


async def add_camera(url: str) -> None:
    proc = subprocess.run(
        [
            *LENSBUS,
            "cameras",
            "add",
            CAMERA,
            "test",
            "--fps",
            "4",
            "--width",
            "320",
            "--height",
            "240",
            "--node",
            "cnode",
            "--replicas",
            "3",
            "--nats-url",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("LENSBUS_")},
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr


async def move_leader_to(nc: Any, stream: str, node: str) -> None:
    """Ask the stream's leader to step down until ``node`` leads it (each step down elects
    one of the other replicas)."""
    deadline = time.monotonic() + 60
    while True:
        info = await nc.jetstream().stream_info(stream)
        leader = info.cluster.leader if info.cluster else None
        if leader == node:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{stream}'s leader still {leader}, not {node}")
        if leader:
            with contextlib.suppress(nats_py.errors.Error):
                await nc.request(f"{JS_API}.STREAM.LEADER.STEPDOWN.{stream}", b"", timeout=5)
        await asyncio.sleep(0.2)


async def reconnect_times(cluster: NatsCluster, names: list[str], since: float) -> dict[str, float]:
    """Seconds from ``since`` until each client named is connected to a surviving node
    (the nodes' own connection lists); fails past RECONNECT_S."""
    times: dict[str, float] = {}
    while len(times) < len(names):
        now = time.monotonic() - since
        for name in names:
            if name not in times and await asyncio.to_thread(cluster.node_of, name):
                times[name] = time.monotonic() - since
        if now > RECONNECT_S:
            late = [n for n in names if n not in times]
            raise AssertionError(f"not reconnected within {RECONNECT_S} s: {late}")
        await asyncio.sleep(0.05)
    return times


@pytest.fixture
async def seen(cluster: NatsCluster) -> AsyncIterator[Seen]:
    s = await Seen().start(cluster.url(2))
    yield s
    await s.nc.close()


@pytest.mark.slow
async def test_node_killed_under_load_loses_no_result(
    cluster: NatsCluster, start_service, demo_models, seen: Seen, tmp_path: Path
) -> None:
    v1 = version_of(demo_models[YOLO], tmp_path / "v1", "c-1")
    v2 = version_of(demo_models[YOLO], tmp_path / "v2", "c-2")
    r3 = {"jetstream_replicas": 3}
    dep = start_service(
        "deployer", preferred(cluster, KILLED), instance="dep1", work_dir=tmp_path / "d", **r3
    )
    pub = start_service("publisher", preferred(cluster, 2), instance="pub1", **r3)
    dep.wait_healthy(30)
    pub.wait_healthy(30)
    client = await DeployClient.connect(cluster.url(3), timeout_s=20)
    nc = await nats_py.connect(cluster.url(3))
    js = nc.jetstream(timeout=10)
    try:
        for pkg in (v1, v2):
            await client.upload(pkg)
        await client.activate(GROUP, YOLO, "c-1")
        infs = INSTANCES
        procs = {}
        for instance, node in infs.items():
            procs[instance] = start_service(
                "inference",
                preferred(cluster, node),
                group=GROUP,
                cameras=CAMERA,
                instance=instance,
                model_cache=tmp_path / f"cache-{instance}",
                results_acked=True,
            )
        await until(
            lambda: all(seen.serving(i) == "c-1" for i in infs), 90, "both instances on c-1"
        )
        await add_camera(cluster.url(2))
        cap = start_service(
            "capture", preferred(cluster, 2), instance="cap1", cameras_from="bucket", node="cnode"
        )
        await until(
            lambda: all(seen.results_of(i, "c-1") >= 3 for i in infs), 60, "results from both"
        )

        # Every resource at R3.
        for name in (
            S.results_stream,
            kv_stream(S.deployments_bucket),
            kv_stream(S.cameras_bucket),
            obj_stream(S.models_bucket),
            obj_stream(S.projects_bucket),
            obj_stream(S.snapshots_bucket),
        ):
            assert (await js.stream_info(name)).config.num_replicas == 3, name
        # The worst case: the node killed leads the results stream. A plain publish arriving
        # while a new leader is elected (~5 s) would not be stored; inference publishes with
        # results_acked, so each result is retried until the stream stores it (once: its
        # Nats-Msg-Id).
        await move_leader_to(nc, S.results_stream, f"n{KILLED}")
        on_killed = [n for n in cluster.connections(KILLED) if n]
        assert {"deployer.dep1", "inference.infa"} <= set(on_killed), on_killed

        cluster.kill(KILLED)
        killed_at = time.monotonic()
        moved = await reconnect_times(cluster, on_killed, killed_at)
        answered_s = await retried(client.list, 30, "deployer list while the node is down")
        deploy_s = await retried(
            lambda: client.activate(GROUP, YOLO, "c-2"), 30, "deploy while the node is down"
        )
        deployed_ns = time.time_ns()
        await until(  # each instance fetches the model from the store and swaps: slow on a busy box
            lambda: all(seen.results_of(i, "c-2", deployed_ns) >= 2 for i in infs),
            120,
            "results of c-2 from both instances",
        )
        assert not cluster.running(KILLED)  # all of it happened while the node was down
        down_s = time.monotonic() - killed_at

        await asyncio.to_thread(cluster.restart, KILLED)
        await until_replicated(js, S.results_stream, 3)
        after = time.time_ns()
        await until(lambda: any(r.result_ns > after for r in seen.results), 30, "results go on")

        # Stop the flow; every result seen must be in the stream.
        assert cap.stop() == 0
        await until(lambda: time.monotonic() - seen.arrived > 2.0, 30, "the last results")
        published = [r.seq for r in seen.results]
        stored = await stored_seqs(js, CAMERA)
        missing = sorted(set(published) - set(stored))
        assert not missing, f"{len(missing)} of {len(published)} not stored: {missing[:20]}"
        assert len(stored) == len(set(stored)), "a result stored twice"
        # And against what the instances say they published: every one stored, none given
        # up (a result that reached no surviving node would be missing on both sides above).
        lost = ("gave_up", "no_stream", "backlog")
        for name, proc in procs.items():
            for what in lost:
                assert proc.metric(STORE_METRIC, f'outcome="{what}"') == 0, (name, what)

        published_metric = "lensbus_inference_results_published_total"
        total = sum(p.metric(published_metric) for p in procs.values())
        deadline = time.monotonic() + 40  # a retry still due lands within its 30 s
        while len(stored) < total and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            stored = await stored_seqs(js, CAMERA)
        assert len(stored) == total, (len(stored), total)
        print(
            f"cluster: {len(published)} results, all stored; reconnects after the kill "
            + ", ".join(f"{n} {t:.2f}s" for n, t in moved.items())
            + f"; deployer answered after {answered_s:.2f}s, deploy took {deploy_s:.2f}s; "
            f"node down {down_s:.1f}s"
        )
        assert dep.stop() == 0 and pub.stop() == 0
    finally:
        await client.close()
        await nc.close()


# ---- the developers' command ---------------------------------------------------------------


async def test_dev_command_runs_a_cluster_until_ctrl_c(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lensbus.natscluster", "--size", "3", "--dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        out = [await asyncio.to_thread(proc.stdout.readline) for _ in range(2)]
        urls = out[1].strip()
        assert out[0].startswith("NATS cluster of 3") and urls.count("nats://") == 3, out
        nc = await nats_py.connect(urls.split(","))
        js = nc.jetstream(timeout=10)
        info = await ensure_stream(js, api.StreamConfig(name="DEV", subjects=["dev"]), replicas=3)
        assert info.config.num_replicas == 3
        await nc.close()
        rest = await asyncio.to_thread(proc.stdout.readline)
        while "Ctrl-C" not in rest:
            assert (
                "JETSTREAM_REPLICAS=3" in rest or "NATS_URL" in rest or rest.startswith("Point")
            ), rest
            rest = await asyncio.to_thread(proc.stdout.readline)
        proc.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(proc.wait, 20) == 0
        logs = [tmp_path / f"n{n}.log" for n in (1, 2, 3)]
        assert all(p.exists() for p in logs)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
