"""Running a DeepLens inference function in the host process: :func:`run_function`.

A DeepLens function is a script with its own infinite loop (``awscam.getLastFrame()``,
``doInference``, ``parseResult``, draw, publish), started by Greengrass when the Lambda
loads: the samples call ``infinite_infer_run()`` at module level or under
``if __name__ == '__main__'``, Greengrass's hello-world blueprint from a ``Timer`` thread.
So it is run as a script (``runpy``, ``__name__ == '__main__'``) and, once the script
returns, the host keeps it alive until it is told to stop, as Greengrass kept a pinned
Lambda: its threads go on working.

The host runs one project per process, so what the function sees is set process-wide:
``awscam``, ``mo`` and ``greengrasssdk`` in ``sys.modules``, the local-display FIFO path
intercepted (:mod:`.display`), ``AWS_IOT_THING_NAME`` set (the samples build their IoT topic
``$aws/things/<thing>/infer`` from it; here it is the project's name), and the bridge in
:data:`STATE`.
"""

from __future__ import annotations

import logging
import os
import runpy
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Counter

from lensbus.errors import ProjectError
from lensbus.projects.deeplens.bridge import Bridge, FunctionStopped

log = logging.getLogger("lensbus.projects.deeplens")

# How often the host's thread looks at `stopping` once the script has returned.
IDLE_POLL_S = 0.1
# Messages a function publishes before its first frame (the camera they belong to is not
# known yet) are held, at most this many, and sent with the first frame's camera.
MAX_HELD = 64


@dataclass
class FunctionState:
    """What the running function has seen: the bridge and its newest frame."""

    bridge: Bridge | None = None
    camera: str | None = None
    seq: int = 0
    capture_ns: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    held: list[Callable[[str], None]] = field(default_factory=list)
    warned: set[str] = field(default_factory=set)
    # What the function did, for the host's beats (handled = frames it got).
    frames: int = 0
    skipped: int = 0
    messages: int = 0
    drawn: int = 0

    def saw(self, camera: str, seq: int, capture_ns: int) -> None:
        """The function got a frame: what it publishes next belongs to it."""
        with self.lock:
            first = self.camera is None
            self.camera, self.seq, self.capture_ns = camera, seq, capture_ns
            held, self.held = self.held, []
        if first:
            for send in held:
                send(camera)

    def on_camera(self, send: Callable[[str], None]) -> None:
        """Call ``send(camera)`` now, or with the first frame's camera when none came yet."""
        with self.lock:
            camera = self.camera
            if camera is None:
                if len(self.held) < MAX_HELD:
                    self.held.append(send)
                    return
                camera = ""
        if camera:
            send(camera)
        else:
            reject(
                "held_overflow", f"more than {MAX_HELD} messages before the first frame: dropped"
            )

    def reset(self, bridge: Bridge | None) -> None:
        with self.lock:
            self.bridge, self.camera, self.seq, self.capture_ns = bridge, None, 0, 0
            self.held, self.warned = [], set()
            self.frames = self.skipped = self.messages = self.drawn = 0


STATE = FunctionState()
# Greengrass's variable naming the device (the samples' IoT topic is built from it): here the
# project's name, whatever the process inherited.
THING_ENV = "AWS_IOT_THING_NAME"
_saved_env: dict[str, str | None] = {}


def current() -> Bridge:
    """The bridge of the function running in this process."""
    bridge = STATE.bridge
    if bridge is None:
        raise ProjectError(
            "no DeepLens function is running in this process: awscam.getLastFrame and "
            "greengrasssdk work inside a project run by lensbus (runtime 'deeplens')"
        )
    return bridge


REJECTED = Counter(
    "lensbus_deeplens_rejected_total",
    "What a DeepLens function's process dropped (reason: corrupt_frame, display_not_jpeg, "
    "display_overflow, held_overflow)",
    ["reason"],
)


def reject(reason: str, message: str) -> None:
    """Bad input dropped: counted, logged the first time its reason happens."""
    REJECTED.labels(reason).inc()
    warn_once(reason, message)


def warn_once(cause: str, message: str) -> None:
    """Log ``message`` the first time ``cause`` happens (a function repeats its mistakes)."""
    if cause not in STATE.warned:
        STATE.warned.add(cause)
        log.warning("%s", message)


def _quiet_stop(args: threading.ExceptHookArgs) -> None:
    # A function's own threads (LocalDisplay) end with FunctionStopped when the host stops
    # it: that is the way out, not an error worth a traceback.
    if args.exc_type is not None and issubclass(args.exc_type, FunctionStopped):
        return
    _previous_hook(args)


_previous_hook = threading.excepthook


def install(bridge: Bridge) -> None:
    """Make the DeepLens device library importable and route the function's I/O to ``bridge``."""
    from lensbus.projects.deeplens import awscam, display, greengrasssdk, mo

    STATE.reset(bridge)
    sys.modules["awscam"] = awscam
    sys.modules["mo"] = mo
    sys.modules["greengrasssdk"] = greengrasssdk
    _saved_env.setdefault(THING_ENV, os.environ.get(THING_ENV))
    os.environ[THING_ENV] = bridge.project
    display.intercept()
    threading.excepthook = _quiet_stop


def uninstall() -> None:
    """Undo :func:`install`: the modules, the interception, the bridge (for tests; a host
    process ends with its function)."""
    from lensbus.projects.deeplens import display

    for name in ("awscam", "mo", "greengrasssdk"):
        sys.modules.pop(name, None)
    display.restore()
    threading.excepthook = _previous_hook
    for key, value in _saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved_env.clear()
    STATE.reset(None)


def run_function(path: str | Path, bridge: Bridge) -> None:
    """Run the DeepLens function script ``path`` until ``bridge`` stops.

    Call it from a thread of its own after "go". It returns once the bridge is stopping (the
    function's next ``getLastFrame`` raises :class:`FunctionStopped` out of its loop) and
    raises what the script raised otherwise (an import error, a bug outside its
    ``try``), for the host to report.
    """
    script = Path(path).resolve()
    install(bridge)
    # The samples import modules shipped beside the function (`from local_display import
    # LocalDisplay`): its folder comes first on the path, as in the Lambda's.
    folder = str(script.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        runpy.run_path(str(script), run_name="__main__")
        while not bridge.stopping:
            time.sleep(IDLE_POLL_S)
    except FunctionStopped:
        pass
    except SystemExit as exc:  # the script called sys.exit(): its loop is over
        log.info("%s exited (%s)", script.name, exc.code)
        while not bridge.stopping:
            time.sleep(IDLE_POLL_S)
