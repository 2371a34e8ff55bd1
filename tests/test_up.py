"""``lensbus up`` as a user runs it: embedded NATS, demo model, sample video, every service."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats as nats_py
import paho.mqtt.client as mqtt
import pytest

from lensbus import Subjects, decode
from lensbus.bus import auth_options
from lensbus.bus import connect as bus_connect
from lensbus.cli.up_setup import inference_layout
from lensbus.natsserver import free_port
from lensbus.placement import parse_cpus
from lensbus.schemas import Result
from lensbus_inference.packaging.demo_packages import read_labels, yolo_assets

pytestmark = pytest.mark.slow

# `lensbus up`'s default demo: YOLOv3-tiny for ONNX, written by our darknet importer on any
# supported Python (no MXNet needed).
HAS_MXNET = importlib.util.find_spec("mxnet") is not None
DEMO = "yolov3-tiny-onnx"


class UpProcess:
    def __init__(self, tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.data = tmp_path / "data"
        self.port = free_port()
        self.nats_port = free_port()
        self.mqtt_port = free_port()  # not 1883: another run may hold it
        self.log_path = tmp_path / "up.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "lensbus.cli.main",
                    "up",
                    "--data-dir",
                    str(self.data),
                    "--port",
                    str(self.port),
                    "--nats-port",
                    str(self.nats_port),
                    "--mqtt-port",
                    str(self.mqtt_port),
                    "--fps",
                    "5",
                    *extra,
                ],
                env={**os.environ, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_line(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log)
            if m:
                return m
            assert self.proc.poll() is None, f"lensbus up exited:\n{self.log}"
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r} in {timeout}s:\n{self.log}")

    def children(self) -> dict[str, int]:
        """Service name -> pid of every process lensbus up started."""
        found = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(fields[1]) != self.proc.pid:
                continue
            name = next((a.decode() for a in cmdline if a.startswith(b"lensbus_")), "")
            key = name or Path(cmdline[0].decode()).name
            if key in found:  # a second instance (inference): lensbus_inference#2
                key = f"{key}#{sum(k.split('#')[0] == key for k in found) + 1}"
            found[key] = int(stat.parent.name)
        return found

    def kill_all(self) -> None:
        """Kill it and every process it started (what a failed test left running)."""
        kids = self.children()  # before the parent goes: then they are no longer its children
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in kids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def secrets(self) -> dict[str, Any]:
        return dict(json.loads((self.data / "secrets.json").read_text()))

    def mqtt_password(self) -> str:
        return str(self.secrets()["passwords"]["mqtt"])

    def client_options(self, user: str = "client") -> dict[str, Any]:
        """How a program connects as ``user``: its nkey seed file and the CA of the server."""
        data = self.secrets()
        ca = self.data / data["tls_ca"] if "tls_ca" in data else None
        return auth_options(user=user, nkey_file=self.data / data["nkeys"][user], tls_ca=ca)

    @property
    def nats_url(self) -> str:
        scheme = "tls" if "tls_ca" in self.secrets() else "nats"
        return f"{scheme}://127.0.0.1:{self.nats_port}"


@pytest.fixture
def up(tmp_path: Path) -> Iterator[UpProcess]:
    proc = UpProcess(tmp_path)
    yield proc
    proc.kill_all()


async def results(up: UpProcess, n: int, timeout: float, labelled: bool = False) -> list[Result]:
    """At least ``n`` results (and, if ``labelled``, one with a detection) within timeout."""
    got: list[Result] = []
    nc = await bus_connect(up.nats_url, name="test-up", **up.client_options())

    async def on_result(msg: nats_py.aio.msg.Msg) -> None:
        got.append(decode(msg.data, Result))

    await nc.subscribe(Subjects().results("cam1"), cb=on_result)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(got) >= n and (not labelled or any(r.detections for r in got)):
            break
        await asyncio.sleep(0.1)
    await nc.close()
    return got


def http_get(url: str, nbytes: int = -1) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read(nbytes)


async def test_up_runs_everything_and_stops_cleanly(up: UpProcess) -> None:
    t0 = time.monotonic()
    up.wait_line(r"open http://127\.0\.0\.1:\d+/", 150)
    got = await results(up, 5, 90, labelled=True)
    elapsed = time.monotonic() - t0
    assert len(got) >= 5, up.log
    assert elapsed < 150
    labels = {d.label for r in got for d in r.detections}
    assert all(r.model.name == DEMO for r in got)
    assert labels, "the demo video yields detections"
    assert labels <= set(read_labels(yolo_assets() / "coco.names")), labels
    print(f"lensbus up: first results after {elapsed:.1f}s, labels {sorted(labels)}")

    base = f"http://127.0.0.1:{up.port}"
    assert http_get(base + "/")[0] == 200
    # nats-server's MQTT listener takes the user it names (Home Assistant's login).
    up.wait_line(
        rf"MQTT \(Home Assistant\) on mqtt://127\.0\.0\.1:{up.mqtt_port} as the user 'mqtt'", 1
    )
    ha = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    ha.username_pw_set("mqtt", up.mqtt_password())
    ha.connect("127.0.0.1", up.mqtt_port)
    deadline = time.monotonic() + 10
    while not ha.is_connected() and time.monotonic() < deadline:
        ha.loop(timeout=0.5)  # reads the CONNACK: accepted, or refused (bad login)
    assert ha.is_connected(), up.log
    ha.disconnect()
    for stream in ("device", "project"):
        status, head = http_get(f"{base}/cameras/cam1/{stream}.mjpeg", 4096)
        assert status == 200 and b"\xff\xd8" in head, stream

    kids = up.children()
    assert {
        "lensbus_deployer",
        "lensbus_inference",
        "lensbus_analytics",
        "lensbus_projects",
        "lensbus_capture",
        "lensbus_publisher",
        "nats-server",
    } <= set(kids), kids
    # Two inference instances on CPU, each on its own half of the cores (README "Cores").
    infs = [pid for name, pid in kids.items() if name.startswith("lensbus_inference")]
    layout = inference_layout(None, "cpu")
    assert len(infs) == len(layout) == 2, kids
    if all("cpus" in own for own in layout):
        wanted = sorted(sorted(parse_cpus(own["cpus"])) for own in layout)
        assert sorted(sorted(os.sched_getaffinity(pid)) for pid in infs) == wanted
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0
    for name, pid in kids.items():
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"{name} left running"
    assert "stopped" in up.log


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def test_killed_child_is_restarted(up: UpProcess) -> None:
    up.wait_line(r"open http://", 150)
    assert len(await results(up, 2, 60)) >= 2
    pid = up.children()["lensbus_inference"]
    os.kill(pid, signal.SIGKILL)
    up.wait_line(r"inference exited with code -9; restarting", 15)
    up.wait_line(r"inference restarted \(restart #1\)", 15)
    assert len(await results(up, 3, 90)) >= 3, up.log
    assert up.children()["lensbus_inference"] != pid
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0


# The Python 3.11 environment with MXNet beside this one (`make install311`), when this one
# has no MXNet (Python 3.12+, numpy 2).
ROOT = Path(__file__).resolve().parent.parent
MXNET_PYTHON = os.environ.get("LENSBUS_TEST_MXNET_PYTHON") or str(ROOT / ".venv311/bin/python")


def test_up_names_the_python_mxnet_needs(tmp_path: Path) -> None:
    if HAS_MXNET:
        pytest.skip("MXNet is installed in this Python: inference runs from it")
    up = UpProcess(tmp_path, "--backend", "mxnet", env={"LENSBUS_INFERENCE_PYTHON": ""})
    assert up.proc.wait(30) == 1, up.log
    assert "mxnet is not installed in this Python" in up.log, up.log
    assert "--inference-python" in up.log and "make up" in up.log, up.log
    assert not (up.data / "nats").exists(), "nothing started"


async def test_up_runs_mxnet_inference_from_its_own_python(tmp_path: Path) -> None:
    """``--backend mxnet`` on a Python without MXNet: the inference child (and the demo's
    build) run from the Python 3.11 environment named by $LENSBUS_INFERENCE_PYTHON."""
    if HAS_MXNET:
        pytest.skip("MXNet is installed in this Python: the default demo test covers it")
    if not Path(MXNET_PYTHON).exists():
        pytest.skip(f"no Python with MXNet beside this one ({MXNET_PYTHON}): make install311")
    up = UpProcess(tmp_path, "--backend", "mxnet", env={"LENSBUS_INFERENCE_PYTHON": MXNET_PYTHON})
    try:
        up.wait_line(r"open http://127\.0\.0\.1:\d+/", 240)
        got = await results(up, 3, 90, labelled=True)
        assert len(got) >= 3, up.log
        assert {r.model.name for r in got} == {"yolov3-tiny-mxnet"}, up.log
        inference = up.children()["lensbus_inference"]
        exe = os.path.realpath(f"/proc/{inference}/exe")
        assert exe == os.path.realpath(MXNET_PYTHON), (exe, MXNET_PYTHON)
        assert f"inference runs from {MXNET_PYTHON}" in up.log
        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(60) == 0
    finally:
        up.kill_all()
