"""Child processes for ``lensbus up``: start, watch health, restart with back-off, stop.

Each child is a service started as ``python -m lensbus_<name>`` with its settings in
``LENSBUS_<NAME>_*`` variables, exactly as it would run on its own.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

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


@dataclass
class Child:
    """One service process under supervision."""

    name: str
    settings: dict[str, str]
    health_port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = 0.0
    delay_s: float = FIRST_DELAY_S
    healthy: bool = False
    env_extra: dict[str, str] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def env(self) -> dict[str, str]:
        prefix = f"LENSBUS_{self.name.upper()}_"
        env = {k: v for k, v in os.environ.items() if not k.startswith(prefix)}
        env.update({f"{prefix}{k.upper()}": v for k, v in self.settings.items()})
        env.update(self.env_extra)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"lensbus_{self.name}"],
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
                preexec_fn=_die_with_parent,
            )
        self.started_at = time.monotonic()
        self.healthy = False

    def check_health(self) -> bool:
        url = f"http://127.0.0.1:{self.health_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as r:
                self.healthy = r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            self.healthy = False
        return self.healthy

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (the service drains and exits), SIGKILL if it does not within timeout."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", self.name, timeout)
            proc.kill()
            proc.wait()

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


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
            if child.proc is None:  # waiting for its restart
                if now >= child.next_start:
                    child.restarts += 1
                    self.restarts_total += 1
                    child.start()
                    events.append(f"{child.name} restarted (restart #{child.restarts})")
                continue
            code = child.proc.poll()
            if code is None:
                if now - child.started_at > STABLE_S:
                    child.delay_s = FIRST_DELAY_S
                continue
            tail = child.log_tail(3).replace("\n", " | ")
            child.proc = None
            child.healthy = False
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
            child.stop()
