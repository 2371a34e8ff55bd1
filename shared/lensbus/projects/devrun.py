"""``lensbus project run ./dir --camera cam1``: a project run from its folder against a live
system, for development.

The host runs as a child, spoken to over the same protocol the projects service uses (this
sends "go" itself once it is ready); its log (stderr) goes to the terminal as it is, and
every output of the project (``ctx.publish``, overlays, drawn frames, its events) is printed
as one JSON line on stdout: the host echoes what it sends over the protocol
(``LENSBUS_PROJECT_ECHO``), as the project's own NATS user may not read it back. A change to
any file of the folder (mtimes polled every :data:`POLL_S`) stops the host and starts it
again; a start that fails waits for the next change. Ctrl-C stops it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import IO, Any

from lensbus.codec import DecodeError, decode
from lensbus.errors import InvalidName
from lensbus.projects import control
from lensbus.projects.host import one_line
from lensbus.projects.loading import load_manifest
from lensbus.schemas.event import Event
from lensbus.schemas.frame import FrameEnvelope
from lensbus.schemas.project import Overlay, ProjectMessage
from lensbus.subjects import Subjects

POLL_S = 0.5
# How long a host may take to stop before it is killed.
STOP_S = 10.0

Snapshot = dict[str, tuple[int, int]]


def snapshot(folder: Path) -> Snapshot:
    """(mtime_ns, size) of every file of the folder, less caches and hidden ones."""
    files: Snapshot = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for name in names:
            if name.startswith(".") or name.endswith((".pyc", "~")):
                continue
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):  # removed while we looked
                st = os.stat(path)
                files[path] = (st.st_mtime_ns, st.st_size)
    return files


def describe(subjects: Subjects, subject: str, data: bytes) -> dict[str, Any]:
    """One message a project sent, as a printable dict."""
    try:
        try:
            _, camera, topic = subjects.project_parts(subject)
        except InvalidName as exc:  # a project sends nothing else (its NATS user may not)
            return {"unreadable": subject, "error": str(exc)}
        if topic == "_event":
            e = decode(data, Event)
            line = {"event": e.label, "camera": e.camera, "seq": e.seq, "score": e.score}
            return {**line, "detail": e.detail}
        if topic == "_overlay":
            o = decode(data, Overlay)
            shapes = [s.model_dump(mode="json") for s in o.shapes]
            return {"overlay": camera, "seq": o.seq, "ttl_s": o.ttl_s, "shapes": shapes}
        if topic == "_frame":
            f = decode(data, FrameEnvelope)
            return {"frame": camera, "seq": f.seq, "size": [f.width, f.height]}
        m = decode(data, ProjectMessage)
        return {"topic": topic, "camera": camera, "seq": m.seq, "payload": m.payload}
    except DecodeError as exc:
        return {"unreadable": subject, "error": str(exc)}


class DevRun:
    """The loop of ``lensbus project run``."""

    def __init__(
        self,
        project_dir: Path,
        env: dict[str, str],
        subjects: Subjects,
        out: IO[str],
    ) -> None:
        self.project_dir = project_dir
        self.env = env
        self.subjects = subjects
        self.out = out
        self.stop = asyncio.Event()

    def say(self, text: str) -> None:
        print(f"[lensbus project run] {text}", file=sys.stderr, flush=True)

    def show(self, line: dict[str, Any]) -> None:
        print(json.dumps(line, default=repr), file=self.out, flush=True)

    async def _spawn(self) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lensbus.projects.host",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=self.env,
            start_new_session=True,  # Ctrl-C reaches us; we stop the host in order
        )

    async def _talk(self, proc: asyncio.subprocess.Process) -> None:
        """Read the host's protocol: "go" once it is ready; say when it fails."""
        assert proc.stdout is not None and proc.stdin is not None
        async for line in proc.stdout:
            try:
                message = control.parse(line)
            except ValueError:
                continue
            if message["t"] == "ready":
                self.say("ready: handling results")
                proc.stdin.write(control.dump({"t": "go", "after": None}).encode())
            elif message["t"] == "failed":
                self.say(f"start failed: {message.get('reason')}")
            elif message["t"] == "output":
                data = base64.b64decode(message.get("data", ""))
                self.show(describe(self.subjects, str(message.get("subject")), data))

    async def _end(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.write(control.dump({"t": "stop"}).encode())
            try:
                await asyncio.wait_for(proc.wait(), STOP_S)
            except TimeoutError:
                self.say(f"the host did not stop in {STOP_S:.0f} s: killed")
                proc.kill()
                await proc.wait()

    async def _changed(self, before: Snapshot) -> Snapshot | None:
        """The folder's new snapshot once a file changes; None when told to stop."""
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), POLL_S)
            now = snapshot(self.project_dir)
            if now != before:
                return now
        return None

    async def _once(self, files: Snapshot) -> Snapshot | None:
        """Run the host until a file changes (the new snapshot) or Ctrl-C (None)."""
        try:
            load_manifest(self.project_dir)
        except Exception as exc:  # a bad project.json: say why, wait for a fix
            self.say(f"project.json: {one_line(exc)}")
            return await self._changed(files)
        proc = await self._spawn()
        talk = asyncio.create_task(self._talk(proc))
        try:
            changed = await self._changed(files)
        finally:
            await self._end(proc)
            talk.cancel()
        return changed

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        files: Snapshot | None = snapshot(self.project_dir)
        while files is not None:
            files = await self._once(files)
            if files is not None:
                self.say("a file changed: restarting")
        return 0


def run_dev(
    project_dir: str | Path,
    cameras: list[str] | None,
    nats_url: str,
    user: str = "",
    password: str = "",
    prefix: str = "lensbus",
    out: IO[str] | None = None,
    tls_ca: str = "",
) -> int:
    """Run the project in ``project_dir`` on ``cameras`` (None or []: every camera) until
    Ctrl-C, restarting it when a file changes; its outputs printed on ``out`` (stdout)."""
    folder = Path(project_dir).resolve()
    env = {
        **os.environ,
        control.ENV_DIR: str(folder),
        control.ENV_NATS_URL: nats_url,
        control.ENV_USER: user,
        control.ENV_PASSWORD: password,
        control.ENV_PREFIX: prefix,
        control.ENV_CAMERAS: ",".join(cameras) if cameras else "*",
        control.ENV_INSTANCE: "dev",
        control.ENV_ECHO: "1",  # its outputs come back over the protocol, to be printed
        control.ENV_TLS_CA: tls_ca,
    }
    return asyncio.run(DevRun(folder, env, Subjects(prefix), out or sys.stdout).run())
