"""A project's process: ``python -m lensbus.projects.host`` (the protocol and its environment:
:mod:`lensbus.projects.control`).

It keeps its original stdout for the protocol and points fd 1 and ``sys.stdout`` at stderr
before any user code runs (a handler's ``print`` goes to the log). It connects as the
project's own NATS user, loads ``project.json`` and the handler, runs ``on_start``,
subscribes to the results (and frames, when the project asks for them), says "ready" and
holds every result until "go"; then it calls the handler one result at a time through the
mailbox (:mod:`lensbus.projects.mailbox`), a sync handler in a worker thread of its own, an
async one on the event loop. A beat thread reports every ``BEAT_S``, even while a handler
holds the loop or the worker, so the supervisor can see a hang.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import inspect
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from lensbus import bus
from lensbus.codec import DecodeError, decode
from lensbus.demand import Wanter
from lensbus.logs import RateLimit, log_limited, setup_logging
from lensbus.projects import control
from lensbus.projects.context import Context, HostEnv, Outbox, parse_cameras
from lensbus.projects.control import Protocol, take_stdout
from lensbus.projects.loading import load_manifest, load_module
from lensbus.projects.mailbox import DeeplensBridge, FrameRing, Mailbox
from lensbus.projects.state import State
from lensbus.schemas.frame import FrameEnvelope
from lensbus.schemas.project import ProjectManifest
from lensbus.schemas.result import Result
from lensbus.subjects import Subjects

log = logging.getLogger("lensbus.projects.host")

# How long a result waits for its frame (frames come first, as capture sends them first).
FRAME_WAIT_S = 1.0
# How long a DeepLens function may take to leave its loop once told to stop.
DEEPLENS_STOP_S = 5.0
# Distinct handler errors logged with their traceback; past it one line per new cause.
MAX_CAUSES = 256


def one_line(exc: BaseException) -> str:
    """An exception as its type and message on one line (a "failed" reason, a log cause)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Host:
    """One project's run: start, hold, handle, stop."""

    def __init__(self, env: HostEnv, proto: Protocol) -> None:
        self.env = env
        self.proto = proto
        self.subjects = Subjects(env.prefix)
        self.cameras = env.cameras
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="handler")
        self.mailbox: Mailbox[Result] = Mailbox(1)
        self.wake = asyncio.Event()
        self.done = asyncio.Event()
        self.taken_over = asyncio.Event()  # "go" came and the state was re-read
        self.frames: FrameRing | None = None
        self.handled = 0
        self.errors = 0
        self.last: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.busy_since: float | None = None
        self.stopping = False
        self._causes: set[str] = set()
        self._limit = RateLimit(60.0)
        self._beats = threading.Event()
        self.nc: NATS | None = None
        self.ctx: Context | None = None
        self.module: ModuleType | None = None
        self.manifest: ProjectManifest | None = None
        self.deeplens: DeeplensBridge | None = None  # runtime "deeplens"
        self.seen: set[str] = set()  # cameras whose frames came
        self.wanter: Wanter | None = None
        self._go_task: asyncio.Task[None] | None = None  # held: the loop keeps weak refs

    # ---- start ----------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        manifest = self.manifest = load_manifest(self.env.project_dir)
        self.mailbox.size = manifest.limits.mailbox  # the same mailbox: a "go" may have come
        self.nc = await self._connect(manifest.name)
        state = State(manifest.name, loop, self.subjects)
        await state.open(self.nc.jetstream())
        outbox = Outbox(self.nc, loop, self._echo if self.env.echo else None)
        self.ctx = Context(manifest, self.env.instance, self.subjects, outbox.send, state)
        self.outbox = outbox
        if manifest.runtime == "deeplens":  # its script runs at "go"; a syntax error fails now
            script = self.env.project_dir / manifest.handler
            compile(script.read_bytes(), str(script), "exec")
            self.deeplens = DeeplensBridge(
                manifest, self.subjects, self.env.models_dir, outbox.send
            )
            await self._take_frames(manifest.name)
            return
        self.module = load_module(self.env.project_dir, manifest.handler)
        if not callable(getattr(self.module, "on_result", None)):
            raise AttributeError(f"{manifest.handler} has no on_result(result, ctx)")
        await self._hook("on_start", self.ctx)
        if manifest.frames:  # OpenCV now: too little memory_mb for it fails the start, clearly
            importlib.import_module("lensbus.images")
            self.frames = FrameRing()
            await self._take_frames(manifest.name)
        await self.nc.subscribe(self.subjects.all_results(), cb=self._on_result)
        await self.nc.flush()

    async def _take_frames(self, project: str) -> None:
        """Every frame of its cameras: capture encodes a device stream's every frame for
        whoever says it reads it (lensbus.demand): its cameras, or each camera seen."""
        assert self.nc is not None
        await self.nc.subscribe(self.subjects.all_frames(), cb=self._on_frame)
        cameras = lambda: self.seen if self.cameras is None else self.cameras  # noqa: E731
        self.wanter = Wanter(self.nc, self.subjects, cameras, f"project.{project}").start()

    def _echo(self, subject: str, data: bytes) -> None:
        text = base64.b64encode(data).decode()
        self.proto.write({"t": "output", "subject": subject, "data": text})

    async def _connect(self, project: str) -> NATS:
        opts: dict[str, Any] = {"error_cb": self._nats_error, "pending_size": bus.PENDING_BYTES}
        if self.env.user:
            opts["user"] = self.env.user
            opts["password"] = self.env.password
        if self.env.tls_ca:
            opts["tls"] = bus.tls_context(self.env.tls_ca)
        name = f"project.{project}.{self.env.instance}"
        return await bus.connect(self.env.nats_url, name=name, timeout_s=10.0, **opts)

    async def _nats_error(self, exc: Exception) -> None:
        cause = type(exc).__name__
        log_limited(log, self._limit, f"nats:{cause}", logging.WARNING, "NATS: %s", one_line(exc))

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A sync function in the worker thread, an async one on the loop."""
        if inspect.iscoroutinefunction(fn):
            return await fn(*args)
        out = await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)
        if inspect.isawaitable(out):  # a sync def returning a coroutine
            return await out
        return out

    async def _hook(self, name: str, *args: Any) -> None:
        fn = getattr(self.module, name, None)
        if callable(fn):
            await self._call(fn, *args)

    # ---- input ----------------------------------------------------------------------------

    def _reject(self, reason: str, exc: Exception) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        msg = "dropped a message (%s): %s"
        log_limited(log, self._limit, reason, logging.WARNING, msg, reason, exc)

    def _wanted(self, camera: str) -> bool:
        return self.cameras is None or camera in self.cameras

    async def _on_result(self, msg: Msg) -> None:
        try:
            result = decode(msg.data, Result)
        except DecodeError as exc:
            self._reject(f"result_{exc.reason}", exc)
            return
        if self._wanted(result.camera) and not self.stopping:
            self.mailbox.put(result)
            self.wake.set()

    async def _on_frame(self, msg: Msg) -> None:
        try:
            frame = decode(msg.data, FrameEnvelope)
        except DecodeError as exc:
            self._reject(f"frame_{exc.reason}", exc)
            return
        self.seen.add(frame.camera)
        if not self._wanted(frame.camera):
            return
        if self.frames is not None:
            self.frames.add(frame)
        if self.deeplens is not None:
            self.deeplens.offer(frame)

    # ---- handling -------------------------------------------------------------------------

    async def dispatch(self) -> None:
        """Hand results to the handler one at a time until "stop"."""
        await self.taken_over.wait()
        while not self.stopping:
            result = self.mailbox.take()
            if result is None:
                self.wake.clear()
                await self.wake.wait()
                continue
            await self.handle(result)

    async def handle(self, result: Result) -> None:
        assert self.ctx is not None and self.module is not None
        frame = None
        if self.frames is not None:
            frame = await self.frames.wait(result.camera, result.seq, FRAME_WAIT_S)
        self.ctx.begin(result, frame)
        self.busy_since = time.monotonic()
        try:
            await self._call(self.module.on_result, result, self.ctx)
        except BaseException as exc:  # the project's bug: counted, the next goes on
            task = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and task and task.cancelling():
                raise  # this host is stopping, not a CancelledError of the handler's own
            self.errors += 1
            self._log_cause(exc)
        finally:
            self.busy_since = None
            self.handled += 1
            self.last[result.camera] = result.seq

    def _log_cause(self, exc: BaseException) -> None:
        cause = one_line(exc)[:300]
        if cause in self._causes:
            return
        if len(self._causes) < MAX_CAUSES:
            self._causes.add(cause)
            # The traceback from the project's own code on: the host's frames are noise.
            tb, folder = exc.__traceback__, str(self.env.project_dir.resolve())
            while tb is not None and not tb.tb_frame.f_code.co_filename.startswith(folder):
                tb = tb.tb_next
            exc = exc.with_traceback(tb or exc.__traceback__)
            log.error("handler raised %s (logged once per cause)", cause, exc_info=exc)
        else:
            log_limited(log, self._limit, "causes", logging.ERROR, "handler raised %s", cause)

    # ---- control --------------------------------------------------------------------------

    def on_control(self, message: dict[str, Any]) -> None:
        """One message from the supervisor (on the loop)."""
        kind = message["t"]
        if kind == "go":
            after = {str(k): int(v) for k, v in (message.get("after") or {}).items()}
            self._go_task = asyncio.get_running_loop().create_task(self._go(after), name="go")
        elif kind in ("stop", "eof"):
            self.done.set()
            self.taken_over.set()  # a stop before the take-over finished: nothing to handle
        elif kind == "cameras":
            self.cameras = parse_cameras(message.get("cameras", "*"))  # [] is none
            self.mailbox.retain(self.cameras)
        else:
            log.warning("unknown control message %r", kind)

    async def _go(self, after: dict[str, int]) -> None:
        """Take over: first re-read the state the version before us left (it saved it before
        answering "stopped"), then handle results; until then they are held, none dropped."""
        if self.ctx is not None:
            await self.ctx.state.reload()
        self.mailbox.go(after)
        self.taken_over.set()
        self.wake.set()
        if self.deeplens is not None and self.manifest is not None:
            loop = asyncio.get_running_loop()
            script = self.env.project_dir / self.manifest.handler
            self.deeplens.start(script, lambda: loop.call_soon_threadsafe(self.done.set))

    def beat(self) -> control.Beat:
        busy, handled, last = self.busy_since, self.handled, self.last
        dropped = self.mailbox.dropped
        if self.deeplens is not None:  # always in its loop: busy is not a hang
            handled, dropped, last = self.deeplens.beat()
        return control.Beat(
            busy_s=None if busy is None else round(time.monotonic() - busy, 3),
            handled=handled,
            errors=self.errors,
            dropped=dropped,
            last=dict(last),
            metrics=self.ctx.samples() if self.ctx is not None else [],
            rejected=dict(self.rejected),
        )

    def beat_loop(self) -> None:
        while not self._beats.wait(control.BEAT_S):
            self.proto.write(control.beat_message(self.beat()))

    # ---- run and stop ---------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()

        def deliver(message: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(self.on_control, message)

        threading.Thread(target=control.read_lines, args=(sys.stdin, deliver), daemon=True).start()
        try:
            await self.start()
        except Exception as exc:  # the start failed: the cause goes to the supervisor
            log.error("start failed: %s", one_line(exc), exc_info=exc)
            self.proto.write({"t": "failed", "reason": one_line(exc)})
            return 1
        self.proto.write({"t": "ready"})
        threading.Thread(target=self.beat_loop, name="beat", daemon=True).start()
        dispatcher = loop.create_task(self.dispatch(), name="dispatch")
        stop = loop.create_task(self.done.wait(), name="wait-stop")
        await asyncio.wait({dispatcher, stop}, return_when=asyncio.FIRST_COMPLETED)
        if dispatcher.done() and dispatcher.exception() is not None:  # a bug of the host's
            log.error("dispatch failed", exc_info=dispatcher.exception())
            stop.cancel()
            return 1  # the supervisor restarts the host
        self.stopping = True
        self.wake.set()
        await dispatcher
        code = await self._stop_deeplens()
        self._beats.set()
        self.proto.write(control.beat_message(self.beat()))  # the counts up to the stop
        # on_stop and the state writes come before "stopped": the next version re-reads the
        # state when it takes over, so it sees everything this one saved.
        await self._on_stop()
        if code == 0:
            last = self.deeplens.beat()[2] if self.deeplens is not None else self.last
            self.proto.write({"t": "stopped", "last": dict(last)})
        await self._close()
        return code

    async def _stop_deeplens(self) -> int:
        """Stop the DeepLens function; 1 when it ended by failing (the supervisor restarts)."""
        if self.deeplens is None:
            return 0
        await asyncio.to_thread(self.deeplens.stop, DEEPLENS_STOP_S)
        error = self.deeplens.error
        if error is None:
            return 0
        self.errors += 1
        log.error("the DeepLens function failed: %s", one_line(error), exc_info=error)
        return 1

    async def _on_stop(self) -> None:
        """on_stop, then the state it and the handler wrote reaches the bucket."""
        assert self.ctx is not None
        self.ctx.begin(None)
        try:
            await self._hook("on_stop", self.ctx)
        except (Exception, SystemExit) as exc:
            log.error("on_stop raised %s", one_line(exc), exc_info=exc)
        await self.ctx.state.flush()

    async def _close(self) -> None:
        """What was sent goes out, then the connection closes."""
        assert self.nc is not None
        if self.wanter is not None:
            await self.wanter.stop()
        await self.outbox.flush()
        try:
            await self.nc.flush(timeout=5)  # what was sent reaches the server before we exit
            await asyncio.wait_for(self.nc.drain(), 5.0)
        except Exception as exc:  # closing anyway
            log.warning("drain: %s", one_line(exc))
        self.worker.shutdown(wait=False)


def main() -> int:
    proto = Protocol(take_stdout())
    setup_logging(os.environ.get("LENSBUS_PROJECT_LOG_LEVEL", "INFO"), "project")
    try:
        env = HostEnv.from_env()
    except KeyError as exc:
        proto.write({"t": "failed", "reason": f"missing environment variable {exc}"})
        return 1
    code = asyncio.run(Host(env, proto).run())
    # A handler's thread that never returns must not keep the process: exit now.
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
