"""``lensbus models upload|list``, ``deploy``, ``rollback``, ``status`` as a user runs them:
``python -m lensbus.cli.main`` in a subprocess, against a real deployer and nats-server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_deployer import broken_packages, build_face, start_deployer

from lensbus.natsserver import NatsServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def face_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_face(tmp_path_factory.mktemp("cli-face") / "face-ssd")


def lensbus(*args: str, url: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LENSBUS_")}
    if url is not None:
        env["LENSBUS_NATS_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "lensbus.cli.main", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_upload_list_deploy_rollback_status(
    fresh_nats: NatsServer, start_service, tmp_path: Path, face_pkg: Path
) -> None:
    start_deployer(start_service, fresh_nats, tmp_path, max_package_bytes=16 * 1024 * 1024)
    url = fresh_nats.url

    r = lensbus("models", "upload", str(face_pkg), url=url)
    assert r.returncode == 0, r.stderr
    assert "stored face-ssd:1 (opencv detection" in r.stdout
    # The progress bar (stderr, plain text when not a terminal) reaches 100%.
    bars = [line for line in r.stderr.splitlines() if line.startswith("uploading face-ssd [")]
    assert len(bars) >= 5 and "100%" in bars[-1] and "MiB/s" in bars[-1]

    r = lensbus("models", "upload", str(face_pkg), "--quiet", url=url)
    assert r.returncode == 0 and "already stored with identical content" in r.stdout
    assert r.stderr == ""

    changed = build_face(tmp_path / "changed", "1", labels=["background", "a-face"])
    r = lensbus("models", "upload", str(changed), "-q", url=url)
    assert r.returncode == 1
    assert "refused (conflict)" in r.stderr and "another version" in r.stderr

    archive, reason = broken_packages(face_pkg, tmp_path)["sha256 mismatch"]
    r = lensbus("models", "upload", str(archive), "-q", url=url)
    assert r.returncode == 1 and "refused (invalid_package)" in r.stderr and reason in r.stderr

    r = lensbus("models", "upload", str(tmp_path / "nothing-here"), url=url)
    assert r.returncode == 2 and "no such package folder" in r.stderr

    v2 = build_face(tmp_path / "v2", "2")
    assert lensbus("models", "upload", str(v2), "-q", "--nats-url", url).returncode == 0

    r = lensbus("models", "list", "--json", url=url)
    assert r.returncode == 0, r.stderr
    models = json.loads(r.stdout)
    assert [(m["name"], m["version"], m["framework"], m["task"]) for m in models] == [
        ("face-ssd", "1", "opencv", "detection"),
        ("face-ssd", "2", "opencv", "detection"),
    ]
    assert all(m["size"] > 10_000_000 and len(m["sha256"]) == 64 for m in models)
    r = lensbus("models", "list", url=url)
    assert r.returncode == 0 and r.stdout.splitlines()[0].split()[:4] == [
        "NAME",
        "VERSION",
        "FRAMEWORK",
        "TASK",
    ]
    assert len(r.stdout.splitlines()) == 3

    r = lensbus("deploy", "face-ssd:1", "--group", "lobby", url=url)
    assert r.returncode == 0, r.stderr
    assert "group lobby: desired model is now face-ssd:1" in r.stdout
    r = lensbus("rollback", "--group", "lobby", url=url)
    assert r.returncode == 1 and "nothing to roll back to" in r.stderr
    r = lensbus("deploy", "face-ssd", "--group", "lobby", url=url)  # latest: 2
    assert r.returncode == 0 and "now face-ssd:2 (previous: face-ssd:1)" in r.stdout
    r = lensbus("deploy", "face-ssd:7", "--group", "lobby", url=url)
    assert r.returncode == 1 and "refused (not_found)" in r.stderr and "1, 2" in r.stderr
    r = lensbus("deploy", "face ssd", "--group", "lobby", url=url)
    assert r.returncode == 2 and "NAME[:VERSION]" in r.stderr

    r = lensbus("status", "--group", "lobby", "--json", url=url)
    assert r.returncode == 0, r.stderr
    (lobby,) = json.loads(r.stdout)
    assert lobby["deployment"]["model"] == {"name": "face-ssd", "version": "2"}
    assert lobby["deployment"]["history"] == [{"name": "face-ssd", "version": "1"}]

    r = lensbus("rollback", "--group", "lobby", url=url)
    assert r.returncode == 0
    assert "desired model is now face-ssd:1 (manual rollback from face-ssd:2)" in r.stdout
    r = lensbus("status", url=url)
    assert r.returncode == 0
    assert "group lobby" in r.stdout and "desired   face-ssd:1  [rolled_back]" in r.stdout


def test_cli_exit_3_when_nothing_answers(fresh_nats: NatsServer) -> None:
    # NATS runs, no deployer does.
    for args in (["models", "list"], ["status"], ["deploy", "m:1", "-g", "lobby"]):
        r = lensbus(*args, url=fresh_nats.url, timeout=30)
        assert r.returncode == 3, (args, r.stderr)
        assert "is lensbus-deployer running" in r.stderr
    # No NATS at all.
    r = lensbus("models", "list", "--nats-url", "nats://127.0.0.1:1", timeout=30)
    assert r.returncode == 3 and "cannot reach NATS at nats://127.0.0.1:1" in r.stderr
    assert "--nats-url or LENSBUS_NATS_URL" in r.stderr
