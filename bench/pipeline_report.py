"""The report of ``bench/pipeline.py``: the markdown tables, the targets met or not, and the
JSON written to ``bench/results/``."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
from pathlib import Path
from typing import Any

import cv2
from pipeline_lab import JPEG_QUALITY
from pipeline_scenarios import PACED, SATURATED

TARGETS = {
    "fps_ratio_1080p": ">= 0.9",
    "added_latency_p50_ms_1080p": "<= 8",
    "added_latency_p99_ms_1080p": "<= 25",
    "swap_frames_without_result": "== 0",
    "swap_stall_intervals": "<= 1 (longest gap - normal interval, in normal intervals)",
    "overload_rss_growth": "< 10 % (each lensbus service: capture, inference; nats-server "
    "is shown beside them)",
}


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


def compare_table(out: dict[str, Any]) -> list[str]:
    """The bare loop against the pipeline, per backend and size."""
    lines = []
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
            other = max(b["cpu_cores"]["other"], s["cpu_cores"]["other"], p["cpu_cores"]["other"])
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
    return lines


def swap_table(out: dict[str, Any]) -> list[str]:
    """The live swaps: frames without a result, the stall."""
    lines = []
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
    return lines


def overload_table(out: dict[str, Any]) -> list[str]:
    """The overload runs: rates, RSS, drops by reason."""
    lines = []
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
    return lines


def workers_table(out: dict[str, Any]) -> list[str]:
    """One against two inference instances."""
    lines = []
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
    return lines


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
        lines += compare_table(out)
    if out.get("swap"):
        lines += swap_table(out)
    if out.get("overload"):
        lines += overload_table(out)
    if out.get("workers"):
        lines += workers_table(out)
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


def installed(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
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
        # absent ones are None: the GPU machine has no MXNet, the CPU ones may lack torch
        **{name: installed(name) for name in ("onnxruntime", "mxnet", "torch")},
        "mxnet_omp_max_threads": os.environ.get("MXNET_OMP_MAX_THREADS"),
        "loadavg_at_start": list(os.getloadavg()),
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
    }


def result_path(args: argparse.Namespace) -> Path:
    stamp = dt.datetime.now().strftime("%Y-%m-%d")
    return Path(args.out) / f"pipeline-{stamp}{'-quick' if args.quick else ''}.json"


def checkpoint(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """What is measured so far, beside the final file (``.json.tmp``), in case the run dies."""
    path = result_path(args).with_suffix(".json.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(public(out), indent=2) + "\n")
