"""A service as a real process: the one harness of ``lensbus up``, the tests and the benchmarks.

A service runs as ``python -m lensbus_<name>`` with its settings in ``LENSBUS_<NAME>_*``
variables, exactly as it would run on its own; its output goes to a log file and its
``/healthz`` and ``/metrics`` are read over HTTP. :class:`ServiceProcess` starts it, waits
until it is healthy, reads its health and metrics, and stops it (SIGTERM, then SIGKILL).
``lensbus up`` adds restarts with back-off (:mod:`lensbus.supervisor`); the tests'
``start_service`` fixture and the benchmarks use it as it is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from http.client import HTTPException
from pathlib import Path
from typing import Any

from lensbus.errors import LensbusError

log = logging.getLogger(__name__)


class ServiceFailed(LensbusError):
    """A service that exited, or was not healthy in time, while it was awaited.

    ``summary`` says which; ``returncode`` is its exit code when it exited, else None (it is
    still running); the message adds the last lines of its log.
    """

    def __init__(self, summary: str, returncode: int | None = None, log_tail: str = "") -> None:
        super().__init__(f"{summary}:\n{log_tail}" if log_tail else summary)
        self.summary = summary
        self.returncode = returncode


def service_env(name: str, settings: Mapping[str, object]) -> dict[str, str]:
    """This process's environment without any ``LENSBUS_*`` variable (a child runs on the
    settings it is given, not on what its starter's shell holds), plus ``settings`` as
    ``LENSBUS_<NAME>_<KEY>``; a None value leaves that setting to the service's default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LENSBUS_")}
    prefix = f"LENSBUS_{name.upper()}_"
    env.update({f"{prefix}{k.upper()}": str(v) for k, v in settings.items() if v is not None})
    env["PYTHONUNBUFFERED"] = "1"  # the log file shows what happened up to a crash
    return env


class ServiceProcess:
    """One service process: ``name`` is the ``lensbus_<name>`` package, ``settings`` its
    settings (a None value is not set), ``port`` the port of its ``/healthz`` and
    ``/metrics`` (by default its ``metrics_port`` setting); ``python`` the interpreter that runs
    it (by default this one: inference with MXNet runs from an environment of its own)."""

    def __init__(
        self,
        name: str,
        settings: Mapping[str, object],
        log_path: Path,
        port: int | None = None,
        cwd: Path | None = None,
        python: str | None = None,
    ) -> None:
        self.name = name
        self.python = python or sys.executable
        self.settings = dict(settings)
        self.log_path = Path(log_path)
        self.port = port if port is not None else int(str(self.settings["metrics_port"]))
        self.cwd = cwd
        self.env = service_env(name, self.settings)
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed = False  # the last stop() needed SIGKILL

    # ---- the process -----------------------------------------------------------------------

    def start(self, **popen: Any) -> ServiceProcess:
        """Start it (again, after it exited); ``popen`` adds options to ``subprocess.Popen``.
        The log file is appended to, so a restart keeps what the last run wrote."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [self.python, "-m", f"lensbus_{self.name}"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                **popen,
            )
        self.killed = False
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (the service drains and exits), SIGKILL if it has not exited within
        ``timeout`` (then ``killed`` is True); its exit code, None if it never started."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", self.name, timeout)
                self.kill()
                self.killed = True
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would; no drain."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    # ---- its log ---------------------------------------------------------------------------

    @property
    def log(self) -> str:
        """The whole log file (every start of it)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 5) -> str:
        return "\n".join(self.log.splitlines()[-lines:])

    # ---- over HTTP -------------------------------------------------------------------------

    def http(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        """GET ``path`` on its port: (status, body); an error status is returned, not raised."""
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def healthz(self) -> tuple[int, dict[str, object]]:
        code, body = self.http("/healthz")
        return code, json.loads(body)

    def healthy(self) -> bool:
        """One look at ``/healthz``: 200 now (False when it does not answer)."""
        try:
            return self.http("/healthz", 1.0)[0] == 200
        except (OSError, ValueError, HTTPException):
            return False

    def metrics(self) -> dict[str, float]:
        """Every sample on ``/metrics``, ``name{labels}`` -> value ({} when it does not answer)."""
        try:
            return _samples(self.http("/metrics", 3.0)[1])
        except OSError:
            return {}

    def metric(self, name: str, labels: str = "") -> float:
        """The value of one sample on ``/metrics`` (0 when absent; raises when it does not
        answer)."""
        key = f"{name}{{{labels}}}" if labels else name
        return _samples(self.http("/metrics")[1]).get(key, 0.0)

    def wait_healthy(
        self,
        timeout: float = 30.0,
        interval: float = 0.1,
        abandon: Callable[[], bool] | None = None,
    ) -> bool:
        """Wait until ``/healthz`` answers 200: True; False if ``abandon()`` turned True first.

        Raises :class:`ServiceFailed` if the process exits (``returncode`` set) or is not
        healthy within ``timeout``; its message ends with the log's last lines.
        """
        if self.proc is None:
            raise ServiceFailed(f"{self.name} was never started")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if abandon is not None and abandon():
                return False
            code = self.returncode
            if code is not None:
                raise ServiceFailed(f"{self.name} exited {code}", code, self.log_tail(30))
            if self.healthy():
                return True
            time.sleep(interval)
        if abandon is not None and abandon():
            return False
        raise ServiceFailed(f"{self.name} not healthy in {timeout:.0f}s", None, self.log_tail(30))


def _samples(body: str) -> dict[str, float]:
    """Prometheus text: ``name{labels}`` -> value of every sample."""
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out
