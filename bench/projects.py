"""Projects benchmark (run by hand, not a test): what running user code as a project adds.

A real nats-server and a real projects service; a no-op project (its handler publishes the
seq it got with ``ctx.publish``) deployed as the deployer would (packed folder in
``lensbus-projects``, record in the deployments bucket). Results are published on
``results.<camera>`` at a camera's pace (the first second is warm-up). Prints:

- the added latency of a no-op project: result published -> handler in the project's
  process -> its ``ctx.publish`` output received (two NATS hops, the mailbox, the worker
  thread), p50 / p99;
- the swap gap: a v2 deployed while results flow; the largest interval between two handled
  results across the swap against the steady interval, and whether every result was handled
  exactly once.

    python bench/projects.py                        # 500 results at 30/s, then a swap
    python bench/projects.py --results 1000 --fps 60
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import nats as nats_py
from nats.aio.client import Client
from nats.js.api import KeyValueConfig, ObjectStoreConfig

from lensbus import Subjects, decode, encode
from lensbus.natsserver import NatsServer, free_port
from lensbus.processes import ServiceProcess
from lensbus.projects.package import pack
from lensbus.schemas import ModelRef, Result
from lensbus.schemas.project import (
    ProjectDeployment,
    ProjectMessage,
    ProjectRelease,
    ProjectReport,
    project_key,
    project_object_name,
    project_report_key,
)
from lensbus.subjects import DEPLOYMENTS_BUCKET, PROJECTS_BUCKET

CAMERA = "bench"
NAME = "noop"
INSTANCE = "bench"
NOOP = """
def on_result(result, ctx):
    ctx.publish("out", {"seq": result.seq})
"""
S = Subjects()


async def deploy(nc: Client, root: Path, version: str) -> None:
    folder = root / f"{NAME}-{version}"
    folder.mkdir(parents=True, exist_ok=True)
    # A deep mailbox: the swap is measured, not a handler falling behind.
    manifest = {"name": NAME, "version": version, "limits": {"mailbox": 256}}
    (folder / "project.json").write_text(json.dumps(manifest))
    (folder / "handler.py").write_text(NOOP)
    data = pack(folder)
    js = nc.jetstream()
    store = await js.create_object_store(PROJECTS_BUCKET, ObjectStoreConfig())
    await store.put(project_object_name(NAME, version), data)
    kv = await js.create_key_value(KeyValueConfig(bucket=DEPLOYMENTS_BUCKET, history=5))
    release = ProjectRelease(
        version=version,
        groups=["default"],
        sha256=hashlib.sha256(data).hexdigest(),
        deployed_ns=time.time_ns(),
    )
    await kv.put(project_key(NAME), encode(ProjectDeployment(name=NAME, current=release)))


async def wait_serving(nc: Client, version: str, within_s: float = 60.0) -> None:
    kv = await nc.jetstream().key_value(DEPLOYMENTS_BUCKET)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            rep = decode((await kv.get(project_report_key(NAME, INSTANCE))).value, ProjectReport)
            if rep.state == "running" and rep.serving == version:
                return
        except Exception:  # not written yet
            pass
        await asyncio.sleep(0.05)
    raise SystemExit(f"{NAME} {version} not running in {within_s} s")


def result(seq: int) -> Result:
    now = time.time_ns()
    return Result(
        camera=CAMERA,
        seq=seq,
        capture_ns=now,
        result_ns=now,
        width=640,
        height=480,
        model=ModelRef(name="m", version="1"),
        task="detection",
    )


class Clock:
    """When each seq was published and when its output arrived (this process's clock)."""

    def __init__(self) -> None:
        self.sent: dict[int, float] = {}
        self.got: list[tuple[int, float, str]] = []  # seq, arrival, version

    async def on_output(self, msg: Any) -> None:
        m = decode(msg.data, ProjectMessage)
        self.got.append((int(m.payload["seq"]), time.perf_counter(), m.version))


async def flow(nc: Client, clock: Clock, first: int, n: int, fps: float) -> None:
    period = 1.0 / fps
    t0 = time.perf_counter()
    for i in range(n):
        await asyncio.sleep(max(0.0, t0 + i * period - time.perf_counter()))
        seq = first + i
        clock.sent[seq] = time.perf_counter()
        await nc.publish(S.results(CAMERA), encode(result(seq)))
    await nc.flush()


async def settle(clock: Clock, count: int, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while len(clock.got) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


async def latency(nc: Client, clock: Clock, results: int, fps: float) -> None:
    warm = int(fps)
    await flow(nc, clock, 1, warm + results, fps)
    await settle(clock, warm + results)
    lat = [(t - clock.sent[s]) * 1000 for s, t, _ in clock.got if s > warm]
    print(f"| no-op project, {len(lat)} results at {fps:g}/s | added latency (ms) |")
    print("|---|---|")
    print(f"| p50 | {pct(lat, 50):.2f} |")
    print(f"| p99 | {pct(lat, 99):.2f} |")
    print(f"| max | {max(lat):.2f} |")


async def swap(nc: Client, clock: Clock, root: Path, fps: float) -> None:
    first, n = 100_000, int(fps * 12)
    start = len(clock.got)
    sender = asyncio.create_task(flow(nc, clock, first, n, fps))
    await asyncio.sleep(3.0)
    t_deploy = time.perf_counter()
    await deploy(nc, root, "2")
    await wait_serving(nc, "2")
    t_served = time.perf_counter()
    await sender
    await settle(clock, start + n)
    got = clock.got[start:]
    seqs = sorted(s for s, _, _ in got)
    once = seqs == list(range(first, first + n))
    times = [t for _, t, _ in got]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    steady = statistics.median(gaps)
    v1 = [t for _, t, v in got if v == "1"]
    v2 = [t for _, t, v in got if v == "2"]
    handover = (min(v2) - max(v1)) if v1 and v2 else float("nan")
    print()
    print(f"| swap v1 -> v2 while {fps:g} results/s flow | |")
    print("|---|---|")
    print(f"| deploy -> v2 serving (start beside v1, handover) | {t_served - t_deploy:.2f} s |")
    print(f"| steady interval (median) | {steady * 1000:.1f} ms |")
    print(f"| handover gap (last v1 output -> first v2 output) | {handover * 1000:.1f} ms |")
    print(f"| largest interval across the swap | {max(gaps) * 1000:.1f} ms |")
    print(f"| largest / steady | {max(gaps) / steady:.1f}x |")
    print(f"| handled by v1 / v2 | {len(v1)} / {len(v2)} |")
    print(f"| every result handled exactly once | {'yes' if once else 'NO'} |")


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = NatsServer(root / "nats").start()
        port = free_port()
        svc = ServiceProcess(
            "projects",
            {
                "nats_url": server.url,
                "metrics_port": port,
                "instance": INSTANCE,
                "cache_dir": root / "cache",
                "report_s": 0.5,
            },
            root / "projects.log",
        )
        try:
            svc.start()
            svc.wait_healthy(30)
            nc = await nats_py.connect(server.url)
            clock = Clock()
            await nc.subscribe(S.project_output(NAME, CAMERA, "out"), cb=clock.on_output)
            await deploy(nc, root, "1")
            await wait_serving(nc, "1")
            await latency(nc, clock, args.results, args.fps)
            await swap(nc, clock, root, args.fps)
            await nc.close()
        finally:
            svc.stop()
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=500)
    parser.add_argument("--fps", type=float, default=30.0)
    asyncio.run(main(parser.parse_args()))
