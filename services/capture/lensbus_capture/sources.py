"""Frame sources: test pattern, camera (index or /dev/videoN), URL, video file, folder.

Every source is opened and read from a worker thread (both block). ``read()`` returns a BGR
image, ``None`` at the end of a finite source, or raises :class:`SourceError`.  A live source
(camera, stream URL) is not read with ``read()`` but drained by a reader thread
(``reader.py``); when it fails the camera reopens it with back-off.
"""

from __future__ import annotations

import math
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from lensbus.errors import LensbusError
from lensbus.schemas.camera import CameraConfig, SourceOptions

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class SourceError(LensbusError):
    """A source that cannot be opened or stopped delivering frames."""


class Source(Protocol):
    name: str
    live: bool  # a camera or stream: reopened on failure, never "ends"

    def open(self) -> None: ...
    def read(self) -> np.ndarray | None: ...
    def close(self) -> None: ...


class TestPattern:
    """Moving shapes, a frame counter and the time: a source that needs no file."""

    live = False

    def __init__(self, width: int, height: int) -> None:
        self.name = "test pattern"
        self.width, self.height = width, height
        self.count = 0
        # Static background gradient, built once: each frame only draws the moving parts.
        x = np.linspace(0, 255, width, dtype=np.float32)
        y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
        self._bg = np.dstack(
            [
                np.broadcast_to(x, (height, width)),
                np.broadcast_to(y, (height, width)),
                np.full((height, width), 96, np.float32),
            ]
        ).astype(np.uint8)

    def open(self) -> None:
        self.count = 0

    def read(self) -> np.ndarray:
        w, h, n = self.width, self.height, self.count
        img = self._bg.copy()
        t = n / 30.0
        cx = int(w / 2 + w / 3 * math.cos(t))
        cy = int(h / 2 + h / 3 * math.sin(t))
        r = max(4, min(w, h) // 10)
        cv2.circle(img, (cx, cy), r, (0, 220, 255), -1)
        bx = int((n * 7) % max(1, w - 2 * r))
        cv2.rectangle(img, (bx, h - 3 * r), (bx + 2 * r, h - r), (255, 80, 40), -1)
        scale = max(0.4, min(w, h) / 480)
        stamp = datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3]
        cv2.putText(
            img,
            f"#{n}",
            (10, int(30 * scale)),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (255, 255, 255),
            max(1, int(2 * scale)),
            cv2.LINE_AA,
        )
        cv2.putText(
            img,
            stamp,
            (10, int(60 * scale)),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (255, 255, 255),
            max(1, int(2 * scale)),
            cv2.LINE_AA,
        )
        self.count += 1
        return img

    def close(self) -> None:
        pass


class VideoSource:
    """A camera, stream URL or video file read through OpenCV's VideoCapture.

    A file is read with :meth:`read` (every frame, in order).  A live source is drained by
    a :class:`lensbus_capture.reader.LiveReader`, which takes the open capture over
    (:meth:`detach`) and calls ``grab()`` on every frame and ``retrieve()`` on the few that
    are published.
    """

    def __init__(
        self,
        target: str | int,
        live: bool,
        loop: bool = False,
        options: SourceOptions | None = None,
    ) -> None:
        self.target = target
        self.name = f"camera {target}" if isinstance(target, int) else str(target)
        self.live = live
        self.loop = loop
        self.options = options or SourceOptions()
        self.cap: cv2.VideoCapture | None = None

    def open(self) -> None:
        if not self.live and not Path(str(self.target)).is_file():
            raise SourceError(f"cannot open source {self.name!r}: no such file")
        if isinstance(self.target, str) and "://" in self.target:
            cap = _open_url(self.target, self.options)
        elif self.live:
            cap = _open_device(self.target, self.options)
        else:
            cap = cv2.VideoCapture(self.target)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open source {self.name!r}: OpenCV could not open it")
        self.cap = cap

    def detach(self) -> cv2.VideoCapture:
        """Hand the open capture over to its reader thread, which closes it."""
        if self.cap is None:
            raise SourceError(f"source {self.name!r} is not open")
        cap, self.cap = self.cap, None
        return cap

    def read(self) -> np.ndarray | None:
        if self.cap is None:
            raise SourceError(f"source {self.name!r} is not open")
        ok, frame = self.cap.read()
        if ok and frame is not None:
            return frame
        if self.live:
            raise SourceError(f"source {self.name!r} stopped delivering frames")
        if self.loop:
            self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = self.cap.read()
            if ok and frame is not None:
                return frame
            raise SourceError(f"source {self.name!r} could not be rewound")
        return None

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


# FFmpeg takes its RTSP transport only from this process-wide variable, read while a
# capture opens: set it for one open at a time.
_FFMPEG_OPTIONS = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
_ffmpeg_env = threading.Lock()


def _open_url(url: str, options: SourceOptions) -> cv2.VideoCapture:
    """A network stream through FFmpeg, with the open and read timeouts (a read that
    times out makes ``grab()`` fail: the source is then reopened)."""
    params = [
        cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
        int(options.open_timeout_s * 1000),
        cv2.CAP_PROP_READ_TIMEOUT_MSEC,
        int(options.read_timeout_s * 1000),
    ]
    if options.rtsp_transport is None or not url.startswith("rtsp"):
        return cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)
    with _ffmpeg_env:
        before = os.environ.get(_FFMPEG_OPTIONS)
        extra = f"rtsp_transport;{options.rtsp_transport}"
        os.environ[_FFMPEG_OPTIONS] = f"{before}|{extra}" if before else extra
        try:
            return cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)
        finally:
            if before is None:
                del os.environ[_FFMPEG_OPTIONS]
            else:
                os.environ[_FFMPEG_OPTIONS] = before


def _open_device(target: str | int, options: SourceOptions) -> cv2.VideoCapture:
    """A V4L2 camera, asked for the pixel format and size set (FOURCC first: the sizes a
    camera offers depend on it)."""
    cap = cv2.VideoCapture(target)
    if cap.isOpened():
        if options.fourcc:
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*options.fourcc))
        if options.capture_width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, options.capture_width)
        if options.capture_height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, options.capture_height)
        # Keep the driver's queue short: the reader drains it anyway.
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
    return cap


class FolderSource:
    """The images of a folder, in name order, one per frame."""

    live = False

    def __init__(self, folder: Path, loop: bool = False) -> None:
        self.folder = folder
        self.name = str(folder)
        self.loop = loop
        self.files: list[Path] = []
        self.index = 0

    def open(self) -> None:
        if not self.folder.is_dir():
            raise SourceError(f"cannot open source {self.name!r}: not a folder")
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise SourceError(f"cannot open source {self.name!r}: no images in it")
        self.index = 0

    def read(self) -> np.ndarray | None:
        # A file that does not decode is skipped; a folder with none that decode is an error.
        for _ in range(len(self.files)):
            if self.index >= len(self.files):
                if not self.loop:
                    return None
                self.index = 0
            path = self.files[self.index]
            self.index += 1
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is not None:
                return image
        raise SourceError(f"source {self.name!r}: no image in it could be decoded")

    def close(self) -> None:
        pass


def make_source(config: CameraConfig) -> Source:
    """Build the source a camera's config names."""
    spec, options = config.source, config.options
    if spec == "test":
        return TestPattern(config.width or 640, config.height or 480)
    if spec.isdigit():
        return VideoSource(int(spec), live=True, options=options)
    if spec.startswith("/dev/video") or "://" in spec:
        return VideoSource(spec, live=True, options=options)
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return FolderSource(path, loop=config.loop)
    return VideoSource(str(path), live=False, loop=config.loop, options=options)
