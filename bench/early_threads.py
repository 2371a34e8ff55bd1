"""Import first in a benchmark that takes ``--threads``: MXNet fixes its operator thread count
when it is imported, so the count is read from the command line and set before anything
imports MXNet.  Also puts the services' packages on ``sys.path`` (benchmarks run from a
checkout, ``python bench/<name>.py``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _early_threads(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
    return None


THREADS = _early_threads(sys.argv)
os.environ.setdefault("MXNET_OMP_MAX_THREADS", THREADS or str(os.cpu_count() or 1))
for _service in ("inference", "capture"):
    sys.path.insert(0, str(ROOT / "services" / _service))
