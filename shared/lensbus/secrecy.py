"""Keeping a service's secrets from the processes it starts.

The projects service runs users' code and the deployer imports it (to check it) in child
processes of the same OS user. Those children get an environment without the service's
``LENSBUS_*`` variables, but a same-user process can read ``/proc/<parent pid>/environ``
(the NATS password, the auth callout's seed) unless the parent is not "dumpable": then
Linux makes its ``/proc`` files root's. Root sees everything anyway: run the services as
an unprivileged user (compose does, uid 10001) for this to hold.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def hide_environment() -> bool:
    """Make this process not dumpable (Linux); True if it now is not."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("could not hide this process's environment (prctl: %d)", ctypes.get_errno())
        return False
    return libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0
