"""Live test sources: real servers that send frames stamped with their send time.

* :class:`MjpegServer`: multipart MJPEG over HTTP (stdlib ``http.server``), run as a process
  of its own so the test's work does not slow it, like a network camera;
* :class:`RtspServer`: Debian's GStreamer RTSP server (``gir1.2-gst-rtsp-server-1.0``) through
  python3-gi, run by Debian's own ``/usr/bin/python3`` (python3-gi is built for it, not for
  the venv): an ``appsrc`` fed with stamped frames, H.264 (``x264enc``) over RTP.

Every frame carries the wall-clock ns at which it was made as 64 black/white blocks
(:func:`stamp_band`) in a band at the top of the picture: blocks of 40 px at 640x480 survive
JPEG and H.264 at any sensible quality and any downscale to 1/8; :func:`read_stamp` reads
them back.  Both servers keep a fixed 30 fps schedule and send the newest frame to each
client: a client that reads slowly makes the kernel's socket buffers fill, as a real camera's
stream does.

This file is also the servers' entry point (``python live_sources.py mjpeg|rtsp ...``); its
top level imports only the standard library, since Debian's python has no numpy.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

STAMP_ROWS, STAMP_COLS = 4, 16  # 64 bits
BAND = 3  # the stamp takes the top 1/BAND of the picture
SOURCE_FPS = 30.0
DEBIAN_PYTHON = "/usr/bin/python3"
HERE = Path(__file__).resolve()


def stamp_band(width: int, height: int, ns: int) -> bytes:
    """The top band of a BGR frame (bytes, ``width * band_height * 3``) showing ``ns``."""
    bw, bh = width // STAMP_COLS, height // BAND // STAMP_ROWS
    pad = b"\x80" * 3 * (width - bw * STAMP_COLS)
    white, black = b"\xff" * 3 * bw, b"\x00" * 3 * bw
    rows = []
    for r in range(STAMP_ROWS):
        bits = [(ns >> (63 - (r * STAMP_COLS + c))) & 1 for c in range(STAMP_COLS)]
        rows.append((b"".join(white if b else black for b in bits) + pad) * bh)
    rest = height // BAND - bh * STAMP_ROWS
    return b"".join(rows) + b"\x80" * 3 * width * rest


def stamped_frame(width: int, height: int, ns: int, background: bytes | None = None) -> bytes:
    """A BGR frame (bytes) with ``ns`` in its top band; gray below, or ``background``'s
    pixels (a BGR frame of the same size)."""
    band = stamp_band(width, height, ns)
    if background is None:
        return band + b"\x80" * (3 * width * height - len(band))
    return band + background[len(band) :]


def read_stamp(image: Any) -> int:
    """The ns stamp shown by a decoded BGR frame (a numpy array) at any size."""
    h, w = image.shape[:2]
    bw, bh = w / STAMP_COLS, h / BAND / STAMP_ROWS
    ns = 0
    for r in range(STAMP_ROWS):
        for c in range(STAMP_COLS):
            # The middle half of the block: its edges blur under JPEG and scaling.
            y0, y1 = int((r + 0.25) * bh), max(int((r + 0.75) * bh), int((r + 0.25) * bh) + 1)
            x0, x1 = int((c + 0.25) * bw), max(int((c + 0.75) * bw), int((c + 0.25) * bw) + 1)
            bit = 1 if float(image[y0:y1, x0:x1].mean()) > 127 else 0
            ns = (ns << 1) | bit
    return ns


class _Server:
    """A server process that prints ``ready`` once it listens."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv, self.log_path = argv, log
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self, timeout: float = 30.0) -> _Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self._log)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        # Wait for "ready" on a helper thread: readline() alone cannot time out.
        done = threading.Event()

        def read_line() -> None:
            nonlocal line
            assert self.proc is not None and self.proc.stdout is not None
            line = self.proc.stdout.readline()
            done.set()

        threading.Thread(target=read_line, daemon=True).start()
        done.wait(max(0.0, deadline - time.monotonic()))
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError(f"{self.argv[2]} server did not start: {self.log_path.read_text()}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> _Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MjpegServer(_Server):
    """``http://127.0.0.1:<port>/stream.mjpg``: stamped frames at 30 fps."""

    def __init__(
        self, port: int, width: int, height: int, log: Path, video: Path | None = None
    ) -> None:
        argv = [sys.executable, str(HERE), "mjpeg", str(port), str(width), str(height)]
        super().__init__(argv + ([str(video)] if video else []), log)
        self.url = f"http://127.0.0.1:{port}/stream.mjpg"


def rtsp_missing() -> str | None:
    """Why the RTSP server cannot run here (a missing Debian package), or None."""
    if not Path(DEBIAN_PYTHON).is_file():
        return f"{DEBIAN_PYTHON} (Debian's python3) is absent"
    probe = (
        "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0')\n"
        "from gi.repository import Gst, GstRtspServer; Gst.init(None)\n"
        "missing = [e for e in ('appsrc', 'videoconvert', 'x264enc', 'rtph264pay')"
        " if Gst.ElementFactory.find(e) is None]\n"
        "print(' '.join(missing))"
    )
    try:
        out = subprocess.run(
            [DEBIAN_PYTHON, "-c", probe], capture_output=True, text=True, timeout=30, check=True
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return f"python3-gi / gir1.2-gst-rtsp-server-1.0 not usable: {exc}"
    if out.stdout.strip():
        return f"GStreamer elements missing (gstreamer1.0-plugins-*): {out.stdout.strip()}"
    return None


class RtspServer(_Server):
    """``rtsp://127.0.0.1:<port>/cam``: stamped frames at 30 fps, H.264."""

    def __init__(self, port: int, width: int, height: int, log: Path) -> None:
        argv = [DEBIAN_PYTHON, str(HERE), "rtsp", str(port), str(width), str(height)]
        super().__init__(argv, log)
        self.url = f"rtsp://127.0.0.1:{port}/cam"


# ---- the server processes -------------------------------------------------------------


def _load_background(video: str, width: int, height: int) -> list[bytes]:
    """Up to 60 real frames at ``width`` x ``height`` to draw the stamp on (the bench)."""
    import cv2

    cap = cv2.VideoCapture(video)
    frames = []
    while len(frames) < 60:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(cv2.resize(frame, (width, height)).tobytes())
    cap.release()
    return frames


def serve_mjpeg(port: int, width: int, height: int, video: str | None) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import cv2
    import numpy as np

    backgrounds = _load_background(video, width, height) if video else []
    newest: tuple[int, bytes] = (-1, b"")
    cond = threading.Condition()

    def produce() -> None:
        # One encode per tick, whatever the number of clients, on a fixed schedule.
        nonlocal newest
        n, t0 = 0, time.monotonic()
        while True:
            bg = backgrounds[n % len(backgrounds)] if backgrounds else None
            raw = stamped_frame(width, height, time.time_ns(), bg)
            image = np.frombuffer(raw, np.uint8).reshape(height, width, 3)
            jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()
            with cond:
                newest = (n, jpeg)
                cond.notify_all()
            n += 1
            time.sleep(max(0.0, t0 + n / SOURCE_FPS - time.monotonic()))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            sent = -1
            with contextlib.suppress(OSError):
                while True:
                    with cond:
                        cond.wait_for(lambda last=sent: newest[0] > last)  # type: ignore[misc]
                        sent, jpeg = newest
                    head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}"
                    self.wfile.write(head.encode() + b"\r\n\r\n" + jpeg + b"\r\n")

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=produce, daemon=True).start()
    print("ready", flush=True)
    server.serve_forever()


def serve_rtsp(port: int, width: int, height: int) -> None:
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    launch = (
        f"( appsrc name=src is-live=true format=time do-timestamp=true "
        f"caps=video/x-raw,format=BGR,width={width},height={height},framerate=30/1 "
        "! videoconvert ! video/x-raw,format=I420 "
        "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=30 "
        "! rtph264pay name=pay0 pt=96 config-interval=1 )"
    )

    def feed(appsrc: Any) -> None:
        n, t0 = 0, time.monotonic()
        while True:
            raw = stamped_frame(width, height, time.time_ns())
            if appsrc.emit("push-buffer", Gst.Buffer.new_wrapped(raw)) != Gst.FlowReturn.OK:
                return  # the client left: this media is torn down
            n += 1
            time.sleep(max(0.0, t0 + n / SOURCE_FPS - time.monotonic()))

    def configured(_factory: Any, media: Any) -> None:
        src = media.get_element().get_child_by_name("src")
        threading.Thread(target=feed, args=(src,), daemon=True).start()

    server = GstRtspServer.RTSPServer()
    server.set_service(str(port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch)
    factory.connect("media-configure", configured)
    server.get_mount_points().add_factory("/cam", factory)
    server.attach(None)
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    mode, port_s, w_s, h_s = sys.argv[1:5]
    if mode == "mjpeg":
        serve_mjpeg(int(port_s), int(w_s), int(h_s), sys.argv[5] if len(sys.argv) > 5 else None)
    else:
        serve_rtsp(int(port_s), int(w_s), int(h_s))
