"""``bench/pipeline.py``'s run at a camera's rate (issue 18 item 6): a real camera does not
slow down for us, so frames are offered at a fixed ``--camera-fps`` (30) whatever the model
does, and what counts is how many results come out and how old a frame is when the model
starts on it.

* **bare**: a camera thread in this process reads the video with capture's own source class
  every 1/fps s (on a fixed schedule), scales it with capture's ``scale_frame`` and stamps
  it; the model loop takes the newest frame (an older one not taken is dropped, as
  inference's mailbox does) and runs ``LoadedModel.run`` on it.
* **pipeline** (and **+ model stream**): capture reading the same video at the same fps,
  inference, results from NATS.

Per run: results/s, frames offered and dropped, the frame's age when the model starts on it
(bare: taken - read; pipeline: the result's latency minus compute and postprocess), and
capture -> result latency, p50/p99. Windows taken in turn, rounds as the other runs.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from pipeline_lab import SIZES, load_bare_model, log, summary_ms

from lensbus_capture.encoding import scale_frame
from lensbus_capture.sources import VideoSource

MODEL_HEIGHT = 416


class Camera:
    """Frames of the video on a fixed schedule, the newest kept: a camera."""

    def __init__(self, video: Path, size: tuple[int, int], fps: float) -> None:
        self.src = VideoSource(str(video), live=False, loop=True)
        self.size, self.interval = size, 1.0 / fps
        self.newest: tuple[Any, float] | None = None
        self.offered = self.dropped = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="camera", daemon=True)

    def start(self) -> Camera:
        self.src.open()
        self.thread.start()
        return self

    def _run(self) -> None:
        next_t = time.perf_counter()
        while not self.stop.is_set():
            image = scale_frame(self.src.read(), *self.size)
            with self.lock:
                self.dropped += self.newest is not None
                self.newest = (image, time.perf_counter())
                self.offered += 1
            next_t += self.interval
            self.stop.wait(max(0.0, next_t - time.perf_counter()))

    def take(self) -> tuple[Any, float] | None:
        with self.lock:
            got, self.newest = self.newest, None
        return got

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.src.close()


def bare_at_camera_rate(
    model: Any, video: Path, size: tuple[int, int], fps: float, seconds: float
) -> dict[str, Any]:
    w, h = size
    cam = Camera(video, size, fps).start()
    ages, lat = [], []
    try:
        while cam.take() is None:  # the first frame, and warm caches for the size
            time.sleep(0.001)
        t_end = time.perf_counter() + seconds
        offered0, dropped0 = cam.offered, cam.dropped
        while time.perf_counter() < t_end:
            got = cam.take()
            if got is None:
                time.sleep(0.001)
                continue
            image, read_at = got
            t0 = time.perf_counter()
            model.run(image, w, h)
            ages.append(t0 - read_at)
            lat.append(time.perf_counter() - read_at)
        offered, dropped = cam.offered - offered0, cam.dropped - dropped0
    finally:
        cam.close()
    return {
        "results_fps": round(len(lat) / seconds, 2),
        "offered_fps": round(offered / seconds, 2),
        "dropped": dropped,
        "age_ms": summary_ms(ages),
        "latency_ms": summary_ms(lat),
    }


def pipeline_figures(desc: dict[str, Any], seconds: float) -> dict[str, Any]:
    results = [r for _, r in desc.get("_results", [])]
    ages = [r.latency_s - r.timings.compute - r.timings.postprocess for r in results]
    return {
        "results_fps": round(len(results) / seconds, 2),
        "offered_fps": desc.get("offered_fps"),
        "dropped": desc.get("dropped_stale", 0.0),
        "age_ms": summary_ms(ages) if ages else {},
        "latency_ms": summary_ms([r.latency_s for r in results]) if results else {},
    }


async def camera_rate(bench: Any, backend: str, fps: float) -> None:
    """Bare, pipeline and pipeline + model stream at ``fps`` offered, in turn, per size."""
    pkg = bench.packages[backend]
    # Each instance serves only its own runs' cameras (the model-stream runs' capture also
    # publishes idle device-stream frames, which the device-stream instance must leave alone).
    cams = {
        tag: ",".join(
            bench.cam(backend, size, f"cam{r}{tag}")
            for size in bench.args.sizes
            for r in range(bench.win.rounds)
        )
        for tag in ("", "m")
    }
    model = await asyncio.to_thread(load_bare_model, pkg)
    inf = await asyncio.to_thread(
        bench.lab.inference, pkg, instance=f"cam-{backend}", cameras=cams[""]
    )
    infm = await asyncio.to_thread(
        bench.lab.inference, pkg, instance=f"cam-{backend}-m", cameras=cams["m"], stream="model"
    )
    try:
        for size_name in bench.args.sizes:
            size = SIZES[size_name]
            runs: dict[str, list[dict[str, Any]]] = {"bare": [], "pipeline": [], "model": []}
            for r in range(bench.win.rounds):
                await bench.quiet()
                runs["bare"].append(
                    await asyncio.to_thread(
                        bare_at_camera_rate, model, bench.video, size, fps, bench.win.run_s
                    )
                )
                for key, svc, height in (("pipeline", inf, None), ("model", infm, MODEL_HEIGHT)):
                    label = f"cam{r}{'m' if height else ''}"
                    desc = await bench.pipeline_run(
                        svc, backend, size, label, fps, model_height=height
                    )
                    runs[key].append(pipeline_figures(desc, bench.win.run_s))
                line = ", ".join(f"{k} {v[-1]['results_fps']} fps" for k, v in runs.items())
                log(f"{backend} {size_name} at {fps:g} fps offered, round {r + 1}: {line}")
            bench.out.setdefault("camera_rate", {}).setdefault(backend, {})[size_name] = {
                "fps_offered": fps,
                "median_results_fps": {
                    k: statistics.median(x["results_fps"] for x in v) for k, v in runs.items()
                },
                "rounds": runs,
            }
    finally:
        inf.stop()
        infm.stop()
        await asyncio.to_thread(model.close)


def camera_table(out: dict[str, Any]) -> str:
    """The markdown table of the camera-rate runs ('' when there were none)."""
    rows = []
    for backend, sizes in out.get("camera_rate", {}).items():
        for size, row in sizes.items():
            for key, name in (("bare", "bare"), ("pipeline", "pipeline"), ("model", "+ model")):
                runs = row["rounds"][key]
                fps = statistics.median(x["results_fps"] for x in runs)
                age = [x["age_ms"].get("p50", 0.0) for x in runs if x["age_ms"]]
                age99 = [x["age_ms"].get("p99", 0.0) for x in runs if x["age_ms"]]
                lat = [x["latency_ms"].get("p50", 0.0) for x in runs if x["latency_ms"]]
                bare = statistics.median(x["results_fps"] for x in row["rounds"]["bare"])
                rows.append(
                    f"| {backend} | {size} | {row['fps_offered']:g} | {name} | {fps:.1f} "
                    f"| {fps / bare:.2f} | {statistics.median(age or [0]):.1f} / "
                    f"{statistics.median(age99 or [0]):.1f} | {statistics.median(lat or [0]):.1f} |"
                )
    if not rows:
        return ""
    head = (
        "| backend | size | offered fps | run | results fps | x bare | frame age at the model "
        "ms p50 / p99 | latency ms p50 |\n| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"
    )
    return "\n".join(
        ["", "At a camera's rate (frames offered on a fixed schedule):", "", head, *rows]
    )
