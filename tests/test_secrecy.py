"""A service that runs other people's code in its children hides its environment from them
(``lensbus.secrecy``): before, a project's process read the projects service's NATS password
and the auth callout's seed from ``/proc/<parent>/environ``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# The parent holds a secret in its environment; a child of the same OS user (forked: an
# unprivileged user could not exec this interpreter) tries to read the parent's environ.
SCRIPT = """
import ctypes, os, sys
from lensbus.secrecy import hide_environment
if os.geteuid() == 0:  # root reads every environ: the services run as a plain user
    os.setgid(65534)
    os.setuid(65534)
if sys.argv[1] == "hide":
    assert hide_environment()
else:  # a change of user made us not dumpable already: as a service started plainly is
    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)
parent = os.getpid()
r, w = os.pipe()
if os.fork() == 0:
    try:
        seen = str(b"LENSBUS_SECRET" in open(f"/proc/{parent}/environ", "rb").read())
    except PermissionError:
        seen = "PermissionError"
    os.write(w, seen.encode())
    os._exit(0)
os.wait()
print(os.read(r, 100).decode())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
@pytest.mark.parametrize(("mode", "expected"), [("show", "True"), ("hide", "PermissionError")])
def test_children_cannot_read_a_hidden_environment(mode: str, expected: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        env={**os.environ, "LENSBUS_SECRET": "s3cret"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected
