"""A result's segmentation mask is a PNG from the bus: its header is checked before the
publisher decodes it, so a small PNG declaring a huge image is refused, not allocated."""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from lensbus.errors import ImageError
from lensbus.images import MAX_PIXELS, check_png


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_bomb(side: int) -> bytes:
    """A valid greyscale PNG of side x side zeros: ~1,000 times smaller than its pixels."""
    deflate = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + one byte per pixel
    idat = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def test_png_header_read_without_decoding() -> None:
    ok, png = cv2.imencode(".png", np.zeros((48, 64), np.uint8))
    assert ok
    assert check_png(png.tobytes()) == (64, 48)
    with pytest.raises(ImageError) as big:
        check_png(png_bomb(8000), max_pixels=1_000_000)
    assert big.value.reason == "image_too_large"
    for bad in (b"", b"\x89PNG\r\n\x1a\n", png.tobytes()[:20], b"GIF89a" + bytes(40)):
        with pytest.raises(ImageError) as corrupt:
            check_png(bad)
        assert corrupt.value.reason == "corrupt_image"


RENDER = """
import sys
from lensbus.images import encode_jpeg
from lensbus.schemas import Box, Result, Segment
import numpy as np
from lensbus_publisher.render import render

bomb = open(sys.argv[1], "rb").read()
frame = encode_jpeg(np.zeros((480, 640, 3), np.uint8))
box = Box.from_normalized(0, 0, 1, 1, 640, 480)
result = Result(
    camera="cam1", seq=1, capture_ns=1, result_ns=2, width=640, height=480,
    model={"name": "m", "version": "1"}, task="segmentation", mask_png=bomb,
    segments=[Segment(label="bg", class_id=0, area=1.0, box=box)],
)
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) // 1024
before = hwm()
try:
    render(frame, result, 1)
    outcome = "drawn"
except Exception as exc:
    outcome = type(exc).__name__ + ":" + getattr(exc, "reason", "")
print(outcome, hwm() - before)
"""


def test_a_png_bomb_mask_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    side = 12_000  # 144 MB of pixels in a ~150 KB PNG
    assert side * side > MAX_PIXELS
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(side))
    script = tmp_path / "render_bomb.py"
    script.write_text(textwrap.dedent(RENDER))
    out = subprocess.run(
        [sys.executable, str(script), str(bomb)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    outcome, grew_mb = out.stdout.split()
    assert outcome == "ImageError:image_too_large", out.stdout
    assert int(grew_mb) < 100, f"peak memory grew by {grew_mb} MB rendering a refused mask"
