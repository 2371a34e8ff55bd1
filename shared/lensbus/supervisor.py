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

from lensbus.natsserver import NatsServer
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

    def __init__(
        self,
        name: str,
        settings: Mapping[str, object],
        log_path: Path,
        python: str | None = None,
    ) -> None:
        super().__init__(name, settings, log_path, python=python)
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


class ServerWatch:
    """The embedded nats-server under supervision: reaped when it exits and started again
    with back-off on the same port and JetStream folder (the services reconnect by
    themselves; they retry forever)."""

    def __init__(self, server: NatsServer) -> None:
        self.server = server
        self.restarts = 0
        self.started_at = 0.0
        self.next_start: float | None = None
        self.delay_s = FIRST_DELAY_S

    def start(self) -> None:
        self.server.start(preexec_fn=_die_with_parent)
        self.started_at = time.monotonic()
        self.next_start = None

    def tick(self, now: float) -> list[str]:
        if self.next_start is not None:
            return self._restart(now) if now >= self.next_start else []
        proc = self.server.proc
        code = None if proc is None else proc.poll()  # poll() reaps it: no zombie
        if code is None:
            if now - self.started_at > STABLE_S:
                self.delay_s = FIRST_DELAY_S
            return []
        return [f"nats-server exited with code {code}; {self._schedule(now)}"]

    def _restart(self, now: float) -> list[str]:
        self.restarts += 1
        try:
            self.start()
        except RuntimeError as exc:  # e.g. its port taken meanwhile: try again later
            return [f"nats-server did not start again ({exc}); {self._schedule(now)}"]
        return [f"nats-server restarted on {self.server.url} (restart #{self.restarts})"]

    def _schedule(self, now: float) -> str:
        self.next_start = now + self.delay_s
        line = f"restarting in {self.delay_s:.0f} s"
        self.delay_s = min(self.delay_s * 2, MAX_DELAY_S)
        return line


class Supervisor:
    """Keeps children running: a child that exits is restarted with back-off."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self.restarts_total = 0
        self.server: ServerWatch | None = None

    def watch_server(self, server: NatsServer) -> None:
        """Start the embedded nats-server and keep it running."""
        self.server = ServerWatch(server)
        self.server.start()

    def add(self, child: Child) -> Child:
        self.children.append(child)
        child.start()
        return child

    def tick(self) -> list[str]:
        """Restart children that died; returns a line for each event worth printing."""
        now = time.monotonic()
        events = self.server.tick(now) if self.server is not None else []
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
        """Stop children in the reverse order of their start (the server is its owner's to
        stop, after them)."""
        if self.server is not None:
            self.server.next_start = None
        for child in reversed(self.children):
            child.next_start = None
            child.stop()
