"""The model cache on local disk: ``<cache>/<name>/<version>.tar.gz`` (a complete download)
and ``<version>.d`` (the package of a model that loaded).

Nothing half-done is ever seen under a final name: a download goes to
``<version>.tar.gz.part-<pid>``, an unpack to ``<version>.unpacking-<pid>``, renamed only
once complete (the download) or loaded and warmed up (the folder). A failed package's
folder is removed at once (a 100,000-file package once left 501 MB behind). At start, what
dead processes left (their pid no longer runs) and every ``.d`` folder go: a model is read
into memory when it loads, so no process needs the folder after that.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from lensbus_inference import metrics

log = logging.getLogger(__name__)

UNPACKING = ".unpacking-"
PART = ".part"


def part_path(dest: Path) -> Path:
    """Where the download of ``dest`` is written until it is complete."""
    return dest.with_name(f"{dest.name}{PART}-{os.getpid()}")


def unpack_dir(archive: Path) -> Path:
    """A fresh folder to unpack ``archive`` into, this process's own."""
    version = archive.name.removesuffix(".tar.gz")
    work = archive.with_name(f"{version}{UNPACKING}{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def keep(work: Path) -> Path:
    """The folder of a model that loaded, under its final name ``<version>.d``."""
    version = work.name.split(UNPACKING, 1)[0]
    final = work.with_name(f"{version}.d")
    shutil.rmtree(final, ignore_errors=True)
    try:
        work.rename(final)
    except OSError as exc:  # the model is in memory already: only the folder is lost
        log.warning("could not keep %s as %s: %s", work, final.name, exc)
        remove(work, "failed")
    return final


def remove(path: Path, kind: str) -> int:
    """Delete a folder or file of the cache; returns (and counts) the bytes it held."""
    try:
        if path.is_dir():
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            shutil.rmtree(path, ignore_errors=True)
        else:
            size = path.stat().st_size
            path.unlink(missing_ok=True)
    except OSError:
        return 0
    metrics.CACHE_BYTES_REMOVED.labels(kind).inc(size)
    return size


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():  # this process has made nothing yet at start
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _stale(path: Path) -> bool:
    name = path.name
    if path.is_dir() and name.endswith(".d"):
        return True
    for marker in (UNPACKING, f"{PART}-"):
        if marker in name:
            pid = name.rsplit("-", 1)[-1]
            return not (pid.isdigit() and _pid_alive(int(pid)))
    return name.endswith(PART)  # a download of an older version of this code


def clean(cache: Path) -> int:
    """Remove what dead processes left in the cache and unpacked folders; returns bytes."""
    if not cache.is_dir():
        return 0
    freed = count = 0
    for model in cache.iterdir():
        if not model.is_dir():
            continue
        for path in model.iterdir():
            if _stale(path):
                freed += remove(path, "stale")
                count += 1
    if count:
        log.info("model cache: removed %d stale item(s), %.1f MiB freed", count, freed / 2**20)
    return freed
