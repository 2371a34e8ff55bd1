"""The scenarios of ``bench/pipeline.py``: bare loop vs pipeline rounds (saturated and
paced, with and without the model stream), the live swap, the overload and the workers
runs.  Each writes its figures into ``Bench.out``; ``pipeline_report`` turns them into
tables."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from pipeline_lab import (
    SIZES,
    Collector,
    CpuMeter,
    Lab,
    bare_loop,
    by_label,
    describe,
    family_total,
    load_bare_model,
    log,
    merge_bare,
    merge_runs,
    ms,
    rss_mb,
    summary_ms,
    total_busy_s,
)

from lensbus.modelpkg import verify, write_package
from lensbus.processes import ServiceProcess

SATURATED = 1.25  # offered rate / bare fps, throughput run
PACED = 0.5  # offered rate / bare fps, latency and swap runs
OVERLOAD = 4.0  # offered rate / bare fps, overload run
WORKERS_RATE = 2.5  # offered rate / bare fps (one instance), workers run
MAX_FPS = 240.0  # the highest fps CaptureSettings accepts
# The "+ model stream" runs: capture also publishes each frame at the model's input height
# (lensbus.subjects model_frames), and inference reads those.
MODEL_HEIGHT = 416
QUIET_CORES = 0.25  # "nearly idle": the rest of the machine uses at most this many cores


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
        self, camera: str, seconds: float, pids: dict[str, int], services: dict[str, ServiceProcess]
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
        inf: ServiceProcess,
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
            family_total(cd, "lensbus_capture_frames_published_total") / seconds, 2
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
                        instance,
                        backend,
                        size,
                        f"{mode}paced",
                        PACED * bare_fps,
                        self.win.paced_s,
                        model_height=MODEL_HEIGHT if mode == "m-" else None,
                    )
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
            return family_total(m1[svc], name) - family_total(m0[svc], name)

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
                family_total(deltas["capture"], "lensbus_capture_frames_published_total")
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
