"""Tracker benchmark (run by hand, not a test): ms per ``Tracker.update`` with 10, 50 and
100 objects moving at constant speeds (plus a little box jitter), one update a frame at
15 fps, after a warm-up. Median and p90 of N updates, wall clock, and the median CPU time
of the thread, in this process.

Prints a markdown table::

    python bench/tracker.py            # 300 updates per size
    python bench/tracker.py --quick    # 60
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from lensbus.schemas.pipeline import TrackStage
from lensbus_analytics.tracker import Observation, Tracker

FPS = 15.0
SIZES = (10, 50, 100)


def frames(objects: int, n: int, seed: int = 7) -> list[list[Observation]]:
    rng = np.random.default_rng(seed)
    start = rng.uniform(0, 1800, (objects, 2))
    speed = rng.uniform(-80, 80, (objects, 2))
    out = []
    for k in range(n):
        pos = start + speed * (k / FPS) + rng.normal(0, 1.5, (objects, 2))
        out.append(
            [
                Observation((x, y, x + 40, y + 90), float(s), "person", 0)
                for (x, y), s in zip(pos, rng.uniform(0.3, 1.0, objects), strict=True)
            ]
        )
    return out


def run(objects: int, n: int) -> tuple[float, float, float]:
    """Median and p90 wall ms, median CPU ms (the thread's: what a busy machine's other
    processes do not inflate)."""
    seq = frames(objects, n + 20)
    tracker = Tracker(TrackStage())
    wall, cpu = [], []
    for k, obs in enumerate(seq):
        t0, c0 = time.perf_counter(), time.thread_time()
        tracker.update(obs, k / FPS)
        if k >= 20:  # the first updates start the tracks
            wall.append((time.perf_counter() - t0) * 1000)
            cpu.append((time.thread_time() - c0) * 1000)
    return statistics.median(wall), float(np.percentile(wall, 90)), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("-n", type=int, default=300)
    args = parser.parse_args()
    n = 60 if args.quick else args.n
    print(f"Tracker.update, {n} updates each, {platform.python_version()}, numpy {np.__version__}")
    print()
    print("| objects | median ms | p90 ms | median CPU ms |")
    print("| ---: | ---: | ---: | ---: |")
    for objects in SIZES:
        median, p90, cpu = run(objects, n)
        print(f"| {objects} | {median:.2f} | {p90:.2f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
