"""How to split a small machine's cores between capture and the model (issue 18 item 3).

Run by hand, not a test: ``python bench/cores.py [--backend onnx|mxnet] [--fps 30]``.

One camera (the bench video at 1080p, offered at ``--fps`` like a real camera, which does not
slow down for us), capture publishing the model stream (416 px high; nobody wants the
full-size device stream, the default), and inference on the model stream.  Each layout of
the cores runs in turn, ``--rounds`` times, with a fresh inference (and capture) each time:

* ``default``: the model on every core (its intra-op threads = cores), nothing pinned;
* ``threads 1``: one intra-op thread;
* ``capture nice N``: capture's threads at nice N (lower priority than the model's);
* ``pinned``: capture on the last core, the model (``threads`` = cores - 1) on the others;
* ``2 x threads 1``: two inference processes of one thread each in one queue group;
* ``2 x threads 1 pinned``: the same, each on a core of its own, capture unpinned.

* ``capture nice N + 2 x threads 1 pinned``: both.

Per layout: results/s (median of the rounds) and its ratio to the default, frames dropped
as stale, latency p50/p99, and the cores each process used.  Nice values and CPUs are the
services' own ``nice`` and ``cpus`` settings (``lensbus.placement``); "default" is every
service at nice 0 on every CPU, as before capture's default became nice 10.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from early_threads import ROOT
from pipeline_lab import (
    SIZES,
    Collector,
    CpuMeter,
    Lab,
    by_label,
    log,
    summary_ms,
    video_path,
)

MODEL_HEIGHT = 416
CORES = os.cpu_count() or 1


@dataclass
class Layout:
    name: str
    threads: int | None = None  # per inference process (None: every core)
    processes: int = 1
    capture_nice: int = 0
    capture_cpus: set[int] | None = None
    inference_cpus: list[set[int]] = field(default_factory=list)  # one set per process


def layouts(nice: int) -> list[Layout]:
    last = {CORES - 1}
    rest = set(range(CORES - 1)) or last
    return [
        Layout("default"),
        Layout("threads 1", threads=1),
        Layout(f"capture nice {nice}", capture_nice=nice),
        Layout("pinned", threads=max(1, CORES - 1), capture_cpus=last, inference_cpus=[rest]),
        Layout("2 x threads 1", threads=1, processes=2),
        Layout(
            "2 x threads 1 pinned",
            threads=1,
            processes=2,
            inference_cpus=[{i % CORES} for i in range(2)],
        ),
        Layout(
            f"capture nice {nice} + 2 x threads 1 pinned",
            threads=1,
            processes=2,
            capture_nice=nice,
            inference_cpus=[{i % CORES} for i in range(2)],
        ),
    ]


async def one_run(
    lab: Lab, col: Collector, layout: Layout, pkg: Path, video: Path, fps: float, tag: str, s: float
) -> dict[str, Any]:
    camera = f"cores{tag}"
    infs = []
    for i in range(layout.processes):
        settings: dict[str, object] = {"cameras": camera, "stream": "model"}
        if layout.threads:
            settings["threads"] = layout.threads
        if layout.inference_cpus:
            settings["cpus"] = ",".join(map(str, sorted(layout.inference_cpus[i])))
        inf = await asyncio.to_thread(lab.inference, pkg, instance=f"{camera}-{i}", **settings)
        infs.append(inf)
    cap = await asyncio.to_thread(
        lab.capture,
        camera,
        video,
        SIZES["1920x1080"],
        fps,
        MODEL_HEIGHT,
        nice=layout.capture_nice,  # the setting: capture's default is 10 since this bench
        cpus=",".join(map(str, sorted(layout.capture_cpus))) if layout.capture_cpus else None,
    )
    try:
        await col.until(col.has(camera), 60, f"results of {camera}")
        await asyncio.sleep(3)  # settle
        pids = {"capture": cap.pid, **{f"inference{i}": p.pid for i, p in enumerate(infs)}}
        n0, t0_ns = col.count(camera), time.time_ns()
        meter = CpuMeter(pids).start()
        await asyncio.sleep(s)
        cpu, n1, t1_ns = meter.stop(), col.count(camera), time.time_ns()
        stale = sum(
            by_label(p.metrics(), "lensbus_inference_frames_dropped_total", "reason").get(
                "stale", 0.0
            )
            for p in infs
        )
    finally:
        cap.stop()
        for p in infs:
            p.stop()
    window = [r for t, r in col.results(camera)[n0:n1] if t0_ns <= t <= t1_ns]
    return {
        "results_fps": round((n1 - n0) / s, 2),
        "dropped_stale": stale,
        "latency_ms": summary_ms([r.latency_s for r in window]),
        "compute_ms": summary_ms([r.timings.compute for r in window]),
        "cpu_cores": cpu,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from lensbus_inference.packaging.demo_packages import build_yolo

    pkg = build_yolo(args.models)[args.backend]
    video = video_path()
    out: dict[str, Any] = {"backend": args.backend, "fps_offered": args.fps, "cores": CORES}
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="lensbus-bench-cores-") as work:
        with Lab(Path(work)) as lab:
            col = await Collector().start(lab.url)
            for r in range(args.rounds):
                for i, layout in enumerate(layouts(args.nice)):
                    got = await one_run(
                        lab, col, layout, pkg, video, args.fps, f"{r}x{i}", args.seconds
                    )
                    runs.setdefault(layout.name, []).append(got)
                    log(
                        f"round {r + 1} {layout.name}: {got['results_fps']} results/s, "
                        f"cpu {got['cpu_cores']}"
                    )
    base = statistics.median(x["results_fps"] for x in runs["default"])
    out["layouts"] = {
        name: {
            "median_results_fps": statistics.median(x["results_fps"] for x in rs),
            "x_default": round(statistics.median(x["results_fps"] for x in rs) / base, 3),
            "rounds": rs,
        }
        for name, rs in runs.items()
    }
    return out


def table(out: dict[str, Any]) -> str:
    head = (
        f"{out['backend']}, 1080p offered at {out['fps_offered']:g} fps, model stream, "
        f"{out['cores']} cores\n\n"
        "| layout | results/s | x default | stale drops | latency ms p50 / p99 | "
        "compute ms p50 | cores: capture / inference |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    rows = []
    for name, row in out["layouts"].items():
        rs = row["rounds"]

        def med(f: Any, rs: list[dict[str, Any]] = rs) -> float:
            return statistics.median(f(x) for x in rs)

        inf_cpu = med(lambda x: sum(v for k, v in x["cpu_cores"].items() if k.startswith("inf")))
        rows.append(
            f"| {name} | {row['median_results_fps']:.1f} | {row['x_default']:.2f} | "
            f"{med(lambda x: x['dropped_stale']):.0f} | "
            f"{med(lambda x: x['latency_ms'].get('p50', 0)):.1f} / "
            f"{med(lambda x: x['latency_ms'].get('p99', 0)):.1f} | "
            f"{med(lambda x: x['compute_ms'].get('p50', 0)):.1f} | "
            f"{med(lambda x: x['cpu_cores']['capture']):.2f} / {inf_cpu:.2f} |"
        )
    return "\n".join([head, *rows])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="onnx", choices=("onnx", "mxnet"))
    parser.add_argument("--fps", type=float, default=30.0, help="frames offered per second")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="window per run")
    parser.add_argument("--nice", type=int, default=10, help="capture's nice value tried")
    parser.add_argument("--models", default=str(ROOT / ".lensbus" / "models"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="JSON folder")
    args = parser.parse_args()
    out = asyncio.run(run(args))
    print(table(out))
    name = f"cores-{args.backend}-{args.fps:g}fps-{time.strftime('%Y-%m-%d')}.json"
    path = Path(args.out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
