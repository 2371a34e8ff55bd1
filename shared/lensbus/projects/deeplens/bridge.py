"""What the host gives a DeepLens function: the :class:`Bridge` protocol.

The host (``lensbus.projects.host``) implements it and, after "go", calls
``lensbus.projects.deeplens.run_function(path, bridge)`` in a thread of its own: the
function's module runs as its ``__main__``-like script with ``awscam``, ``mo`` and
``greengrasssdk`` importable, and its infinite loop pulls frames through the bridge.

Everything here is called from the function's thread(s) (the function's own loop and, in
DeepLens's samples, a LocalDisplay thread), never from the host's event loop: so the bridge's
methods must be thread-safe, and only ``newest_frame`` may block.
"""

from __future__ import annotations

from typing import Protocol

from lensbus.schemas.frame import FrameEnvelope
from lensbus.subjects import Subjects


class FunctionStopped(BaseException):
    """Raised out of ``awscam.getLastFrame()`` when the bridge is stopping.

    A BaseException: DeepLens functions wrap their loop in ``except Exception`` (and publish
    the error), which must not swallow the host's stop.
    """


class Bridge(Protocol):
    """The host's side of a running DeepLens function (thread-safe)."""

    project: str  # the project's name (ProjectMessage.project, subjects)
    version: str  # the running version (ProjectMessage.version)
    subjects: Subjects  # built from LENSBUS_PROJECT_PREFIX
    models_dir: str  # LENSBUS_PROJECT_MODELS: where mo.optimize/awscam.Model find packages

    def newest_frame(self, after_seq: int, timeout_s: float) -> FrameEnvelope | None:
        """The newest frame of the function's camera with a seq greater than ``after_seq``
        (older ones are dropped: DeepLens's getLastFrame skips frames too), waiting up to
        ``timeout_s`` for one; None on timeout or once stopping. Which camera: the host's
        choice (one per function, DeepLens had one); the frame says which.
        """
        ...

    def publish(self, subject: str, data: bytes) -> None:
        """Send ``data`` on ``subject`` without blocking (queued to the host's connection)."""
        ...

    @property
    def stopping(self) -> bool:
        """True once the host was told to stop: the function's next frame read ends it."""
        ...
