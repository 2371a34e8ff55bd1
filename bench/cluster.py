"""Cluster benchmark (run by hand, not a test): what a 3-node NATS cluster with JetStream
replicated (R3) costs against one server, side by side in one run, on this machine.

Everything is real nats-servers (``lensbus.natsserver``, ``lensbus.natscluster``) on
loopback; no lensbus service runs (a full pipeline would measure the model, not NATS).
Prints:

- result latency, for a results-sized message (a real encoded ``Result``, 8 detections) at a
  camera's pace: published on node 1 -> received by a subscriber on node 2 (what a program
  sees), and published -> stored (a JetStream publish's ack: the results stream holds it, on
  a quorum of its replicas at R3), p50 / p99;
- store write latency of a 30 MB model (object store put, the deployer's 512 KiB chunks) at
  R1 on one server, R1 and R3 on the cluster, median of a few;
- what a node's death costs the results stream: plain publishes arriving while the stream
  elects a new leader are not stored; with ``results_acked`` (``lensbus.stored``: each
  acknowledged, retried with its Nats-Msg-Id) none is lost. The stream's leader is SIGKILLed
  (a crash) with plain and with acked publishes, then stopped (SIGTERM: it hands its
  leadership over) with plain ones: results lost, stored twice, and the longest gap.

    python bench/cluster.py                   # 600 results at 30/s, 5 puts of 30 MB
    python bench/cluster.py --results 1500 --fps 60 --puts 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import nats as nats_py
from nats.aio.client import Client
from nats.js import api

from lensbus import Subjects, encode
from lensbus.jetstream import ensure_object_store, ensure_stream
from lensbus.natscluster import NatsCluster
from lensbus.natsserver import NatsServer
from lensbus.schemas import ModelRef, Result
from lensbus.schemas.result import Box, Detection
from lensbus.stored import StoredPublisher, result_msg_id

CAMERA = "bench"
MODEL_BYTES = 30 * 1024 * 1024
CHUNK = 512 * 1024  # the deployer's store_chunk_bytes default
S = Subjects()


async def _quiet(exc: Exception) -> None:
    """Connections to a node this bench kills: its errors are expected, not printed."""


async def connect(url: str | list[str]) -> Client:
    return await nats_py.connect(url, error_cb=_quiet)


def result(seq: int) -> bytes:
    now = time.time_ns()
    boxes = [Box.from_normalized(0.1 * i, 0.1, 0.1 * i + 0.08, 0.3, 1920, 1080) for i in range(8)]
    dets = [Detection(label="person", class_id=0, score=0.9, box=b) for b in boxes]
    return encode(
        Result(
            camera=CAMERA,
            seq=seq,
            capture_ns=now,
            result_ns=now,
            width=1920,
            height=1080,
            model=ModelRef(name="yolov3-tiny", version="1"),
            task="detection",
            detections=dets,
        )
    )


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def results_stream(replicas: int) -> api.StreamConfig:
    return api.StreamConfig(
        name=S.results_stream,
        subjects=[S.all_results()],
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        max_age=3600.0,
    )


async def latency(pub: Client, sub: Client, replicas: int, n: int, fps: float) -> dict[str, Any]:
    """Core publish -> subscriber, and JetStream publish -> stored ack, in ms."""
    js = pub.jetstream(timeout=10)
    await ensure_stream(js, results_stream(replicas), replicas=replicas)
    seen: dict[int, float] = {}
    sent: dict[int, float] = {}

    async def on_result(msg: Any) -> None:
        seen[int(msg.headers["seq"])] = time.perf_counter()

    s = await sub.subscribe(S.results(CAMERA), cb=on_result)
    await sub.flush()
    stored: list[float] = []
    warm = int(fps)  # the first second is warm-up
    for seq in range(n + warm):
        data = result(seq)
        t0 = time.perf_counter()
        sent[seq] = t0
        await js.publish(S.results(CAMERA), data, headers={"seq": str(seq)})
        if seq >= warm:
            stored.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(max(0.0, 1 / fps - (time.perf_counter() - t0)))
    await asyncio.sleep(0.5)
    await s.unsubscribe()
    received = [(seen[q] - sent[q]) * 1000 for q in range(warm, n + warm) if q in seen]
    return {"received": received, "stored": stored, "lost": n - len(received)}


async def _exists(js: Any) -> bool:
    try:
        await js.stream_info(S.results_stream)
    except nats_py.js.errors.NotFoundError:
        return False
    return True


async def store_puts(nc: Client, bucket: str, replicas: int, puts: int) -> list[float]:
    """Seconds each put of a 30 MB object took."""
    js = nc.jetstream(timeout=30)
    store = await ensure_object_store(
        js, bucket, api.ObjectStoreConfig(storage=api.StorageType.FILE), replicas=replicas
    )
    data = os.urandom(MODEL_BYTES)
    meta = api.ObjectMeta(name="m", options=api.ObjectMetaOptions(max_chunk_size=CHUNK))
    times = []
    for i in range(puts):
        meta.name = f"model/{i}"
        t0 = time.perf_counter()
        await store.put(meta.name, data, meta=meta)
        times.append(time.perf_counter() - t0)
    await js.delete_object_store(bucket)
    return times


async def leader_loss(
    cluster: NatsCluster, how: str, fps: float, acked: bool = False
) -> dict[str, Any]:
    """Results published at ``fps`` on a surviving node while the results stream's leader is
    killed or stopped: how many were not stored, and the longest gap in what was."""
    admin = await connect(cluster.url_list)
    js = admin.jetstream(timeout=10)
    if await _exists(js):
        await js.delete_stream(S.results_stream)
    await ensure_stream(js, results_stream(3), replicas=3)
    leader = await _leader(js)
    node = int(leader.removeprefix("n"))
    sender_node = next(n for n in cluster.nodes if n != node)
    pub = await connect(cluster.url(sender_node))
    stored_pub = StoredPublisher(pub) if acked else None
    n_sent, t0 = 0, time.perf_counter()
    stopped_at = 0.0
    while time.perf_counter() - t0 < 15:
        data = f"{n_sent}".encode()
        if stored_pub is not None:
            await stored_pub.publish(S.results(CAMERA), data, result_msg_id(CAMERA, n_sent, 0))
        else:
            await pub.publish(S.results(CAMERA), data)
        n_sent += 1
        if not stopped_at and time.perf_counter() - t0 > 3:
            stopped_at = time.perf_counter()
            # A stop waits for the server to exit: not on this loop, the publishing goes on.
            if how == "kill":
                cluster.kill(node)
            else:
                await asyncio.to_thread(cluster.server(node).stop)
        await asyncio.sleep(1 / fps)
    await pub.flush()
    if stored_pub is not None:
        await stored_pub.close(timeout_s=40)
    await asyncio.sleep(1.0)
    js2 = pub.jetstream(timeout=10)
    stored = []
    at = 1
    while True:
        try:
            msg = await js2.get_msg(S.results_stream, seq=at, next=True)
        except nats_py.js.errors.NotFoundError:
            break
        stored.append(int(msg.data))
        at = msg.seq + 1
    gap = max((b - a for a, b in zip(stored, stored[1:], strict=False)), default=0)
    await pub.close()
    await admin.close()
    cluster.restart(node)
    twice = len(stored) - len(set(stored))
    return {"sent": n_sent, "lost": n_sent - len(set(stored)), "twice": twice, "gap_s": gap / fps}


async def _leader(js: Any) -> str:
    for _ in range(100):
        try:
            info = await js.stream_info(S.results_stream)
        except nats_py.js.errors.NotFoundError:  # just made, the meta group still settling
            await asyncio.sleep(0.1)
            continue
        if info.cluster and info.cluster.leader:
            return str(info.cluster.leader)
        await asyncio.sleep(0.1)
    raise RuntimeError("the results stream has no leader")


def show_latency(single: dict[str, Any], cluster: dict[str, Any], n: int, fps: float) -> None:
    print(f"| result latency, {n} results at {fps:g}/s (ms) | one server, R1 | 3 nodes, R3 | x |")
    print("|---|---|---|---|")
    for key, what in (
        ("received", "published (node 1) -> subscriber (node 2)"),
        ("stored", "published -> stored (JetStream ack)"),
    ):
        for p in (50, 99):
            a, b = pct(single[key], p), pct(cluster[key], p)
            print(f"| {what}, p{p} | {a:.2f} | {b:.2f} | {b / a:.1f} |")
    print(f"| not received | {single['lost']} | {cluster['lost']} | |")


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = NatsServer(root / "single").start()
        cluster = NatsCluster(root / "cluster", 3).start()
        try:
            one = await connect(server.url)
            one_sub = await connect(server.url)
            c1 = await connect(cluster.url(1))
            c2 = await connect(cluster.url(2))
            lat1 = await latency(one, one_sub, 1, args.results, args.fps)
            lat3 = await latency(c1, c2, 3, args.results, args.fps)
            show_latency(lat1, lat3, args.results, args.fps)

            put1 = await store_puts(one, "bench-models", 1, args.puts)
            put_c1 = await store_puts(c1, "bench-models", 1, args.puts)
            put_c3 = await store_puts(c1, "bench-models", 3, args.puts)
            m1, mc1, mc3 = (statistics.median(p) for p in (put1, put_c1, put_c3))
            print()
            print(f"| store write, 30 MB model, median of {args.puts} | s | MB/s | x |")
            print("|---|---|---|---|")
            for what, m in (("one server, R1", m1), ("3 nodes, R1", mc1), ("3 nodes, R3", mc3)):
                print(f"| {what} | {m:.2f} | {30 / m:.0f} | {m / m1:.1f} |")
            for nc in (one, one_sub, c1, c2):
                await nc.close()

            print()
            print(
                f"| results stream leader lost, results at {args.fps:g}/s | sent | not stored "
                "| stored twice | longest gap stored |"
            )
            print("|---|---|---|---|---|")
            for how, acked in (("kill", False), ("kill", True), ("stop", False)):
                loss = await leader_loss(cluster, how, args.fps, acked)
                what = "SIGKILL (crash)" if how == "kill" else "SIGTERM (stop)"
                what += ", results_acked" if acked else ", plain publishes"
                print(
                    f"| {what} | {loss['sent']} | {loss['lost']} | {loss['twice']} "
                    f"| {loss['gap_s']:.1f} s |"
                )
        finally:
            cluster.stop()
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=600)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--puts", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
