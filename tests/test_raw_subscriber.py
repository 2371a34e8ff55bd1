"""docs/examples/raw_subscriber.py: a consumer written from docs/schemas alone reads frames.

It runs as a subprocess in which ``import lensbus`` is made to fail, so the example can
never lean on lensbus by accident.
"""

from __future__ import annotations

import ast
import asyncio
import json
import subprocess
import sys
from pathlib import Path

import msgpack
import nats as nats_py
import numpy as np
import pytest

from lensbus import Subjects, encode
from lensbus.images import encode_jpeg
from lensbus.natsserver import NatsServer
from lensbus.schemas import FrameEnvelope

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "docs" / "examples" / "raw_subscriber.py"

# Run the script with lensbus unimportable (a None entry in sys.modules makes import fail).
RUNNER = (
    "import runpy, sys; sys.modules['lensbus'] = None; "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def command(*args: str) -> list[str]:
    return [sys.executable, "-c", RUNNER, str(SCRIPT), *args]


def test_example_imports_no_lensbus() -> None:
    tree = ast.parse(SCRIPT.read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert "lensbus" not in imported
    assert {"nats", "msgpack"} <= imported
    assert "frame.json" in SCRIPT.read_text()  # it reads the published schema


def test_runner_really_blocks_lensbus() -> None:
    probe = "import runpy, sys; sys.modules['lensbus'] = None; import lensbus"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30)
    assert proc.returncode != 0 and b"ModuleNotFoundError" in proc.stderr


@pytest.mark.slow
def test_raw_subscriber_reads_real_capture(nats: NatsServer, start_service) -> None:
    cap = start_service(
        "capture", nats.url, camera="rawcam", source="test", fps=10, width=320, height=240
    )
    cap.wait_healthy()
    proc = subprocess.run(
        command(nats.url, "rawcam", "--count", "6", "--timeout", "30"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert cap.stop() == 0
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) >= 5, proc.stdout
    for line in lines:
        assert line["camera"] == "rawcam"
        assert (line["width"], line["height"]) == (320, 240)
        assert tuple(line["shape"]) == (240, 320, 3)
        assert line["capture_ns"] > 1_600_000_000 * 10**9  # a wall-clock time in ns
    seqs = [line["seq"] for line in lines]
    assert seqs == sorted(set(seqs)), f"seq must increase: {seqs}"
    assert "rejected" not in proc.stderr


async def test_raw_subscriber_skips_bad_messages(nats: NatsServer) -> None:
    """What the example refuses, using the schema file: it keeps going past each one."""
    camera = "rawbad"
    proc = await asyncio.create_subprocess_exec(
        *command(nats.url, camera, "--count", "2", "--timeout", "20"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stderr is not None and proc.stdout is not None
    ready = await asyncio.wait_for(proc.stderr.readline(), 20)
    assert b"listening on lensbus.frames.rawbad" in ready

    image = np.zeros((24, 32, 3), np.uint8)
    good = FrameEnvelope(
        camera=camera, seq=7, capture_ns=1, width=32, height=24, data=encode_jpeg(image)
    )
    raw = good.model_dump(mode="python")
    bad = [
        b"\xc1 not msgpack",
        msgpack.packb(raw | {"v": 2}),
        msgpack.packb({k: v for k, v in raw.items() if k != "data"}),
        msgpack.packb(raw | {"width": 100000}),
        msgpack.packb(raw | {"data": "a str, not bin"}),
        msgpack.packb(raw | {"data": b"not a jpeg"}),
    ]
    nc = await nats_py.connect(nats.url)
    subject = Subjects().frames(camera)
    for data in bad[:3]:
        await nc.publish(subject, data)
    await nc.publish(subject, encode(good))
    for data in bad[3:]:
        await nc.publish(subject, data)
    await nc.publish(subject, encode(good.model_copy(update={"seq": 8})))
    await nc.flush()
    await nc.close()

    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert [line["seq"] for line in lines] == [7, 8]
    assert all(tuple(line["shape"]) == (24, 32, 3) for line in lines)
    errors = err.decode()
    assert errors.count("rejected a message") == len(bad), errors
    expected = (
        "v=2",
        "data: required field missing",
        "100000 > maximum 8192",
        "data: expected string (binary), got str",
        "not a decodable JPEG",
    )
    for fragment in expected:
        assert fragment in errors, errors
