"""``lensbus up`` supervises its own nats-server: SIGKILLed, it is reaped, started again on
the same port and JetStream folder, the restart is printed, and results flow again."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_up import UpProcess, results

pytestmark = pytest.mark.slow


@pytest.fixture
def light_up(tmp_path: Path) -> Iterator[UpProcess]:
    # The test pattern at 5 fps: the lightest source; the demo model as a user gets it.
    proc = UpProcess(tmp_path, "--source", "test")
    yield proc
    proc.kill_all()


def _state(pid: int) -> str:
    """The State line of /proc/<pid>/status ('' when the pid is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split()[1]
    except OSError:
        pass
    return ""


async def test_killed_nats_server_is_restarted(light_up: UpProcess) -> None:
    up = light_up
    up.wait_line(r"open http://", 150)
    assert len(await results(up, 2, 60)) >= 2, up.log
    old = up.children()["nats-server"]
    os.kill(old, signal.SIGKILL)
    up.wait_line(r"nats-server exited with code -9; restarting", 15)
    up.wait_line(rf"nats-server restarted on tls://127\.0\.0\.1:{up.nats_port} \(restart #1\)", 15)
    # Reaped: the killed pid is not left a zombie of lensbus up.
    assert _state(old) in ("", "X"), f"nats-server {old} left in state {_state(old)}"
    new = up.children()["nats-server"]
    assert new != old and _state(new) in ("S", "R")
    # Same port (the results are read there) and the services reconnected by themselves.
    assert len(await results(up, 3, 45)) >= 3, up.log
    assert _state(old) in ("", "X")
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0
    assert _state(new) in ("", "X", "Z"), "nats-server left running"


async def test_nats_server_killed_during_start_up_is_restarted(light_up: UpProcess) -> None:
    """While the services start and the demo is deployed (a minute or more on a first run)
    the server is supervised too: killed then, it is restarted and start-up completes."""
    up = light_up
    up.wait_line(r"deployer healthy", 120)
    old = up.children()["nats-server"]
    os.kill(old, signal.SIGKILL)
    up.wait_line(r"nats-server exited with code -9; restarting", 15)
    up.wait_line(r"nats-server restarted on tls://127\.0\.0\.1:\d+ \(restart #1\)", 15)
    assert _state(old) in ("", "X"), f"nats-server {old} left in state {_state(old)}"
    up.wait_line(r"open http://", 240)
    assert len(await results(up, 2, 60)) >= 2, up.log
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0
