"""The msgpack codec: round trips, and decode never raising anything but DecodeError."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lensbus
from lensbus import DecodeError, decode, encode
from lensbus.codec import MAX_MESSAGE_BYTES, InvalidMessage, MalformedMessage, UnknownSchemaVersion
from lensbus.images import decode_jpeg, encode_jpeg
from lensbus.schemas import (
    EXPORTED,
    SCHEMA_VERSION,
    Box,
    ClassScore,
    Detection,
    FrameEnvelope,
    InputSpec,
    Manifest,
    Message,
    ModelFile,
    ModelRef,
    Result,
    Segment,
    Status,
    Timings,
)

SCHEMAS = list(EXPORTED.values())
NOW = 1_764_124_800_123_456_789  # a real wall-clock time in ns (late 2025)


def real_jpeg(width: int = 64, height: int = 48) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    image = np.dstack([x * 4 % 256, y * 5 % 256, (x + y) % 256]).astype(np.uint8)
    return encode_jpeg(image, 85)


def samples() -> dict[str, Message]:
    """One realistic message of every exported schema, keyed as EXPORTED is."""
    model = ModelRef(name="yolov3-tiny", version="2024.1", framework="opencv", device="cpu")
    frame = FrameEnvelope(
        camera="front-door",
        seq=1234,
        capture_ns=NOW,
        width=64,
        height=48,
        data=real_jpeg(),
        source_seq=99,
    )
    result = Result(
        camera="front-door",
        seq=1234,
        capture_ns=NOW,
        result_ns=NOW + 23_000_000,
        width=1920,
        height=1080,
        model=model,
        task="detection",
        instance="inference-host-1",
        detections=[
            Detection(
                label="dog",
                class_id=16,
                score=0.91,
                box=Box.from_normalized(0.1, 0.2, 0.45, 0.9, 1920, 1080),
            ),
            Detection(
                label="person",
                class_id=0,
                score=0.55,
                box=Box.from_normalized(0.5, 0.05, 0.7, 0.95, 1920, 1080),
            ),
        ],
        classes=[ClassScore(label="dog", class_id=16, score=0.91)],
        segments=[
            Segment(
                label="road",
                class_id=7,
                area=0.31,
                box=Box.from_normalized(0.0, 0.6, 1.0, 1.0, 1920, 1080),
            )
        ],
        mask_png=b"\x89PNG\r\n\x1a\n" + bytes(range(256)),
        timings=Timings(
            queue=0.0012, decode=0.0049, preprocess=0.0021, compute=0.0121, postprocess=0.0007
        ),
    )
    status = Status(
        service="inference",
        instance="edge-01-4242",
        state="degraded",
        reason="model file missing",
        version=lensbus.__version__,
        time_ns=NOW,
        interval_s=2.0,
        model=model,
        counters={"frames_in": 1200.0, "dropped_stale": 37.0},
        detail={"camera": "front-door", "device": "cpu"},
    )
    manifest = Manifest(
        name="mobilenet-ssd",
        version="1.0.2",
        framework="mxnet",
        task="detection",
        decoder="ssd",
        input=InputSpec(width=300, height=300, color="bgr", mean=(104.0, 117.0, 123.0)),
        labels=["background", "person", "car"],
        score_threshold=0.4,
        decoder_options={"layout": "mxnet", "background_id": 0},
        files={
            "symbol": ModelFile(path="ssd-symbol.json", sha256="a" * 64, size=123),
            "params": ModelFile(path="ssd-0000.params", sha256="b" * 64, size=45678),
        },
        description="SSD 300 with MobileNet backbone",
    )
    out: dict[str, Message] = {
        "frame": frame,
        "result": result,
        "status": status,
        "manifest": manifest,
    }
    # The deployer's records, built from their wire form by name in EXPORTED.
    ref = {"name": "yolov3-tiny", "version": "2024.1"}
    old = {"name": "yolov3-tiny", "version": "2023.9"}
    wire: dict[str, dict[str, Any]] = {
        "deployment": {
            "group": "lobby",
            "model": ref,
            "activated_ns": NOW,
            "state": "active",
            "history": [old],
            "pipeline_revision": 2,
        },
        # A group's desired pipeline (revision 2) and the one it replaced.
        "pipeline_deployment": {
            "group": "lobby",
            "current": {
                "revision": 2,
                "activated_ns": NOW,
                "reason": "set",
                "pipeline": {
                    "stages": [
                        {"stage": "model", "model": "yolov3-tiny:2024.1"},
                        {"stage": "track", "labels": ["person"]},
                        {
                            "stage": "zones",
                            "cameras": {
                                "lobby-cam": {
                                    "lines": [{"name": "door", "a": [0.4, 0.2], "b": [0.4, 0.9]}]
                                }
                            },
                        },
                    ],
                },
            },
            "history": [
                {
                    "revision": 1,
                    "activated_ns": NOW - 86_400 * 10**9,
                    "reason": "set",
                    "pipeline": {"stages": [{"stage": "model", "model": "yolov3-tiny:2023.9"}]},
                }
            ],
        },
        "swap_report": {
            "group": "lobby",
            "instance": "edge-01-4242",
            "desired": ref,
            "state": "serving",
            "serving": ref,
            "time_ns": NOW,
            "fetch_s": 0.12,
            "load_s": 0.85,
            "warmup_s": 0.04,
        },
        "event": {
            "rule": "dog-at-door",
            "camera": "front-door",
            "label": "dog",
            "score": 0.91,
            "seq": 1234,
            "capture_ns": NOW,
            "event_ns": NOW + 31_000_000,
            "consecutive": 3,
            "model": model.model_dump(),
            "box": Box.from_normalized(0.1, 0.2, 0.45, 0.9, 1920, 1080).model_dump(),
            "snapshot": f"front-door/{NOW}-1234.jpg",
        },
        # A camera group's pipeline: detector, a classifier on car crops, tracking, zones.
        "pipeline": {
            "stages": [
                {"stage": "model", "model": "yolov3-tiny:2024.1"},
                {
                    "stage": "classify",
                    "name": "taxi",
                    "model": "car-kind:3",
                    "labels": ["car"],
                    "min_size": 32,
                    "max_crops": 4,
                },
                {"stage": "track", "labels": ["person", "car"]},
                {
                    "stage": "zones",
                    "cameras": {
                        "front-door": {
                            "zones": [
                                {
                                    "name": "porch",
                                    "points": [[0.1, 0.5], [0.6, 0.5], [0.6, 1.0], [0.1, 1.0]],
                                    "labels": ["person"],
                                    "loiter_s": 30,
                                }
                            ],
                            "lines": [{"name": "door", "a": [0.4, 0.2], "b": [0.4, 0.9]}],
                        }
                    },
                },
            ],
            "description": "people and taxis at the front door",
        },
        # The cameras bucket's records and a kept clip's description.
        "camera": {
            "id": "front-door",
            "source": "rtsp://127.0.0.1:8554/door",
            "fps": 5.0,
            "model_height": 416,
            "group": "lobby",
            "node": "edge-01",
            "options": {"rtsp_transport": "tcp", "read_timeout_s": 3.0},
        },
        "camera_state": {
            "camera": "front-door",
            "state": "retrying",
            "reason": "cannot open source 'rtsp://127.0.0.1:8554/door'",
            "instance": "capture-edge-01-77",
            "node": "edge-01",
            "since_ns": NOW,
            "frames": 1200,
        },
        "clip": {
            "id": f"front-door-{NOW}-1234",
            "camera": "front-door",
            "rule": "dog-at-door",
            "label": "dog",
            "event_seq": 1234,
            "event_capture_ns": NOW,
            "start_ns": NOW - 5_000_000_000,
            "end_ns": NOW + 5_000_000_000,
            "frames": 150,
            "fps": 15.0,
            "width": 1920,
            "height": 1080,
            "pre_s": 5.0,
            "post_s": 5.0,
        },
        # Projects (issue 16): project.json, the desired release, a report, outputs.
        "project": {
            "name": "hotdog-alert",
            "version": "2",
            "groups": ["lobby"],
            "models": ["yolov3-tiny:2024.1"],
            "settings": {"label": "hot dog", "min_count": 3},
            "settings_schema": {"type": "object", "properties": {"min_count": {"type": "integer"}}},
            "limits": {"memory_mb": 512, "deadline_s": 5.0},
        },
        "project_deployment": {
            "name": "hotdog-alert",
            "current": {
                "version": "2",
                "groups": ["lobby"],
                "sha256": "c" * 64,
                "deployed_ns": NOW,
                "reason": "deploy",
            },
            "history": [
                {"version": "1", "groups": ["lobby"], "sha256": "d" * 64, "deployed_ns": NOW - 10}
            ],
        },
        "project_report": {
            "project": "hotdog-alert",
            "instance": "projects-edge-01-88",
            "version": "2",
            "state": "running",
            "serving": "2",
            "handled": 4200,
            "errors": 3,
            "dropped": 12,
            "restarts": 1,
            "report_ns": NOW,
        },
        "project_message": {
            "project": "hotdog-alert",
            "version": "2",
            "camera": "front-door",
            "topic": "alert",
            "seq": 1234,
            "capture_ns": NOW,
            "published_ns": NOW + 40_000_000,
            "payload": {"label": "hot dog", "count": 3},
        },
        "overlay": {
            "project": "privacy-blur",
            "camera": "front-door",
            "seq": 1234,
            "capture_ns": NOW,
            "shapes": [
                {"shape": "blur", "points": [[0.4, 0.1], [0.5, 0.3]]},
                {"shape": "box", "points": [[0.1, 0.2], [0.3, 0.6]], "text": "hot dog"},
                {"shape": "text", "points": [[0.02, 0.05]], "text": "in 3 out 1"},
            ],
            "ttl_s": 1.0,
        },
        "fleet_device": {"device": "shop-2", "added_ns": NOW, "groups": ["north", "roof"]},
        "frames_wanted": {"by": "publisher.pub-1", "for_s": 10.0},
        "fleet_desired": {
            "device": "shop-2",
            "group": "entrance",
            "model": {"name": "yolov3-tiny", "version": "2024.2"},
            "sha256": "e" * 64,
            "content": "f" * 64,
            "size": 35_000_000,
            "set_ns": NOW,
        },
        "fleet_seen": {
            "device": "shop-2",
            "time_ns": NOW,
            "groups": [
                {
                    "group": "entrance",
                    "desired": {"name": "yolov3-tiny", "version": "2024.2"},
                    "state": "active",
                    "serving": ["yolov3-tiny:2024.2"],
                    "applied": {"name": "yolov3-tiny", "version": "2024.2"},
                    "applied_ns": NOW,
                }
            ],
            "failures": 0,
        },
    }
    for name, value in wire.items():
        if name in EXPORTED:
            out[name] = EXPORTED[name].model_validate(value)
    return {name: msg for name, msg in out.items() if name in EXPORTED}


SAMPLES = samples()


def test_every_exported_schema_has_a_realistic_sample() -> None:
    missing = sorted(set(EXPORTED) - set(SAMPLES))
    assert not missing, f"add a realistic sample for {missing} to samples() in this file"
    for name, msg in SAMPLES.items():
        assert type(msg) is EXPORTED[name]


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip_every_exported_schema(name: str) -> None:
    msg = SAMPLES[name]
    data = encode(msg)
    assert isinstance(data, bytes)
    back = decode(data, type(msg))
    assert back == msg
    assert back.v == SCHEMA_VERSION
    # The wire form is a plain msgpack map a program without lensbus can read.
    raw = msgpack.unpackb(data, raw=False)
    assert raw["v"] == SCHEMA_VERSION


def test_round_trip_keeps_bytes_as_msgpack_bin_and_the_jpeg_decodable() -> None:
    frame = SAMPLES["frame"]
    assert isinstance(frame, FrameEnvelope)
    raw = msgpack.unpackb(encode(frame), raw=False)
    assert isinstance(raw["data"], bytes) and raw["data"] == frame.data
    back = decode(encode(frame), FrameEnvelope)
    assert decode_jpeg(back.data).shape == (48, 64, 3)
    assert back.capture_ns == NOW  # a 64-bit ns timestamp survives exactly


def test_result_round_trip_keeps_nested_parts() -> None:
    result = SAMPLES["result"]
    assert isinstance(result, Result)
    back = decode(encode(result), Result)
    assert back.detections[0].box.right == round(0.45 * 1920)
    assert back.detections[1].label == "person"
    assert back.mask_png == result.mask_png
    assert back.latency_s == pytest.approx(0.023)


def test_decoding_with_the_wrong_schema_is_invalid() -> None:
    with pytest.raises(InvalidMessage) as info:
        decode(encode(SAMPLES["frame"]), Result)
    assert info.value.kind == "result" and info.value.reason == "invalid"


# --- versions and malformed input -------------------------------------------------------


@pytest.mark.parametrize("version", [0, 2, 99, -1, 2**40])
@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.__name__)
def test_unknown_schema_version(schema: type[Message], version: int) -> None:
    name = next(k for k, v in EXPORTED.items() if v is schema)
    raw = SAMPLES[name].model_dump(mode="python")
    raw["v"] = version
    with pytest.raises(UnknownSchemaVersion) as info:
        decode(msgpack.packb(raw, use_bin_type=True), schema)
    assert info.value.reason == "unknown_version"
    assert info.value.version == version
    assert str(version) in str(info.value)
    assert str(info.value).startswith(f"{schema.kind}:")


def test_a_newer_version_with_new_fields_is_unknown_version_not_invalid() -> None:
    # A v2 frame may well add fields: the version check must come before validation.
    raw = SAMPLES["frame"].model_dump(mode="python") | {"v": 2, "exposure_us": 250}
    with pytest.raises(UnknownSchemaVersion):
        decode(msgpack.packb(raw, use_bin_type=True), FrameEnvelope)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\xc1", "not msgpack"),  # 0xc1 is never used in msgpack
        (b"\x93\x01\x02", "not msgpack"),  # truncated array
        (b"GET / HTTP/1.1\r\n\r\n", "not msgpack"),  # extra data after a fixint
        (msgpack.packb([1, 2, 3]), "expected a map, got list"),
        (msgpack.packb("hello"), "expected a map, got str"),
        (msgpack.packb(None), "expected a map, got NoneType"),
        (msgpack.packb({"camera": "cam1"}), "schema version 'v'"),
        (msgpack.packb({"v": "1", "camera": "cam1"}), "schema version 'v'"),
        (msgpack.packb({"v": 1.0}), "schema version 'v'"),
        (msgpack.packb({"v": True}), "schema version 'v'"),
        (msgpack.packb({"v": None}), "schema version 'v'"),
        (msgpack.packb({1: 1, "v": 1}), "not msgpack"),  # int keys refused (strict_map_key)
    ],
)
def test_malformed(data: bytes, fragment: str) -> None:
    for schema in SCHEMAS:
        with pytest.raises(MalformedMessage) as info:
            decode(data, schema)
        assert info.value.reason == "malformed"
        assert fragment in str(info.value)


@pytest.mark.parametrize("empty", [b"", bytearray(), memoryview(b"")])
def test_empty_payload(empty: bytes) -> None:
    with pytest.raises(MalformedMessage, match="empty payload"):
        decode(empty, FrameEnvelope)


def test_not_bytes_is_malformed() -> None:
    with pytest.raises(MalformedMessage, match="expected bytes, got str"):
        decode("\x81\xa1v\x01", FrameEnvelope)


def test_oversized_payload_is_refused_before_parsing() -> None:
    data = b"\x81" + b"\x00" * MAX_MESSAGE_BYTES
    with pytest.raises(MalformedMessage, match="bytes is over"):
        decode(data, FrameEnvelope)


def test_bytearray_and_memoryview_decode() -> None:
    data = encode(SAMPLES["frame"])
    assert decode(bytearray(data), FrameEnvelope) == SAMPLES["frame"]
    assert decode(memoryview(data), FrameEnvelope) == SAMPLES["frame"]


# --- invalid fields ----------------------------------------------------------------------


def frame_raw(**changes: Any) -> bytes:
    raw = SAMPLES["frame"].model_dump(mode="python")
    for key, value in changes.items():
        if value is ...:
            del raw[key]
        else:
            raw[key] = value
    return msgpack.packb(raw, use_bin_type=True)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"width": 100000}, "width"),  # absurd frame size
        ({"height": 100000}, "height"),
        ({"width": 0}, "width"),
        ({"height": -1}, "height"),
        ({"seq": -1}, "seq"),
        ({"seq": "twelve"}, "seq"),
        ({"capture_ns": -5}, "capture_ns"),
        ({"camera": "front.door"}, "camera"),
        ({"camera": ">"}, "camera"),
        ({"camera": ""}, "camera"),
        ({"encoding": "png"}, "encoding"),
        ({"data": ...}, "data"),
        ({"camera": ...}, "camera"),
        ({"data": 12}, "data"),
        ({"source_seq": "x"}, "source_seq"),
    ],
)
def test_wrong_fields_are_invalid_naming_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        decode(frame_raw(**changes), FrameEnvelope)
    assert info.value.reason == "invalid"
    assert field in str(info.value)
    assert str(info.value).startswith("frame:")


def test_absurd_frame_size_is_invalid() -> None:
    frame = SAMPLES["frame"]
    assert isinstance(frame, FrameEnvelope)
    raw = frame.model_dump(mode="python") | {"width": 100000, "height": 100000}
    with pytest.raises(InvalidMessage, match="width"):
        decode(msgpack.packb(raw, use_bin_type=True), FrameEnvelope)


def test_result_with_bad_nested_field_is_invalid() -> None:
    raw = SAMPLES["result"].model_dump(mode="python")
    raw["detections"][0]["score"] = 1.5
    with pytest.raises(InvalidMessage, match=r"detections\.0\.score"):
        decode(msgpack.packb(raw, use_bin_type=True), Result)
    raw["detections"][0]["score"] = 0.5
    raw["task"] = "dreaming"
    with pytest.raises(InvalidMessage, match="task"):
        decode(msgpack.packb(raw, use_bin_type=True), Result)


def test_manifest_cross_field_check_is_invalid() -> None:
    raw = SAMPLES["manifest"].model_dump(mode="python")
    raw["framework"] = "onnx"  # has symbol/params files, needs 'model'
    with pytest.raises(InvalidMessage, match="needs files"):
        decode(msgpack.packb(raw, use_bin_type=True), Manifest)


def test_invalid_message_text_is_bounded() -> None:
    # Every field wrong: the message lists a few errors, not a wall of text for a log line.
    raw = {"v": 1, **{k: object.__name__ for k in ("seq", "capture_ns", "width", "height")}}
    with pytest.raises(InvalidMessage) as info:
        decode(msgpack.packb(raw), FrameEnvelope)
    assert len(str(info.value)) < 500


def test_decode_error_hierarchy() -> None:
    for cls in (MalformedMessage, UnknownSchemaVersion, InvalidMessage):
        assert issubclass(cls, DecodeError)
    assert lensbus.DecodeError is DecodeError
    assert {c.reason for c in (MalformedMessage, UnknownSchemaVersion, InvalidMessage)} == {
        "malformed",
        "unknown_version",
        "invalid",
    }


# --- property tests: decode raises DecodeError and nothing else ---------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

schemas = st.sampled_from(SCHEMAS)

msgpack_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
    | st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 999_999_999))
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.binary(max_size=4), children, max_size=4)
    ),
    max_leaves=20,
)

# Field names that the schemas really have, so random maps reach validation.
FIELD_NAMES = sorted({name for schema in SCHEMAS for name in schema.model_fields} | {"v"})
near_values = msgpack_values | st.sampled_from(
    [0, 1, -1, 2**63, 100000, 8193, 1.5, "", "cam1", "a.b", "jpeg", b"\xff\xd8"]
)


@st.composite
def near_valid_maps(draw: st.DrawFn) -> dict[Any, Any]:
    """A map with mostly real field names, random values and usually ``v == 1``."""
    keys = draw(st.lists(st.sampled_from(FIELD_NAMES) | st.text(max_size=6), max_size=12))
    obj: dict[Any, Any] = {k: draw(near_values) for k in keys}
    if draw(st.integers(0, 9)) > 0:
        obj["v"] = SCHEMA_VERSION
    return obj


@st.composite
def near_valid_messages(draw: st.DrawFn) -> dict[Any, Any]:
    """A real sample with a few fields replaced, removed or added."""
    raw = SAMPLES[draw(st.sampled_from(sorted(SAMPLES)))].model_dump(mode="python")
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(raw)) | st.sampled_from(FIELD_NAMES))
        action = draw(st.sampled_from(["replace", "delete"]))
        if action == "delete":
            raw.pop(key, None)
        else:
            raw[key] = draw(near_values)
    return raw


def assert_only_decode_error(data: bytes, schema: type[Message]) -> None:
    try:
        msg = decode(data, schema)
    except DecodeError as exc:
        assert exc.reason in ("malformed", "unknown_version", "invalid")
        assert str(exc).startswith(f"{schema.kind}:")
        return
    # Accepted: then it really is a valid message of that schema that re-encodes.
    assert isinstance(msg, schema)
    # (Compared as bytes: an accepted message may hold NaN, which is never == itself.)
    assert encode(decode(encode(msg), schema)) == encode(msg)


@FUZZ
@given(data=st.binary(max_size=512), schema=schemas)
def test_random_bytes_only_raise_decode_error(data: bytes, schema: type[Message]) -> None:
    assert_only_decode_error(data, schema)


@FUZZ
@given(value=msgpack_values, schema=schemas)
def test_random_msgpack_values_only_raise_decode_error(value: Any, schema: type[Message]) -> None:
    assert_only_decode_error(msgpack.packb(value, use_bin_type=True), schema)


@FUZZ
@given(obj=near_valid_maps(), schema=schemas)
def test_random_maps_with_real_field_names_only_raise_decode_error(
    obj: dict[Any, Any], schema: type[Message]
) -> None:
    assert_only_decode_error(msgpack.packb(obj, use_bin_type=True), schema)


@FUZZ
@given(obj=near_valid_messages(), schema=schemas)
def test_altered_real_messages_only_raise_decode_error(
    obj: dict[Any, Any], schema: type[Message]
) -> None:
    assert_only_decode_error(msgpack.packb(obj, use_bin_type=True), schema)


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    """A valid encoded message with bytes flipped, cut, inserted or its header rewritten."""
    data = bytearray(encode(SAMPLES[draw(st.sampled_from(sorted(SAMPLES)))]))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "header"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 8))]
        else:
            # A length prefix claiming far more than there is (bin32 / map32 / str32).
            data[i:i] = (
                bytes([draw(st.sampled_from([0xC6, 0xDF, 0xDB, 0xDD]))]) + b"\x7f\xff\xff\xff"
            )
    return bytes(data)


@FUZZ
@given(data=mutated_frames(), schema=schemas)
def test_mutated_valid_messages_only_raise_decode_error(data: bytes, schema: type[Message]) -> None:
    assert_only_decode_error(data, schema)


@FUZZ
@given(data=mutated_frames())
def test_mutated_frames_are_decoded_or_refused_quickly(data: bytes) -> None:
    # A corrupt length prefix must not make msgpack allocate or spin: each decode stays fast.
    t0 = time.perf_counter()
    with contextlib.suppress(DecodeError):
        decode(data, FrameEnvelope)
    assert time.perf_counter() - t0 < 0.5
