"""Keep a long-running service's memory flat: glibc's malloc, with few arenas.

glibc gives each new thread that allocates a malloc arena of its own, up to 8 per core.  A
service's thread pools grow under load (asyncio's default executor adds a thread whenever
all are busy, the JPEG strip encoder has its own), and every new arena soon holds its own
cache of freed frame-sized buffers, which is not given back.  Measured with capture sending
1080p at 4x what inference takes (the overload run of bench/pipeline.py): capture's RSS
stepped up 11-15 % within a minute with glibc's default and stayed flat (within 1 %) with two
arenas, at the same CPU for capture and inference (their threads spend their time in OpenCV
and the model, not in malloc).

``MALLOC_ARENA_MAX`` in the environment (glibc's own knob) wins over ours; other C libraries
are left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc <malloc.h>
ARENAS = 2


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``arenas`` for threads started from now on; True if set."""
    if os.environ.get("MALLOC_ARENA_MAX") is not None:
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(M_ARENA_MAX, ctypes.c_int(arenas)))
    except (OSError, AttributeError) as exc:
        log.debug("mallopt not available: %s", exc)
        return False
