"""JPEG encode/decode helpers, including decoding at reduced scale in the DCT domain.

Large frames can be encoded and decoded in horizontal strips on several threads
(``threads=``): libjpeg uses one core, and a 1080p frame costs ~5 ms each way on a small CPU.

* Encoding: the image is cut into ``threads`` strips of whole MCU rows, each strip is
  encoded alone with a restart interval of one strip, and the strips' entropy-coded data are
  joined under the first strip's header with a restart marker between them.  The result is
  byte for byte what one encode with that restart interval gives (a restart marker resets
  the DC prediction, so a strip's data does not depend on the strip above), and it decodes to
  the same pixels as a JPEG without restart markers.  One marker per strip, not per MCU row:
  libjpeg-turbo decodes a stream with frequent markers ~15% slower.
* Decoding: a JPEG whose restart intervals are whole MCU rows is cut at its restart markers
  into strips that are JPEGs of their own, decoded at once and stacked.  Only at 1/2, 1/4 or
  1/8 scale, where libjpeg's output for a strip is exactly that strip of the whole image's
  (at full scale the chroma upsampling looks across the cut, so a full-scale decode is never
  split).  Anything else (no or other restart intervals, progressive, other chroma
  subsampling) is decoded whole, as before.

Every decode reads the JPEG's own frame header (its SOF segment) first, without decoding:
a few KB of JPEG may declare 30000x30000, and libjpeg would allocate gigabytes for it.  What
declares more than ``max_pixels`` (``image_too_large``), not the size its message says
(``size_mismatch``), or has no readable header (``corrupt_image``) is refused as an
:class:`ImageError` whose ``reason`` labels the rejection.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import cv2
import numpy as np

from lensbus.errors import ImageError

# cv2 flags for decoding at 1/1, 1/2, 1/4 and 1/8 of the size: libjpeg skips the work
# in the DCT domain, which is much cheaper than decoding in full and resizing.
_REDUCED = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}

# OpenCV encodes colour as 4:2:0: an MCU is 16x16 pixels.
MCU = 16
# Smaller images are encoded and decoded whole: a second thread saves less than it costs.
STRIP_MIN_PIXELS = 1_000_000
MAX_RESTART = 65535  # the restart interval is a 16-bit count of MCUs
# The most pixels a JPEG may declare to be decoded (unless the caller says otherwise): a 4K
# frame is 8.3 MP; 40 MP keeps one decoded BGR image under 120 MB (libjpeg also holds the
# whole coefficient array of a progressive JPEG, ~2 bytes per pixel and component).
MAX_PIXELS = 40_000_000

_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
_SOF_BASELINE = (0xC0, 0xC1)
_DRI, _SOS = 0xDD, 0xDA
_NOT_SOF = (0xC4, 0xC8, 0xCC)  # DHT, JPG, DAC share the 0xC0-0xCF range with the SOFs
_ANY_SOF = frozenset(range(0xC0, 0xD0)) - frozenset(_NOT_SOF)
_PROGRESSIVE = (0xC2, 0xC6, 0xCA, 0xCE)
_NO_LENGTH = frozenset((0x01, *range(0xD0, 0xD8)))  # TEM and RSTn stand alone

T = TypeVar("T")
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _submit(fn: Callable[..., T], *args: object) -> Future[T]:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="lensbus-jpeg")
    return _pool.submit(fn, *args)


def _encode(image: np.ndarray, quality: int, restart: int = 0) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    if restart:
        params += [cv2.IMWRITE_JPEG_RST_INTERVAL, restart]
    ok, buf = cv2.imencode(".jpg", image, params)
    if not ok:
        raise ImageError("JPEG encoding failed")
    return buf.tobytes()


class _Layout:
    """Where the parts of a JPEG are: ``header`` (to the end of the SOS segment), the SOF
    segment, the restart interval; ``ok`` when it is a baseline 4:2:0 colour JPEG in one
    interleaved scan, the only kind that is cut into strips."""

    def __init__(self, data: bytes) -> None:
        self.ok = False
        self.sof = self.header_end = -1
        self.restart = self.width = self.height = 0
        if not (data.startswith(_SOI) and data.endswith(_EOI)):
            return
        i, n = 2, len(data)
        while i + 4 <= n and data[i] == 0xFF:
            marker, length = data[i + 1], (data[i + 2] << 8) | data[i + 3]
            if marker in _SOF_BASELINE:
                self.sof = i
            elif 0xC0 <= marker <= 0xCF and marker not in _NOT_SOF:
                return  # progressive, lossless or arithmetic coding
            elif marker == _DRI and length == 4:
                self.restart = (data[i + 4] << 8) | data[i + 5]
            if marker == _SOS:
                self.header_end = i + 2 + length
                scan_components = data[i + 4]
                break
            i += 2 + length
        else:
            return
        s = self.sof
        if s < 0 or data[s + 9] != 3 or scan_components != 3:
            return
        self.height = (data[s + 5] << 8) | data[s + 6]
        self.width = (data[s + 7] << 8) | data[s + 8]
        sampling = [data[s + 11 + 3 * c] for c in range(3)]
        self.ok = sampling == [0x22, 0x11, 0x11] and self.height > 0 and self.width > 0

    def header_with_height(self, data: bytes, height: int) -> bytes:
        """The header, its SOF saying ``height`` rows."""
        head = bytearray(data[: self.header_end])
        head[self.sof + 5 : self.sof + 7] = height.to_bytes(2, "big")
        return bytes(head)


def _join(parts: list[bytes], height: int) -> bytes | None:
    """One JPEG of ``height`` rows from strips that each hold one restart interval; None if
    they do not fit together."""
    layouts = [_Layout(p) for p in parts]
    if not all(lay.ok and lay.restart for lay in layouts):
        return None
    header = layouts[0].header_with_height(parts[0], height)
    for lay, part in zip(layouts[1:], parts[1:], strict=True):
        # Same tables, same scan: only the height may differ.
        if lay.header_with_height(part, height) != header:
            return None
    chunks = [header]
    for i, (lay, part) in enumerate(zip(layouts, parts, strict=True)):
        if i:
            chunks.append(bytes((0xFF, 0xD0 + (i - 1) % 8)))  # RSTn, n cycling 0..7
        chunks.append(part[lay.header_end : -2])
    chunks.append(_EOI)
    return b"".join(chunks)


def encode_jpeg(image: np.ndarray, quality: int = 85, threads: int = 1) -> bytes:
    """Encode a BGR (or grey) image as JPEG.  With ``threads`` > 1, a colour image of at
    least STRIP_MIN_PIXELS is encoded in that many strips at once, with a restart marker
    between strips (the same pixels when decoded; see the module's notes)."""
    h, w = image.shape[:2]
    if threads < 2 or h * w < STRIP_MIN_PIXELS or image.ndim != 3 or image.shape[2] != 3:
        return _encode(image, quality)
    rows = -(-h // MCU)
    per = -(-rows // threads)  # MCU rows per strip
    restart = per * -(-w // MCU)
    if rows < 2 or restart > MAX_RESTART:
        return _encode(image, quality)
    bounds = list(range(0, h, per * MCU)) + [h]
    later = [
        _submit(_encode, image[a:b], quality, restart)
        for a, b in zip(bounds[1:-1], bounds[2:], strict=True)
    ]
    parts = [_encode(image[: bounds[1]], quality, restart)] + [f.result() for f in later]
    joined = _join(parts, h)
    return joined if joined is not None else _encode(image, quality, restart)


def reduction_for(width: int, height: int, need_w: int, need_h: int) -> int:
    """The largest JPEG reduction (1, 2, 4, 8) that still leaves at least the needed size."""
    factor = 1
    for f in (2, 4, 8):
        if width // f >= need_w and height // f >= need_h:
            factor = f
    return factor


def _strips(data: bytes, threads: int) -> list[bytes] | None:
    """``data`` cut at restart markers into at most ``threads`` JPEGs of consecutive rows,
    or None where it cannot be (see the module's notes)."""
    lay = _Layout(data)
    per_row = -(-lay.width // MCU)
    if not lay.ok or not lay.restart or lay.restart % per_row:
        return None  # no restart intervals, or intervals that are not whole MCU rows
    if lay.width * lay.height < STRIP_MIN_PIXELS:
        return None
    interval_rows = lay.restart // per_row * MCU  # pixel rows per restart interval
    intervals = -(-lay.height // interval_rows)
    if intervals < 2:
        return None
    body = np.frombuffer(
        data, dtype=np.uint8, offset=lay.header_end, count=len(data) - 2 - lay.header_end
    )
    ff = np.flatnonzero(body[:-1] == 0xFF)
    codes = body[ff + 1]
    is_rst = (codes >= 0xD0) & (codes <= 0xD7)
    markers, marker_codes = ff[is_rst], codes[is_rst]
    if len(markers) != intervals - 1:
        return None
    # Cut after marker k only where the next strip's own markers (if any) restart at RST0:
    # a decoder expects RST0 first.  Strips of one interval each (what encode_jpeg makes) can
    # be cut anywhere.
    per_strip = -(-intervals // threads)
    if per_strip > 1 and per_strip % 8:
        return None
    if any(int(c) != 0xD0 + k % 8 for k, c in enumerate(marker_codes)):
        return None
    cuts = list(range(per_strip, intervals, per_strip))  # interval index each strip begins at
    bounds = [0, *cuts, intervals]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        start = lay.header_end + (int(markers[a - 1]) + 2 if a else 0)
        end = lay.header_end + (int(markers[b - 1]) if b < intervals else len(body))
        rows = min(b * interval_rows, lay.height) - a * interval_rows
        out.append(lay.header_with_height(data, rows) + data[start:end] + _EOI)
    return out


@dataclass(frozen=True)
class JpegHeader:
    """What a JPEG's frame header (SOF segment) declares."""

    width: int
    height: int
    components: int
    progressive: bool


def _corrupt(why: str) -> ImageError:
    return ImageError(f"not a readable JPEG: {why}", "corrupt_image")


def _sof(data: bytes, i: int, marker: int) -> JpegHeader:
    """The frame header whose segment (after its marker) starts at ``data[i]``."""
    if i + 8 > len(data):
        raise _corrupt("truncated in its frame header")
    height = (data[i + 3] << 8) | data[i + 4]
    width = (data[i + 5] << 8) | data[i + 6]
    components = data[i + 7]
    if not width or not height:
        raise _corrupt(f"its frame header says {width}x{height}")
    if components not in (1, 3, 4):
        raise _corrupt(f"{components} colour components")
    return JpegHeader(width, height, components, marker in _PROGRESSIVE)


def read_jpeg_header(data: bytes) -> JpegHeader:
    """The JPEG's frame header, read from its marker segments up to the SOF, decoding nothing.
    Raises :class:`ImageError` (``corrupt_image``) for what is not a JPEG, has no SOF before
    its first scan, or ends first."""
    if not data.startswith(_SOI):
        raise _corrupt("no SOI marker")
    i, n = 2, len(data)
    while i < n:
        if data[i] != 0xFF:
            raise _corrupt(f"no marker at byte {i}")
        while i < n and data[i] == 0xFF:  # fill bytes may pad before a marker
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker in _NO_LENGTH:
            continue
        if marker in (_SOS, 0xD8, 0xD9):
            raise _corrupt(f"marker 0x{marker:02X} before a frame header")
        if i + 2 > n:
            break
        if marker in _ANY_SOF:
            return _sof(data, i, marker)
        length = (data[i] << 8) | data[i + 1]
        if length < 2:
            raise _corrupt(f"segment length {length} at byte {i}")
        i += length
    raise _corrupt("ends before its frame header")


def check_jpeg(
    data: bytes, size: tuple[int, int] | None = None, max_pixels: int = MAX_PIXELS
) -> JpegHeader:
    """The JPEG's header, if it may be decoded: at most ``max_pixels``, and ``size`` (width,
    height) where given.  Raises :class:`ImageError` with ``reason`` ``corrupt_image``,
    ``image_too_large`` or ``size_mismatch``."""
    head = read_jpeg_header(data)
    w, h = head.width, head.height
    if w * h > max_pixels:
        raise ImageError(f"JPEG declares {w}x{h}, over {max_pixels} pixels", "image_too_large")
    if size is not None and (w, h) != tuple(size):
        said = f"{size[0]}x{size[1]}"
        raise ImageError(f"JPEG is {w}x{h}, its message says {said}", "size_mismatch")
    return head


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The (width, height) a PNG's IHDR declares, if it may be decoded: at most
    ``max_pixels``. A PNG of zeros deflates ~1,000 to 1, so a few hundred KB can declare
    hundreds of MB; this reads the 24 header bytes and decodes nothing. Raises
    :class:`ImageError` (``corrupt_image`` or ``image_too_large``)."""
    if not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR" or len(data) < 24:
        raise ImageError("not a PNG (no signature and IHDR)")
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    if not width or not height:
        raise ImageError(f"PNG declares {width}x{height}")
    if width * height > max_pixels:
        msg = f"PNG declares {width}x{height}, over {max_pixels} pixels"
        raise ImageError(msg, "image_too_large")
    return width, height


def decode_png(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode a PNG as stored (a class map stays one channel), its header checked first."""
    check_png(data, max_pixels)
    image = _imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageError("not a decodable PNG")
    return image


def _imdecode(data: bytes, flag: int) -> np.ndarray | None:
    return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)


def decode_jpeg(
    data: bytes,
    reduction: int = 1,
    threads: int = 1,
    *,
    size: tuple[int, int] | None = None,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Decode JPEG bytes to a BGR image, optionally at 1/2, 1/4 or 1/8 scale.

    Its header is checked first (:func:`check_jpeg`: ``size`` and ``max_pixels``), so a
    JPEG bomb is refused before anything is allocated for it.  With ``threads`` > 1 and a
    reduced scale, a large JPEG with a restart marker after every MCU row (what
    :func:`encode_jpeg` makes with threads) is decoded in strips at once: the same pixels,
    sooner."""
    if not data:
        raise ImageError("empty image")
    check_jpeg(data, size, max_pixels)
    flag = _REDUCED[reduction]
    parts = _strips(data, threads) if threads > 1 and reduction > 1 else None
    if parts:
        later = [_submit(_imdecode, p, flag) for p in parts[1:]]
        pieces = [_imdecode(parts[0], flag)] + [f.result() for f in later]
        strips = [p for p in pieces if p is not None and p.ndim == 3]
        if len(strips) == len(pieces):
            return np.concatenate(strips, axis=0)
    image = _imdecode(data, flag)
    if image is None:
        raise ImageError("not a decodable JPEG")
    return image
