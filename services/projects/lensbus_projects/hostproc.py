"""One project's process (the host, ``python -m lensbus.projects.host``) as the supervisor
sees it: spawned with its environment and limits, spoken to over its stdin/stdout in the
control protocol (:mod:`lensbus.projects.control`), its stderr in a log file.

The child is set up before it runs any Python of its own (``preexec_fn``): a session of its
own (a signal to the service's terminal never reaches it), PDEATHSIG (SIGKILL when the
service dies, even by SIGKILL: no orphan keeps handling results), and its memory bounded by
``limits.memory_mb``: an allocation past it fails inside the project (a MemoryError), never
in the service.

The bound is RLIMIT_DATA (heap and private writable mappings: what the project allocates),
not RLIMIT_AS: the address space counts every shared library's mappings, and a host that has
imported numpy and OpenCV already spans ~300 MiB of it (~100 MiB resident, ~90 MiB data), so
an address-space limit of 256 MiB would refuse the start of a project that allocates nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lensbus.projects import control
from lensbus_projects import metrics

log = logging.getLogger(__name__)

# Longest control line read back (a beat with a few hundred metrics fits many times over).
LINE_LIMIT = 1024 * 1024
MiB = 1024 * 1024


def _child_setup(memory_bytes: int) -> Callable[[], None]:
    def setup() -> None:
        if sys.platform.startswith("linux"):
            import ctypes

            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))

    return setup


class HostProcess:
    """A running host: ``messages`` gets every control message it writes (``None`` once
    when its stdout closes); ``beat`` is its latest beat and ``beat_at`` when it came."""

    def __init__(self, project: str, version: str, log_path: Path) -> None:
        self.project = project
        self.version = version
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.beat = control.Beat()
        self.beat_at = time.monotonic()
        self.started_at = time.monotonic()
        self.ready = False
        self.killed = False
        self.kill_reason = ""  # why the watchdog killed it (hang, silent)
        self._reader: asyncio.Task[None] | None = None
        self._bad_line_logged = False

    async def start(
        self, python: str, env: Mapping[str, str], memory_mb: int, cwd: Path
    ) -> HostProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as err:  # noqa: ASYNC230 - opening a local log file
            self.proc = await asyncio.create_subprocess_exec(
                python,
                "-m",
                "lensbus.projects.host",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env=dict(env),
                cwd=str(cwd),
                start_new_session=True,
                preexec_fn=_child_setup(memory_mb * MiB),
                limit=LINE_LIMIT,
            )
        self.started_at = self.beat_at = time.monotonic()
        self._reader = asyncio.create_task(self._read(), name=f"host-{self.project}")
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        out = self.proc.stdout
        while True:
            try:
                line = await out.readline()
            except (ValueError, asyncio.LimitOverrunError):  # a line past LINE_LIMIT
                self._bad_line("a control line longer than the limit")
                continue
            if not line:
                break
            try:
                message = control.parse(line)
            except ValueError as exc:
                self._bad_line(str(exc))
                continue
            if message["t"] == "beat":
                try:
                    self.beat = control.parse_beat(message)
                except (TypeError, ValueError) as exc:
                    self._bad_line(f"bad beat: {exc}")
                    continue
                self.beat_at = time.monotonic()
            elif message["t"] == "ready":  # it beats from now on: its silence counts from here,
                self.beat_at = time.monotonic()  # not from the spawn (a start may be long)
            await self.messages.put(message)
        await self.messages.put(None)

    def _bad_line(self, why: str) -> None:
        metrics.RECORDS_REJECTED.labels("bad_line").inc()
        if not self._bad_line_logged:  # once per process: a broken host would flood the log
            self._bad_line_logged = True
            log.warning(
                "project %s %s: unreadable control line (%s)", self.project, self.version, why
            )

    async def send(self, message: dict[str, Any]) -> bool:
        """Write one control message; False when the host is gone."""
        if self.proc is None or self.proc.stdin is None or self.proc.returncode is not None:
            return False
        try:
            self.proc.stdin.write(control.dump(message).encode())
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError, RuntimeError):
            return False
        return True

    async def expect(self, kinds: tuple[str, ...], within_s: float) -> dict[str, Any] | None:
        """The next message of one of ``kinds`` (beats are taken in passing); None when the
        host exits or ``within_s`` passes first."""
        deadline = time.monotonic() + within_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                message = await asyncio.wait_for(self.messages.get(), left)
            except TimeoutError:
                return None
            if message is None:
                await self.messages.put(None)  # later readers see the end too
                return None
            if message["t"] in kinds:
                return message

    def kill(self) -> None:
        """SIGKILL its whole session (a handler's own children go with it)."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.killed = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    async def wait(self, within_s: float | None = None) -> int | None:
        if self.proc is None:
            return None
        try:
            code = await asyncio.wait_for(self.proc.wait(), within_s)
        except TimeoutError:
            return None
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._reader, 1.0)
        return code

    async def close(self) -> None:
        """Kill it if it still runs and reap it."""
        self.kill()
        await self.wait(5.0)
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()

    def log_tail(self, lines: int = 5) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())
