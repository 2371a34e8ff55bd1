"""Analytics benchmark (run by hand, not a test): what a pipeline's track and zones stages add.

A real nats-server and a real analytics process following a pipeline with a track stage, a
line and a zone; results with N moving objects published on ``detections.<camera>`` at a
camera's pace, in order (the first second is warm-up). Prints a markdown table: the added
latency (publish on detections to arrival on results: the reorder window's hold, tracking,
zones, two NATS hops) as median and p95, and the track and zones stages' mean time from the
service's own metrics.

    python bench/analytics.py                  # 2, 10 and 50 objects, 300 results each at 30 fps
    python bench/analytics.py --objects 50 --results 600
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import nats as nats_py

from lensbus import Subjects, decode, encode
from lensbus.natsserver import NatsServer, free_port
from lensbus.processes import ServiceProcess
from lensbus.schemas import Box, Detection, ModelRef, Pipeline, Result
from lensbus.schemas.deploy import PipelineDeployment, PipelineRevision, pipeline_key
from lensbus.subjects import DEPLOYMENTS_BUCKET

CAMERA = "bench"
GROUP = "bench"
PIPELINE = {
    "stages": [
        {"stage": "model", "model": "m:1"},
        {"stage": "track"},
        {
            "stage": "zones",
            "cameras": {
                CAMERA: {
                    "zones": [{"name": "right", "points": [[0.5, 0], [1, 0], [1, 1], [0.5, 1]]}],
                    "lines": [{"name": "middle", "a": [0.5, 0], "b": [0.5, 1]}],
                }
            },
        },
    ]
}


def result(seq: int, objects: int, t0: int, period_ns: int) -> Result:
    """``objects`` people on a 10-wide grid, each moving right a little every frame."""
    dets = []
    for i in range(objects):
        x, y = (i % 10) * 0.09 + seq * 0.001, (i // 10) * 0.1
        box = Box.from_normalized(x, y, x + 0.05, y + 0.08, 640, 480)
        dets.append(Detection(label="person", class_id=0, score=0.9, box=box))
    return Result(
        camera=CAMERA,
        seq=seq,
        capture_ns=t0 + seq * period_ns,
        result_ns=t0 + seq * period_ns,
        width=640,
        height=480,
        model=ModelRef(name="m", version="1"),
        task="detection",
        detections=dets,
    )


async def put_pipeline(nc: nats_py.NATS) -> None:
    js = nc.jetstream()
    kv = await js.create_key_value(bucket=DEPLOYMENTS_BUCKET, history=5)
    revision = PipelineRevision(
        revision=1, pipeline=Pipeline.model_validate(PIPELINE), activated_ns=time.time_ns()
    )
    await kv.put(pipeline_key(GROUP), encode(PipelineDeployment(group=GROUP, current=revision)))


async def measure(objects: int, count: int, fps: float, tmp: Path) -> str:
    server = NatsServer(tmp / "nats", log_file=tmp / "nats.log").start()
    settings = {"metrics_port": free_port(), "nats_url": server.url, "group": GROUP}
    service = ServiceProcess("analytics", settings, tmp / "analytics.log").start()
    try:
        service.wait_healthy(30)
        nc = await nats_py.connect(server.url)
        await put_pipeline(nc)
        while service.metric("lensbus_analytics_pipeline_updates_total", 'outcome="ok"') < 1:
            await asyncio.sleep(0.05)
        sent: dict[int, float] = {}
        latency: list[float] = []
        done = asyncio.Event()
        # A camera's first result waits reorder_wait_s for an earlier seq (one might be on
        # its way from another replica): the first second is warm-up, not counted.
        warmup = int(fps)

        async def on_result(msg: nats_py.aio.msg.Msg) -> None:
            seq = decode(msg.data, Result).seq
            if seq >= warmup:
                latency.append(time.perf_counter() - sent[seq])
            if seq == warmup + count - 1:
                done.set()

        await nc.subscribe(Subjects().results(CAMERA), cb=on_result)
        t0, period = time.time_ns(), int(1e9 / fps)
        for seq in range(warmup + count):
            data = encode(result(seq, objects, t0, period))
            sent[seq] = time.perf_counter()
            await nc.publish(Subjects().detections(CAMERA), data)
            await asyncio.sleep(1 / fps)  # a camera's pace
        await asyncio.wait_for(done.wait(), 60)
        await nc.close()
        latency.sort()
        stage = {
            name: service.metric(
                "lensbus_analytics_stage_seconds_sum", f'camera="{CAMERA}",stage="{name}"'
            )
            / (warmup + count)
            * 1e3
            for name in ("track", "zones")
        }
        return (
            f"| {objects} | {statistics.median(latency) * 1e3:.2f} | "
            f"{latency[int(0.95 * len(latency))] * 1e3:.2f} | {stage['track']:.2f} | "
            f"{stage['zones']:.2f} |"
        )
    finally:
        service.stop()
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--objects", type=int, nargs="*", default=[2, 10, 50])
    p.add_argument("--results", type=int, default=300, help="results per size (default 300)")
    p.add_argument("--fps", type=float, default=30.0, help="results per second (default 30)")
    a = p.parse_args()
    print("| objects | added ms p50 | p95 | track ms (mean) | zones ms (mean) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n in a.objects:
        with tempfile.TemporaryDirectory() as tmp:
            print(asyncio.run(measure(n, a.results, a.fps, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
