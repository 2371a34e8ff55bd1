"""Where a service runs on the machine's cores: its nice value and CPU affinity.

Both are service settings (``nice``, ``cpus``) applied once at start, before any thread
starts, so every thread the service or its framework starts later inherits them.  Measured
on 2 cores (``bench/cores.py``, docs/architecture.md "Cores"): leaving both alone is best
there; on a bigger machine, pinning capture and each inference instance to cores of their
own keeps a model's intra-op threads from waiting on a core capture holds.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def parse_cpus(text: str) -> frozenset[int]:
    """``"0-2,5"`` (taskset's list form) -> ``{0, 1, 2, 5}``; ValueError saying what is wrong."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise ValueError(f"{part!r} is not a CPU number or range (like 0-2,5)") from None
        if first < 0 or last < first:
            raise ValueError(f"{part!r} is not a CPU range (like 0-2,5)")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError("no CPU given (like 0-2,5)")
    usable = os.sched_getaffinity(0)
    missing = sorted(cpus - usable)
    if missing:
        raise ValueError(f"CPUs {missing} are not usable here (usable: {sorted(usable)})")
    return frozenset(cpus)


def place(nice: int, cpus: frozenset[int] | None) -> None:
    """Apply a service's ``nice`` and ``cpus`` to every thread of this process (threads that
    start later inherit them; some start at import: numpy's BLAS, OpenCV's pool).  The nice
    value only ever goes up (lowering it needs privileges): a process started nicer than
    asked stays as it is."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if nice < current:
        log.info("nice %d asked, started at %d: left at %d", nice, current, current)
    for tid in _threads():
        if cpus is not None:
            os.sched_setaffinity(tid, cpus)
        if nice > current:
            os.setpriority(os.PRIO_PROCESS, tid, nice)


def _threads() -> list[int]:
    """This process's thread ids (Linux: its tasks)."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]  # no /proc: this thread only
