"""The local display: JPEGs a DeepLens function writes for it become the project stream.

DeepLens's samples draw on the frame and hand it to a ``LocalDisplay`` thread that writes
the JPEG, over and over, into the FIFO ``/tmp/results.mjpeg`` (``mplayer`` showed it). Here
that FIFO never exists: :func:`intercept` replaces ``open`` (and makes ``os.mkfifo`` a no-op)
for ``.mjpeg`` paths directly in ``/tmp`` -- only in this process, the host of this one
project -- and each new JPEG written there is sent as a
:class:`~lensbus.schemas.frame.FrameEnvelope` on ``Subjects.project_frame(project, camera)``
with the camera, seq and capture time of the frame the function got last. The same JPEG
written again (the display thread's loop) is not sent again: the write waits a little
instead, as a FIFO without a reader would have blocked it. Frames written before the
function's first camera frame (the samples' white start-up canvas) are not sent, nor
written again after it. Once the
host stops the function, a write raises :class:`FunctionStopped`, ending that thread.
"""

from __future__ import annotations

import builtins
import os
import time
from typing import Any

from lensbus.codec import encode
from lensbus.errors import ImageError
from lensbus.images import read_jpeg_header
from lensbus.projects.deeplens import runtime
from lensbus.projects.deeplens.bridge import FunctionStopped
from lensbus.projects.deeplens.greengrasssdk import PUBLISHED
from lensbus.schemas.frame import FrameEnvelope

DISPLAY_DIR = "/tmp"
DISPLAY_SUFFIX = ".mjpeg"
# A write of the JPEG already sent waits this long: the display thread's loop, paced.
REPEAT_WAIT_S = 0.02
# Bytes kept while a JPEG is written in pieces; more without an end marker is dropped.
MAX_PENDING = 16 * 1024 * 1024

_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
_real_open = builtins.open
_real_mkfifo = os.mkfifo


def is_display(path: Any) -> bool:
    """A local-display FIFO path: ``/tmp/<name>.mjpeg``."""
    try:
        text = os.fspath(path)
    except TypeError:
        return False
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    full = os.path.abspath(text)
    return os.path.dirname(full) == DISPLAY_DIR and full.endswith(DISPLAY_SUFFIX)


class DisplayWriter:
    """What ``open('/tmp/results.mjpeg', 'w')`` gives the function: a file that publishes."""

    def __init__(self, path: str) -> None:
        self.name = path
        self.closed = False
        self._pending = b""
        self._last: tuple[int, bytes] = (-1, b"")
        # What was written before the first camera frame (the start-up canvas): still
        # written after it until the function draws its first frame, never sent.
        self._before_first = b""

    def write(self, data: Any) -> int:
        if runtime.current().stopping:
            raise FunctionStopped
        chunk = _as_bytes(data)
        sent = False
        for jpeg in self._complete(chunk):
            if runtime.STATE.camera is None:
                self._before_first = jpeg
                continue
            # The same JPEG for the same camera frame: the display loop writing it again.
            key = (runtime.STATE.seq, jpeg)
            if key != self._last and jpeg != self._before_first:
                self._last = key
                sent = _send(jpeg) or sent
        if not sent:
            time.sleep(REPEAT_WAIT_S)
        return len(data)

    def _complete(self, chunk: bytes) -> list[bytes]:
        buf = self._pending + chunk
        out = []
        while True:
            start = buf.find(_SOI)
            if start < 0:
                buf = b""
                break
            end = buf.find(_EOI, start + 2)
            if end < 0:
                buf = buf[start:]
                break
            out.append(buf[start : end + 2])
            buf = buf[end + 2 :]
        if len(buf) > MAX_PENDING:
            runtime.reject("display_overflow", f"{self.name}: {len(buf)} bytes without a JPEG end")
            buf = b""
        self._pending = buf
        return out

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> DisplayWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_bytes(data: Any) -> bytes:
    if isinstance(data, str):
        # Python 2 functions wrote JPEG bytes as str to a text-mode file: byte for byte.
        return data.encode("latin-1", errors="replace")
    if hasattr(data, "tobytes"):
        return bytes(data.tobytes())
    return bytes(data)


def _send(jpeg: bytes) -> bool:
    bridge = runtime.current()
    state = runtime.STATE
    if state.camera is None:
        return False
    try:
        header = read_jpeg_header(jpeg)
        envelope = FrameEnvelope(
            camera=state.camera,
            seq=state.seq,
            capture_ns=state.capture_ns,
            width=header.width,
            height=header.height,
            data=jpeg,
        )
    except (ImageError, ValueError) as exc:
        runtime.reject("display_not_jpeg", f"local display: not a JPEG frame ({exc}); skipped")
        return False
    bridge.publish(bridge.subjects.project_frame(bridge.project, state.camera), encode(envelope))
    PUBLISHED.labels("display").inc()
    state.drawn += 1
    return True


def _open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
    if is_display(file) and any(c in mode for c in "wa"):
        return DisplayWriter(str(os.fspath(file)))
    return _real_open(file, mode, *args, **kwargs)


def _mkfifo(path: Any, *args: Any, **kwargs: Any) -> None:
    if is_display(path):
        return
    _real_mkfifo(path, *args, **kwargs)


def intercept() -> None:
    """Route local-display writes of this process to the project stream (idempotent)."""
    setattr(builtins, "open", _open)  # noqa: B010 -- assigning the builtin is the point
    setattr(os, "mkfifo", _mkfifo)  # noqa: B010


def restore() -> None:
    """Undo :func:`intercept` (a test's process goes on after the function)."""
    setattr(builtins, "open", _real_open)  # noqa: B010
    setattr(os, "mkfifo", _real_mkfifo)  # noqa: B010
