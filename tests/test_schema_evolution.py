"""Schema evolution: a reader built against yesterday's schemas keeps reading today's messages.

A producer one release ahead adds optional fields (at the top of a message and inside its
parts); a reader that does not know them ignores them and keeps every field it knows, still
checked as strictly as before. The reverse holds too: today's reader reads yesterday's
messages, which lack the new fields. User-written configuration (a camera, a model manifest)
stays strict: an unknown key there is a typo and is refused, naming it.

"Yesterday" is frozen twice: the reader code a program has installed (``lensbus.Client`` and
``lensbus.schemas``, fed tomorrow's messages over a real nats-server) and the JSON Schemas of
schema version 1 copied to ``tests/schemas_yesterday/`` (what a program in another language
reads). The frozen copies change only with a new major version (``SCHEMA_VERSION``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import msgpack
import nats as nats_py
import numpy as np
import pytest
from pydantic import BaseModel, Field
from test_client import results_until, wait_subscribed
from test_codec import SAMPLES
from test_schemas_docs import validator

import lensbus.schemas
from lensbus import Subjects, decode, encode, metrics
from lensbus.client import Client, Frame
from lensbus.codec import InvalidMessage
from lensbus.images import encode_jpeg
from lensbus.natsserver import NatsServer
from lensbus.schemas import (
    EXPORTED,
    SCHEMA_VERSION,
    Box,
    CameraConfig,
    Detection,
    FrameEnvelope,
    Manifest,
    ModelRef,
    Result,
    Timings,
)

YESTERDAY = Path(__file__).resolve().parent / "schemas_yesterday"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "schemas"
WIRE = ["frame", "result", "status", "event", "clip", "deployment", "swap_report", "camera_state"]
CONFIG = ["camera", "manifest"]
# Wire records that carry configuration, which stays strict in them (a pipeline in the
# group's pipeline record): tests/test_pipeline_store.py checks what an older reader does.
CARRIES_CONFIG = ["pipeline_deployment"]
# Wire messages new since schema version 1 was frozen (issue 16's projects): a program built
# before them has no reader to keep compatible; they are frozen with the next major version.
SINCE_FREEZE = [
    "project_deployment",
    "project_report",
    "project_message",
    "overlay",
    "fleet_device",
    "fleet_desired",
    "fleet_seen",
    "frames_wanted",
]


# --- a producer one release ahead ---------------------------------------------------------


class BoxTomorrow(Box):
    rotation_deg: float = 0.0


class DetectionTomorrow(Detection):
    box: BoxTomorrow
    track_id: int | None = None


class ModelRefTomorrow(ModelRef):
    precision: str = "fp32"


class ResultTomorrow(Result):
    model: ModelRefTomorrow
    detections: list[DetectionTomorrow] = Field(default_factory=list)
    tracker: str = ""
    embeddings: list[list[float]] = Field(default_factory=list)


class FrameTomorrow(FrameEnvelope):
    exposure_us: int | None = None
    tags: dict[str, str] = Field(default_factory=dict)


def today(name: str) -> dict[str, Any]:
    return json.loads((DOCS / f"{name}.json").read_text())


def shape(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$ref`` followed and, for an optional part, the part's own."""
    ref = schema.get("$ref")
    schema = root["$defs"][ref.rsplit("/", 1)[1]] if ref else schema
    for option in schema.get("anyOf", []):
        option = shape(option, root)
        if "properties" in option or "items" in option:
            return option
    return schema


def with_added_fields(value: Any, schema: dict[str, Any], root: dict[str, Any]) -> Any:
    """``value`` (a message's wire form) with an unknown field of a new shape in the message
    and in each of its parts (not in free maps such as a heartbeat's counters)."""
    schema = shape(schema, root)
    if isinstance(value, dict) and "properties" in schema:
        props = schema["properties"]
        out = {k: with_added_fields(v, props.get(k, {}), root) for k, v in value.items()}
        out[f"added_in_v1_{len(out)}"] = [len(out), "x", {"nested": None}, b"\x00"]
        return out
    if isinstance(value, list) and "items" in schema:
        return [with_added_fields(v, schema["items"], root) for v in value]
    return value


def added(name: str, value: dict[str, Any]) -> dict[str, Any]:
    schema = today(name)
    out: dict[str, Any] = with_added_fields(value, schema, schema)
    return out


def packed(raw: dict[str, Any]) -> bytes:
    return msgpack.packb(raw, use_bin_type=True)


# --- the codec: tolerant on the wire, strict on known fields and in configuration ----------


@pytest.mark.parametrize("name", WIRE)
def test_wire_message_with_added_fields_keeps_every_known_field(name: str) -> None:
    sample = SAMPLES[name]
    raw = added(name, sample.model_dump(mode="python"))
    got = decode(packed(raw), EXPORTED[name])
    assert got == sample
    assert got.model_dump(mode="python") == sample.model_dump(mode="python")  # nothing added


@pytest.mark.parametrize(
    ("name", "change", "field"),
    [
        ("frame", {"width": "wide"}, "width"),
        ("frame", {"camera": "a.b"}, "camera"),
        ("result", {"task": "dreaming"}, "task"),
        ("status", {"state": "asleep"}, "state"),
        ("swap_report", {"state": "maybe"}, "state"),
    ],
)
def test_known_fields_are_still_checked_beside_added_ones(
    name: str, change: dict[str, Any], field: str
) -> None:
    raw = added(name, SAMPLES[name].model_dump(mode="python")) | change
    with pytest.raises(InvalidMessage) as info:
        decode(packed(raw), EXPORTED[name])
    assert field in str(info.value) and "added_in" not in str(info.value)


def test_nested_known_fields_are_still_checked() -> None:
    raw = added("result", SAMPLES["result"].model_dump(mode="python"))
    raw["detections"][0]["score"] = 1.5
    with pytest.raises(InvalidMessage, match=r"detections\.0\.score"):
        decode(packed(raw), Result)


@pytest.mark.parametrize(
    ("name", "path", "key"),
    [
        ("camera", (), "fsp"),
        ("camera", ("options",), "read_timout_s"),
        ("manifest", (), "score_treshold"),
        ("manifest", ("input",), "heigth"),
        ("manifest", ("files", "symbol"), "sha"),
        ("manifest", ("decoder_options",), "background"),
    ],
)
def test_configuration_refuses_unknown_keys_naming_them(
    name: str, path: tuple[str, ...], key: str
) -> None:
    raw = SAMPLES[name].model_dump(mode="python")
    where = raw
    for part in path:
        where = where[part]
    where[key] = 1
    with pytest.raises(InvalidMessage) as info:
        decode(packed(raw), EXPORTED[name])
    assert key in str(info.value)
    model: type[BaseModel] = CameraConfig if name == "camera" else Manifest
    assert model.model_config.get("extra") == "forbid"


def test_every_schema_model_is_either_wire_or_configuration() -> None:
    """A new model must choose: tolerant on the wire, or strict as written by a user."""
    base = lensbus.schemas.base
    wire = (getattr(base, "WireMessage", ()), getattr(base, "WirePart", ()))
    config = (getattr(base, "ConfigMessage", ()), getattr(base, "ConfigPart", ()))
    models = [
        m
        for m in vars(lensbus.schemas).values()
        if isinstance(m, type) and issubclass(m, BaseModel) and m.__module__ != base.__name__
    ]
    assert len(models) > 20
    for model in models:
        assert issubclass(model, wire) != issubclass(model, config), model.__name__
        expected = "ignore" if issubclass(model, wire) else "forbid"
        assert model.model_config.get("extra") == expected, model.__name__
    assert {n for n in EXPORTED if issubclass(EXPORTED[n], wire)} == {
        *WIRE,
        *CARRIES_CONFIG,
        *SINCE_FREEZE,
    }


# --- yesterday's JSON Schemas -------------------------------------------------------------


def yesterday(name: str) -> dict[str, Any]:
    return json.loads((YESTERDAY / f"{name}.json").read_text())


def test_frozen_copies_are_of_this_major_version() -> None:
    frozen = sorted(p.stem for p in YESTERDAY.glob("*.json"))
    assert frozen == sorted([*WIRE, "camera"])
    for name in frozen:
        assert yesterday(name)["$id"] == f"lensbus/{name}.v{SCHEMA_VERSION}.json", (
            f"schema version {SCHEMA_VERSION} is new: freeze docs/schemas/{name}.json anew "
            "in tests/schemas_yesterday/"
        )


@pytest.mark.parametrize("grown", [False, True])
@pytest.mark.parametrize("name", WIRE)
def test_yesterdays_json_schema_accepts_todays_message(name: str, grown: bool) -> None:
    wire = msgpack.unpackb(encode(SAMPLES[name]), raw=False)
    if grown:
        wire = added(name, wire)
    validator(yesterday(name), bytes_as_string=True).validate(wire)


def test_yesterdays_camera_schema_refuses_an_unknown_key() -> None:
    wire = msgpack.unpackb(encode(SAMPLES["camera"]), raw=False) | {"fsp": 5}
    errors = list(validator(yesterday("camera"), bytes_as_string=True).iter_errors(wire))
    assert errors and "fsp" in errors[0].message


def known_only(value: Any, schema: dict[str, Any], root: dict[str, Any]) -> Any:
    """``value`` less every field ``schema`` does not name: what yesterday's producer sent."""
    schema = shape(schema, root)
    if isinstance(value, dict) and "properties" in schema:
        props = schema["properties"]
        return {k: known_only(v, props[k], root) for k, v in value.items() if k in props}
    if isinstance(value, list) and "items" in schema:
        return [known_only(v, schema["items"], root) for v in value]
    return value


@pytest.mark.parametrize("name", WIRE)
def test_todays_reader_reads_yesterdays_message(name: str) -> None:
    schema = yesterday(name)
    old = known_only(msgpack.unpackb(encode(SAMPLES[name]), raw=False), schema, schema)
    got = decode(packed(old), EXPORTED[name])
    today = got.model_dump(mode="python")
    assert known_only(today, schema, schema) == old  # every field yesterday had, kept


def comparable(schema: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in schema.items() if k not in ("description", "title", "default")}


@pytest.mark.parametrize("name", WIRE)
def test_todays_schema_only_adds_optional_fields(name: str) -> None:
    """What a minor change may do; removing, renaming or retyping needs a new major version."""
    old = yesterday(name)
    new = today(name)
    pairs = [(name, old, new)] + [
        (d, old["$defs"][d], new.get("$defs", {}).get(d, {})) for d in old.get("$defs", {})
    ]
    for where, was, now in pairs:
        assert set(now.get("required", [])) <= set(was.get("required", [])), where
        for field, spec in was.get("properties", {}).items():
            assert field in now.get("properties", {}), f"{where}.{field} removed"
            assert comparable(now["properties"][field]) == comparable(spec), f"{where}.{field}"


# --- lensbus.Client over a real nats-server -----------------------------------------------


def tomorrows_result(camera: str, seq: int) -> ResultTomorrow:
    now = time.time_ns()
    return ResultTomorrow(
        camera=camera,
        seq=seq,
        capture_ns=now - 30_000_000,
        result_ns=now,
        width=320,
        height=240,
        model=ModelRefTomorrow(name="yolov3-tiny", version="1", framework="opencv"),
        task="detection",
        instance="inference-next",
        detections=[
            DetectionTomorrow(
                label="person",
                class_id=0,
                score=0.8,
                box=BoxTomorrow(**Box.from_normalized(0.1, 0.1, 0.4, 0.9, 320, 240).model_dump()),
                track_id=7,
            )
        ],
        timings=Timings(decode=0.001, compute=0.02),
        tracker="sort",
        embeddings=[[0.25, 0.5]],
    )


def as_today(message: BaseModel, schema: type[BaseModel]) -> dict[str, Any]:
    """The fields of ``message`` that today's ``schema`` knows, recursively."""
    return schema.model_validate(message.model_dump(mode="python")).model_dump(mode="python")


async def test_client_reads_results_with_added_fields(nats: NatsServer) -> None:
    camera = "evolve-res"
    async with Client(nats.url) as client:
        task, got = results_until(client, camera, 2)
        pub = await nats_py.connect(nats.url)
        subject = Subjects().results(camera)
        try:
            probe = encode(tomorrows_result(camera, 0))
            await wait_subscribed(pub, subject, probe, lambda: bool(got))
            sent = [tomorrows_result(camera, 1), tomorrows_result(camera, 2)]
            for message in sent:
                await pub.publish(subject, encode(message))
            await pub.flush()
            await asyncio.wait_for(task, 10)
        finally:
            task.cancel()
            await pub.close()
        assert client.rejected == 0
    mine = [r for r in got if r.seq > 0]
    assert [type(r) for r in mine] == [Result, Result]
    assert [r.model_dump(mode="python") for r in mine] == [as_today(m, Result) for m in sent]
    assert mine[0].detections[0].box.right == sent[0].detections[0].box.right


async def test_client_reads_frames_with_added_fields(nats: NatsServer) -> None:
    camera = "evolve-frm"
    image = np.dstack([np.mgrid[0:48, 0:64][1] * 4 % 256] * 3).astype(np.uint8)

    def frame(seq: int) -> FrameTomorrow:
        return FrameTomorrow(
            camera=camera,
            seq=seq,
            capture_ns=time.time_ns(),
            width=64,
            height=48,
            data=encode_jpeg(image),
            exposure_us=250,
            tags={"lens": "wide"},
        )

    got: list[Frame] = []
    async with Client(nats.url) as client:

        async def consume() -> None:
            async for f in client.frames(camera, newest_only=False):
                got.append(f)
                if f.seq == 1:
                    return

        task = asyncio.create_task(consume())
        pub = await nats_py.connect(nats.url)
        subject = Subjects().frames(camera)
        try:
            await wait_subscribed(pub, subject, encode(frame(0)), lambda: bool(got))
            sent = frame(1)
            await pub.publish(subject, encode(sent))
            await pub.flush()
            await asyncio.wait_for(task, 10)
        finally:
            task.cancel()
            await pub.close()
        assert client.rejected == 0
    last = got[-1]
    assert last.seq == 1 and type(last.envelope) is FrameEnvelope
    assert last.envelope.model_dump(mode="python") == as_today(sent, FrameEnvelope)
    assert last.image.shape == (48, 64, 3)


def rejected(reason: str) -> float:
    return metrics.MESSAGES_REJECTED.labels(reason)._value.get()


async def test_client_counts_and_logs_unreadable_messages_once(
    nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    camera = "evolve-bad"
    async with Client(nats.url) as client:
        task, got = results_until(client, camera, 5)
        pub = await nats_py.connect(nats.url)
        subject = Subjects().results(camera)
        try:
            await wait_subscribed(
                pub, subject, encode(tomorrows_result(camera, 0)), lambda: bool(got)
            )
            before = client.rejected, rejected("malformed"), rejected("unknown_version")
            caplog.set_level(logging.INFO, logger="lensbus.client")
            for bad in (b"garbage", b"\xc1", b"", msgpack.packb({"v": SCHEMA_VERSION + 1})):
                await pub.publish(subject, bad)
            await pub.publish(subject, encode(tomorrows_result(camera, 5)))
            await pub.flush()
            await asyncio.wait_for(task, 10)
        finally:
            task.cancel()
            await pub.close()
        assert client.rejected - before[0] == 4
    assert rejected("malformed") - before[1] == 3
    assert rejected("unknown_version") - before[2] == 1
    assert got[-1].seq == 5  # the loop went on past them
    lines = [r for r in caplog.records if r.name == "lensbus.client"]
    assert [r.levelno for r in lines] == [logging.WARNING, logging.WARNING], lines
    text = "\n".join(r.getMessage() for r in lines)
    assert "malformed" in text and "not msgpack" in text and "unknown_version" in text
