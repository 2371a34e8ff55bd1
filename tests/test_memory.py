"""lensbus.memory: the threads of a service share a capped number of glibc malloc arenas."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

# Eight threads allocate at once and hold on; glibc's malloc_stats() then prints one
# "Arena N:" block per arena on stderr.
PROBE = """
import ctypes, sys, threading
from lensbus.memory import limit_malloc_arenas
if sys.argv[1] == "capped":
    assert limit_malloc_arenas(2)
held, barrier = [], threading.Barrier(9)
def work():
    held.append(bytearray(1 << 20))
    barrier.wait()
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
barrier.wait()
sys.stderr.flush()
ctypes.CDLL(None).malloc_stats()
barrier.wait()
"""


def arenas(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env
    )
    return sum(1 for line in out.stderr.splitlines() if line.startswith("Arena "))


def test_threads_share_two_arenas() -> None:
    assert arenas("default") > 2  # glibc's default: a new arena per new thread
    assert arenas("capped") <= 2


def test_the_environment_knob_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    from lensbus.memory import limit_malloc_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False
