"""Child processes for ``lensbus up``: start, watch, restart with back-off, stop.

Each child is a :class:`~lensbus.processes.ServiceProcess` (``python -m lensbus_<name>``
with its settings in ``LENSBUS_<NAME>_*`` variables, exactly as it would run on its own)
that also dies with ``lensbus up`` and is restarted when it exits.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lensbus.processes import ServiceProcess

# Restart back-off: doubles from the first delay up to the cap; a child that stayed up this
# long is considered healthy again and starts over from the first delay.
FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0
STABLE_S = 60.0


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it if ``lensbus up`` dies (even by
    SIGKILL), so no service is left orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class Child(ServiceProcess):
    """One service process under supervision."""

    def __init__(self, name: str, settings: Mapping[str, object], log_path: Path) -> None:
        super().__init__(name, settings, log_path)
        self.restarts = 0
        self.started_at = 0.0
        self.next_start: float | None = None  # set while it waits for its restart
        self.delay_s = FIRST_DELAY_S

    def start(self, **popen: Any) -> Child:
        super().start(
            start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
            preexec_fn=_die_with_parent,
            **popen,
        )
        self.started_at = time.monotonic()
        self.next_start = None
        return self


class Supervisor:
    """Keeps children running: a child that exits is restarted with back-off."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self.restarts_total = 0

    def add(self, child: Child) -> Child:
        self.children.append(child)
        child.start()
        return child

    def tick(self) -> list[str]:
        """Restart children that died; returns a line for each event worth printing."""
        events = []
        now = time.monotonic()
        for child in self.children:
            if child.next_start is not None:  # waiting for its restart
                if now >= child.next_start:
                    child.restarts += 1
                    self.restarts_total += 1
                    child.start()
                    events.append(f"{child.name} restarted (restart #{child.restarts})")
                continue
            code = child.returncode
            if code is None:
                if now - child.started_at > STABLE_S:
                    child.delay_s = FIRST_DELAY_S
                continue
            tail = child.log_tail(3).replace("\n", " | ")
            child.next_start = now + child.delay_s
            events.append(
                f"{child.name} exited with code {code}; restarting in {child.delay_s:.0f} s"
                + (f" (last log: {tail})" if tail else "")
            )
            child.delay_s = min(child.delay_s * 2, MAX_DELAY_S)
        return events

    def stop_all(self) -> None:
        """Stop children in the reverse order of their start."""
        for child in reversed(self.children):
            child.next_start = None
            child.stop()
