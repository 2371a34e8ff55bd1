"""The reader thread of a live source: drain it continuously, decode only what is published.

A camera or stream sends at its own rate.  Read only as fast as the fps cap, OpenCV/FFmpeg
and the kernel's socket buffers queue the rest, and the frames published fall seconds behind
(measured before this reader: 4 s, then 15-20 s).  So a thread ``grab()``s every frame as it
arrives; when the publish loop asks (:meth:`LiveReader.take`), the next frame grabbed is
``retrieve()``d and handed over with the wall-clock time it was read.  A frame is never
handed over twice, and the frames between two ticks of the fps cap are skipped, not queued.

``grab()`` for FFmpeg sources still decodes (inter-coded video needs every frame);
``retrieve()`` converts to BGR.  For V4L2 ``grab()`` only dequeues the buffer.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import cv2
import numpy as np

from lensbus_capture.sources import SourceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grabbed:
    image: np.ndarray
    capture_ns: int  # wall clock when the frame was read from the source
    retrieve_s: float


class LiveReader:
    """Owns an open ``cv2.VideoCapture`` and drains it in a daemon thread until closed.

    The capture is released by the thread itself: releasing it from another thread while a
    ``grab()`` blocks would crash OpenCV.  A grab blocked in a silent source returns at the
    source's read timeout (FFmpeg) or, at worst, never: the thread is a daemon and a new
    reader is started on a new capture meanwhile.
    """

    def __init__(self, cap: cv2.VideoCapture, name: str) -> None:
        self.name = name
        self._cap = cap
        self._cond = threading.Condition()
        self._want = False
        self._frame: Grabbed | None = None
        self._error: str | None = None
        self._closing = False
        self.grabbed = 0  # frames read from the source
        self._thread = threading.Thread(target=self._run, name=f"reader {name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        cap = self._cap
        try:
            while True:
                with self._cond:
                    if self._closing:
                        return
                if not cap.grab():
                    self._fail("stopped delivering frames")
                    return
                capture_ns = time.time_ns()
                with self._cond:
                    self.grabbed += 1
                    want = self._want
                if want:
                    self._hand_over(cap, capture_ns)
        except cv2.error as exc:
            self._fail(f"OpenCV error: {exc}")
        finally:
            cap.release()

    def _hand_over(self, cap: cv2.VideoCapture, capture_ns: int) -> None:
        t0 = time.perf_counter()
        ok, image = cap.retrieve()
        retrieve_s = time.perf_counter() - t0
        with self._cond:
            if ok and image is not None:
                self._frame = Grabbed(image, capture_ns, retrieve_s)
                self._want = False
                self._cond.notify_all()
            # A frame that does not decode (a corrupt packet): the next one is taken.

    def _fail(self, reason: str) -> None:
        with self._cond:
            self._error = reason
            self._cond.notify_all()

    def take(self, timeout: float) -> Grabbed:
        """The next frame read from the source, decoded; waits up to ``timeout`` seconds.

        Raises :class:`SourceError` when the source failed, stayed silent ``timeout`` s, or
        the reader was closed meanwhile."""
        with self._cond:
            self._frame = None
            self._want = True
            self._cond.wait_for(
                lambda: self._frame is not None or self._error is not None or self._closing,
                timeout,
            )
            frame, self._frame, self._want = self._frame, None, False
            if frame is not None:
                return frame
            if self._error is not None:
                raise SourceError(f"source {self.name!r} {self._error}")
            if self._closing:
                raise SourceError(f"source {self.name!r} closed")
            raise SourceError(f"source {self.name!r} silent for {timeout:g} s")

    def close(self, wait_s: float = 0.0) -> bool:
        """Stop reading; the thread releases the capture after its current grab.  Waits up
        to ``wait_s`` for that: a process must not exit while a grab runs (OpenCV aborts).
        True when the thread has ended."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(wait_s)
        return not self._thread.is_alive()
