"""Hypothesis strategies for hostile messages: a valid message of each schema (built from its
fields), then mutated (fields dropped, retyped, added, the version changed), cut short, or
replaced by random bytes and hand-made msgpack that declares more than it holds.  Frames add
JPEG damage: truncated, bit-flipped, random bytes, and bombs (a real small JPEG whose frame
header declares a huge image, as in ``tests/test_jpeg_bomb.py``).

Everything here is pure: the tests and ``bench/fuzz.py`` publish what these draw."""

from __future__ import annotations

import functools
import gzip
import io
import tarfile
import time
import zipfile
import zlib
from typing import Any

import cv2
import msgpack
import numpy as np
from hypothesis import strategies as st

from lensbus import encode
from lensbus.images import encode_jpeg
from lensbus.schemas import (
    ActivateRequest,
    CameraConfig,
    CameraState,
    Deployment,
    FrameEnvelope,
    ListRequest,
    Message,
    ModelRef,
    ModelVersionRef,
    Result,
    RollbackRequest,
    Status,
    StatusRequest,
    SwapReport,
    UploadBegin,
    UploadChunk,
    UploadCommit,
)

TOKEN = st.from_regex(r"\A[A-Za-z0-9_-]{1,12}\Z")
NS = st.integers(0, 2**63 - 1)
SIDE = st.integers(1, 8192)

SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.binary(max_size=64),
)
VALUE = st.recursive(
    SCALAR,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)

# msgpack headers that declare far more than follows (a 4 GiB str, bin, array and map),
# nesting deeper than any decoder should follow, and valid msgpack that is not a map.
HOSTILE = (
    b"\xdb\xff\xff\xff\xff" + b"a" * 8,
    b"\xc6\xff\xff\xff\xff" + b"\x00" * 8,
    b"\xdd\xff\xff\xff\xff\xc0",
    b"\xdf\xff\xff\xff\xff\xa1v\x01",
    msgpack.packb([1, 2, 3]),
    msgpack.packb({"v": 1}),
    msgpack.packb({"v": 2**40}),
    msgpack.packb({1: "int key"}),
    b"\xc1",  # a byte msgpack never uses
)


def nested(depth: int) -> bytes:
    """Arrays in arrays ``depth`` deep, bare or as the value of ``v``."""
    return b"\x91" * depth + b"\xc0"


DEEP = st.sampled_from((100, 5_000, 100_000)).map(nested) | st.sampled_from((100, 5_000)).map(
    lambda depth: b"\x81\xa1v" + nested(depth)
)


@st.composite
def mutated_map(draw: st.DrawFn, fields: dict[str, Any]) -> bytes:
    """The message's own map with up to three fields dropped, retyped or added."""
    obj: dict[Any, Any] = dict(fields)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(("drop", "retype", "add", "version")))
        keys = sorted(k for k in obj if isinstance(k, str))
        if op == "drop" and keys:
            obj.pop(draw(st.sampled_from(keys)))
        elif op == "retype" and keys:
            obj[draw(st.sampled_from(keys))] = draw(VALUE)
        elif op == "add":
            obj[draw(st.text(max_size=12))] = draw(VALUE)
        else:
            obj["v"] = draw(VALUE)
    return bytes(msgpack.packb(obj, use_bin_type=True))


def hostile(valid: st.SearchStrategy[Message]) -> st.SearchStrategy[bytes]:
    """A message of ``valid``'s schema, whole, mutated, cut short, or not one at all."""
    encoded = valid.map(encode)
    return st.one_of(
        encoded,
        valid.flatmap(lambda m: mutated_map(m.model_dump(mode="python"))),
        encoded.flatmap(lambda b: st.integers(0, max(0, len(b) - 1)).map(lambda n: b[:n])),
        st.binary(max_size=512),
        st.sampled_from(HOSTILE),
        DEEP,
    )


# ---- JPEGs ------------------------------------------------------------------------------


def picture(w: int, h: int, seed: int = 7) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_jpeg(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


_BASE_JPEGS = {(w, h): picture(w, h) for w, h in ((64, 48), (160, 120), (320, 240), (96, 200))}
_PROGRESSIVE = cv2.imencode(
    ".jpg", np.full((48, 64, 3), 128, np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]
)[1].tobytes()


def sof_at(jpeg: bytes) -> int:
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = jpeg.find(marker)
        if at > 0:
            return at
    raise ValueError("no SOF")


def with_size(jpeg: bytes, w: int, h: int) -> bytes:
    """``jpeg`` whose frame header (SOF) declares ``w`` x ``h``: a bomb when large."""
    data = bytearray(jpeg)
    s = sof_at(jpeg)
    data[s + 5 : s + 7] = h.to_bytes(2, "big")
    data[s + 7 : s + 9] = w.to_bytes(2, "big")
    return bytes(data)


@st.composite
def jpeg_and_size(draw: st.DrawFn) -> tuple[bytes, int, int]:
    """JPEG bytes and the size an envelope should say for them (before envelope mutations)."""
    w, h = draw(st.sampled_from(sorted(_BASE_JPEGS)))  # sizes: a repr of the bytes is huge
    base = _BASE_JPEGS[(w, h)]
    kind = draw(st.sampled_from(("good", "progressive", "cut", "flip", "bomb", "random")))
    if kind == "progressive":
        return _PROGRESSIVE, 64, 48
    if kind == "cut":
        return base[: draw(st.integers(0, len(base) - 1))], w, h
    if kind == "flip":
        data = bytearray(base)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(data), w, h
    if kind == "bomb":
        bw, bh = draw(st.integers(1, 65535)), draw(st.integers(1, 65535))
        return (
            with_size(base, bw, bh),
            draw(st.sampled_from((bw, w))),
            draw(st.sampled_from((bh, h))),
        )
    if kind == "random":
        return draw(st.binary(max_size=2048)), w, h
    return base, w, h


@st.composite
def frame_envelope(
    draw: st.DrawFn, model_stream: bool = False, cameras: tuple[str, ...] = ()
) -> FrameEnvelope:
    data, w, h = draw(jpeg_and_size())
    full = model_stream and draw(st.booleans())
    return FrameEnvelope.model_construct(
        camera=draw(st.sampled_from(cameras) if cameras else TOKEN),
        seq=draw(st.integers(0, 2**63 - 1)),
        capture_ns=time.time_ns(),
        width=w,
        height=h,
        encoding="jpeg",
        data=data,
        source_seq=draw(st.none() | st.integers(0, 2**31)),
        full_width=w * 4 if full else None,
        full_height=h * 4 if full else None,
    )


def frames(model_stream: bool = False, cameras: tuple[str, ...] = ()) -> st.SearchStrategy[bytes]:
    return hostile(frame_envelope(model_stream, cameras))


# ---- the other messages ---------------------------------------------------------------------

MODEL_REF = st.builds(ModelRef, name=TOKEN, version=TOKEN, framework=st.text(max_size=8))
VERSION_REF = st.builds(ModelVersionRef, name=TOKEN, version=TOKEN)


@st.composite
def result(draw: st.DrawFn, cameras: tuple[str, ...]) -> Result:
    return Result(
        camera=draw(st.sampled_from(cameras)),
        seq=draw(st.integers(0, 2**40)),
        capture_ns=draw(NS),
        result_ns=draw(NS),
        width=draw(SIDE),
        height=draw(SIDE),
        model=draw(MODEL_REF),
        task=draw(st.sampled_from(("classification", "detection", "segmentation"))),
    )


STATUS = st.builds(
    Status,
    service=st.sampled_from(("inference", "capture", "publisher", "deployer")) | TOKEN,
    instance=TOKEN,
    state=st.sampled_from(("starting", "running", "degraded", "stopping")),
    version=st.text(max_size=8),
    time_ns=NS,
    interval_s=st.floats(0.01, 60),
    counters=st.dictionaries(TOKEN, st.floats(0, 1e9), max_size=4),
)


def camera_config(ids: st.SearchStrategy[str] = TOKEN) -> st.SearchStrategy[CameraConfig]:
    sources = st.sampled_from(("test", "/nonexistent.mp4", "rtsp://127.0.0.1:1/x"))
    return st.builds(CameraConfig, id=ids, source=sources)


def camera_state(ids: st.SearchStrategy[str] = TOKEN) -> st.SearchStrategy[CameraState]:
    return st.builds(
        CameraState,
        camera=ids,
        state=st.sampled_from(("opening", "running", "retrying", "ended", "stopped")),
        instance=TOKEN,
        since_ns=NS,
    )


DEPLOYMENT = st.builds(Deployment, group=TOKEN, model=VERSION_REF, activated_ns=NS)
SWAP_REPORT = st.builds(
    SwapReport,
    group=TOKEN,
    instance=TOKEN,
    desired=VERSION_REF,
    state=st.sampled_from(("loading", "serving", "failed")),
    time_ns=NS,
)


# ---- the deployer's API and model archives ------------------------------------------------

SHA = st.from_regex(r"\A[0-9a-f]{64}\Z") | st.text(max_size=70)


def requests(owner: str) -> dict[str, st.SearchStrategy[Message]]:
    """A valid request per deployer verb; upload ids are mostly ``owner``'s (a deployer
    answers chunks and commits of its own uploads only)."""
    upload_id = st.one_of(TOKEN.map(f"{owner}:".__add__), TOKEN)
    return {
        "upload_begin": st.builds(UploadBegin, size=st.integers(1, 2**63 - 1), sha256=SHA),
        "upload_chunk": st.builds(
            UploadChunk,
            upload_id=upload_id,
            offset=st.integers(0, 2**63 - 1),
            data=st.binary(max_size=64),
        ),
        "upload_commit": st.builds(UploadCommit, upload_id=upload_id),
        "list": st.builds(ListRequest, name=st.none() | st.text(max_size=20)),
        "activate": st.builds(ActivateRequest, group=TOKEN, name=TOKEN, version=st.none() | TOKEN),
        "rollback": st.builds(RollbackRequest, group=TOKEN),
        "status": st.builds(StatusRequest, group=st.none() | TOKEN),
    }


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return out.getvalue()


def _member(
    name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data) if kind == tarfile.REGTYPE else 0
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = data.decode()
    return info, data


@st.composite
def bad_archive(draw: st.DrawFn, good: bytes) -> bytes:
    """A model archive that must be refused: ``good`` (a real package's .tar.gz) damaged, or
    one made to escape its folder, link out, claim huge sizes or hold very many files."""
    kind = draw(
        st.sampled_from(
            (
                "cut",
                "flip",
                "random",
                "traversal",
                "absolute",
                "symlink",
                "hardlink",
                "device",
                "huge",
                "many",
                "zip",
                "gzip_bomb",
            )
        )
    )
    if kind == "cut":
        return good[: draw(st.integers(1, len(good) - 1))]
    if kind == "flip":
        data = bytearray(good)
        for _ in range(draw(st.integers(1, 16))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=4096))
    if kind == "traversal":
        return _tar(
            [_member("model.json", b"{}"), _member("../" * draw(st.integers(1, 4)) + "evil")]
        )
    if kind == "absolute":
        return _tar([_member("model.json", b"{}"), _member("/tmp/lensbus-fuzz-evil")])
    if kind in ("symlink", "hardlink"):
        link = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
        target = draw(st.sampled_from((b"/etc/passwd", b"../../outside", b"model.json")))
        return _tar([_member("model.json", b"{}"), _member("weights.onnx", target, link)])
    if kind == "device":
        return _tar([_member("model.json", b"{}"), _member("dev", b"", tarfile.CHRTYPE)])
    if kind == "huge":  # a header that declares far more than follows
        info, _ = _member("weights.onnx")
        info.size = draw(st.integers(2**30, 2**33))
        raw = bytearray(_tar([_member("model.json", b"{}")]))
        head = info.tobuf(format=tarfile.GNU_FORMAT)
        return gzip.compress(gzip.decompress(bytes(raw))[: 512 * 2] + head + b"\0" * 1024)
    if kind == "many":
        n = draw(st.integers(2_000, 20_000))
        return _tar([_member(f"f{i}") for i in range(n)])
    if kind == "zip":
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as z:
            z.writestr("model.json", "{}")
        return out.getvalue()
    return gzip_bomb()


def empty_archive() -> bytes:
    """A .tar.gz without a single member."""
    return _tar([])


@functools.cache
def gzip_bomb(mib: int = 600) -> bytes:
    """A .tar.gz of about 0.1 % its unpacked size: one member of ``mib`` MiB of zeros."""
    big = tarfile.TarInfo("weights.onnx")
    big.size = mib * 2**20
    z = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip container
    out = [z.compress(big.tobuf())]
    zeros = bytes(2**20)
    out += [z.compress(zeros) for _ in range(mib + 1)]
    return b"".join(out) + z.flush()
