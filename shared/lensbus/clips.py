"""Clips around events: the MJPEG AVI container and the object store ``lensbus-clips``.

A clip is the camera's JPEGs, byte for byte as capture published them, in a RIFF AVI
(``MJPG``, one ``00dc`` chunk per frame, an ``idx1`` index): nothing is decoded or encoded,
so writing one costs a copy, and OpenCV, FFmpeg, VLC and browsers' download-and-open read it.
(The wheels' OpenCV has no H.264 encoder; ``mp4v`` MPEG-4 Part 2 is there, for ``--out
x.mp4``, at the cost of a decode and an encode per frame.) AVI gives one frame rate: the
writer sets it from the frames' span, so the file lasts as long as the frames did.

Each clip is one object named by its event (:func:`lensbus.schemas.clip_id`), described by a
:class:`~lensbus.schemas.ClipInfo` in its ``Lensbus-Clip`` header. The object store's stream
refuses new data when full (``discard: new``), so :func:`put_clip` makes room by deleting the
oldest clips first: retention by bytes drops the oldest; by age the stream's ``max_age`` does.
The publisher writes clips; ``lensbus clips`` and the page read them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
from nats.js import api
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore
from pydantic import ValidationError

from lensbus.errors import ImageError, LensbusError
from lensbus.images import decode_jpeg
from lensbus.schemas import ClipInfo

H_CLIP = "Lensbus-Clip"
CONTENT_TYPE = "video/x-msvideo"
AVI_MAX_BYTES = 1024**3  # RIFF AVI 1.0 (no OpenDML extension): 32-bit sizes, 1 GiB to be safe
_KEYFRAME = 0x10  # AVIIF_KEYFRAME: every JPEG stands alone
_HAS_INDEX = 0x10  # AVIF_HASINDEX
# Stream bytes an object costs beyond its data: a message per 128 KiB chunk and the meta.
_CHUNK = 128 * 1024
_PER_CHUNK = 256
_PER_OBJECT = 2048


class ClipError(LensbusError):
    """A clip that cannot be read, stored or exported."""


# ---- AVI ---------------------------------------------------------------------------------


def _chunk(fourcc: bytes, payload: bytes) -> bytes:
    pad = b"\0" if len(payload) % 2 else b""
    return fourcc + struct.pack("<I", len(payload)) + payload + pad


def _list(kind: bytes, payload: bytes) -> bytes:
    return b"LIST" + struct.pack("<I", len(payload) + 4) + kind + payload


def avi_bytes(jpegs: Sequence[bytes], width: int, height: int, fps: float) -> bytes:
    """An MJPEG AVI of ``jpegs`` (stored as they are) at ``fps`` frames per second."""
    if not jpegs:
        raise ClipError("a clip needs at least one frame")
    if fps <= 0 or width <= 0 or height <= 0:
        raise ClipError(f"bad clip geometry {width}x{height} at {fps} fps")
    n, biggest = len(jpegs), max(len(j) for j in jpegs)
    scale = 1000
    rate = max(1, round(fps * scale))
    avih = struct.pack(
        "<10I16x",
        round(1e6 * scale / rate),  # dwMicroSecPerFrame
        int(biggest * fps),  # dwMaxBytesPerSec
        0,
        _HAS_INDEX,
        n,  # dwTotalFrames
        0,
        1,  # dwStreams
        biggest,  # dwSuggestedBufferSize
        width,
        height,
    )
    strh = struct.pack(
        "<4s4sIHH8I4h",
        b"vids",
        b"MJPG",
        0,
        0,
        0,
        0,  # dwInitialFrames
        scale,
        rate,
        0,  # dwStart
        n,  # dwLength (frames)
        biggest,
        0xFFFFFFFF,  # dwQuality: default
        0,  # dwSampleSize: varies
        0,
        0,
        min(width, 32767),
        min(height, 32767),
    )
    strf = struct.pack(
        "<IiiHH4sIiiII", 40, width, height, 1, 24, b"MJPG", width * height * 3, 0, 0, 0, 0
    )
    strl = _list(b"strl", _chunk(b"strh", strh) + _chunk(b"strf", strf))
    hdrl = _list(b"hdrl", _chunk(b"avih", avih) + strl)
    movi_parts, index, offset = [], [], 4  # idx1 offsets count from the 'movi' fourcc
    for jpeg in jpegs:
        part = _chunk(b"00dc", jpeg)
        index.append(struct.pack("<4sIII", b"00dc", _KEYFRAME, offset, len(jpeg)))
        movi_parts.append(part)
        offset += len(part)
    body = b"AVI " + hdrl + _list(b"movi", b"".join(movi_parts)) + _chunk(b"idx1", b"".join(index))
    if len(body) + 8 > AVI_MAX_BYTES:
        raise ClipError(f"clip of {len(body)} bytes is over the AVI limit of {AVI_MAX_BYTES}")
    return b"RIFF" + struct.pack("<I", len(body)) + body


@dataclass(frozen=True)
class Avi:
    width: int
    height: int
    fps: float
    frames: list[bytes]


def _walk(data: bytes, start: int, end: int) -> Iterable[tuple[bytes, int, int]]:
    """(fourcc, payload start, payload size) of the chunks in ``data[start:end]``."""
    pos = start
    while pos + 8 <= end:
        fourcc, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if pos + 8 + size > end:
            raise ClipError(f"chunk {fourcc!r} at {pos} runs past its list")
        yield fourcc, pos + 8, size
        pos += 8 + size + (size & 1)


def read_avi(data: bytes) -> Avi:
    """The frames, size and rate of an AVI :func:`avi_bytes` wrote (or any plain MJPEG AVI)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"AVI ":
        raise ClipError("not a RIFF AVI")
    end = min(len(data), 8 + struct.unpack_from("<I", data, 4)[0])
    width = height = 0
    fps = 0.0
    frames: list[bytes] = []
    for fourcc, at, size in _walk(data, 12, end):
        if fourcc != b"LIST":
            continue
        kind = data[at : at + 4]
        if kind == b"hdrl":
            for sub, sat, _ in _walk(data, at + 4, at + size):
                if sub == b"avih":
                    width, height = struct.unpack_from("<II", data, sat + 32)
                elif sub == b"LIST" and data[sat : sat + 4] == b"strl":
                    scale, rate = struct.unpack_from(
                        "<II", data, sat + 12 + 20
                    )  # strl, strh header, 20 bytes in
                    fps = rate / scale if scale else 0.0
        elif kind == b"movi":
            frames = [
                data[p : p + n] for c, p, n in _walk(data, at + 4, at + size) if c[2:] == b"dc"
            ]
    if not frames or fps <= 0:
        raise ClipError("AVI without video frames or frame rate")
    return Avi(width, height, fps, frames)


def span_fps(first_ns: int, last_ns: int, frames: int, fallback: float) -> float:
    """The constant rate that makes ``frames`` frames last as long as they were captured:
    (n - 1) intervals between the first and last capture times."""
    if frames < 2 or last_ns <= first_ns:
        return fallback
    return (frames - 1) / ((last_ns - first_ns) / 1e9)


def export(data: bytes, out: Path) -> int:
    """Write a stored clip as ``out``: ``.avi`` as stored, ``.mp4`` re-encoded (``mp4v``).
    Returns the frames written."""
    avi = read_avi(data)
    suffix = out.suffix.lower()
    if suffix == ".avi":
        out.write_bytes(data)
        return len(avi.frames)
    if suffix != ".mp4":
        raise ClipError(f"cannot write {out.name!r}: use .avi (as stored) or .mp4")
    writer = cv2.VideoWriter(
        str(out), cv2.VideoWriter.fourcc(*"mp4v"), avi.fps, (avi.width, avi.height)
    )
    if not writer.isOpened():
        raise ClipError("this OpenCV cannot write MP4 (mp4v): export to .avi instead")
    try:
        for jpeg in avi.frames:
            try:  # the clip's header check too: a clip file may come from anywhere
                img = decode_jpeg(jpeg)
            except ImageError as exc:
                raise ClipError(f"a frame of the clip is not a readable JPEG: {exc}") from exc
            if img.shape[1] != avi.width or img.shape[0] != avi.height:
                img = cv2.resize(img, (avi.width, avi.height))
            writer.write(img)
    finally:
        writer.release()
    return len(avi.frames)


# ---- the object store --------------------------------------------------------------------


def _header(headers: Mapping[str, Any] | None) -> str | None:
    value = (headers or {}).get(H_CLIP)
    if isinstance(value, list):  # Go clients keep header values as lists
        value = value[0] if value else None
    return value if isinstance(value, str) else None


def info_of(obj: api.ObjectInfo) -> ClipInfo | None:
    """The clip an object of the bucket holds; None for a deleted or foreign object."""
    text = _header(obj.headers)
    if obj.deleted or text is None:
        return None
    try:
        return ClipInfo.model_validate_json(text)
    except ValidationError:
        return None


async def list_clips(store: ObjectStore, camera: str | None = None) -> list[ClipInfo]:
    """The bucket's clips, oldest first (by their first frame)."""
    try:
        objects = await store.list(ignore_deletes=True)
    except NotFoundError:  # an empty bucket
        return []
    clips = [c for o in objects if (c := info_of(o)) is not None]
    if camera is not None:
        clips = [c for c in clips if c.camera == camera]
    return sorted(clips, key=lambda c: (c.start_ns, c.id))


async def read_clip(store: ObjectStore, clip: str) -> tuple[ClipInfo, bytes]:
    try:
        got = await store.get(clip)
    except NotFoundError:
        raise ClipError(f"no clip {clip!r}") from None
    info = info_of(got.info)
    if info is None or got.data is None:
        raise ClipError(f"{clip!r} is not a lensbus clip")
    return info, got.data


def stored_size(data_bytes: int) -> int:
    """About how many stream bytes an object of ``data_bytes`` takes (chunks and meta)."""
    return data_bytes + (data_bytes // _CHUNK + 1) * _PER_CHUNK + _PER_OBJECT


async def put_clip(
    store: ObjectStore, info: ClipInfo, data: bytes, max_bytes: int
) -> list[ClipInfo]:
    """Store a clip, first deleting the oldest clips until it fits in ``max_bytes``.
    Returns the clips deleted; raises ClipError when it could never fit."""
    need = stored_size(len(data))
    if need > max_bytes:
        raise ClipError(f"clip of {len(data)} bytes is over clips_max_bytes={max_bytes}")
    used = (await store.status()).size
    evicted: list[ClipInfo] = []
    if used + need > max_bytes:
        for old in await list_clips(store):
            if old.id == info.id:
                continue
            await store.delete(old.id)
            evicted.append(old)
            used = (await store.status()).size
            if used + need <= max_bytes:
                break
    meta = api.ObjectMeta(
        name=info.id,
        description=f"clip of {info.camera} around {info.rule} #{info.event_seq}",
        headers={H_CLIP: info.model_dump_json()},
    )
    await store.put(info.id, data, meta=meta)
    return evicted
