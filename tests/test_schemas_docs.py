"""The JSON Schemas in docs/schemas: up to date with the code, valid, and true of real messages.

A program in another language reads ``docs/schemas/*.json``, not our pydantic models, so
these files are a contract: a schema change that is not re-exported breaks it silently.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import jsonschema
import msgpack
import numpy as np
import pytest
from pydantic_core import to_jsonable_python

from lensbus import encode
from lensbus.cli.schemas import render, stale
from lensbus.images import encode_jpeg
from lensbus.schemas import (
    EXPORTED,
    SCHEMA_VERSION,
    Box,
    Detection,
    FrameEnvelope,
    Message,
    ModelRef,
    Result,
    Timings,
    WireMessage,
)
from lensbus.schemas.base import ConfigMessage, ConfigPart

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "schemas"
RENDERED = render()
FIX = "run 'lensbus schemas export' from the repository root and commit docs/schemas"


def committed(name: str) -> dict[str, Any]:
    path = DOCS / f"{name}.json"
    assert path.is_file(), f"{path} is missing: {FIX}"
    return json.loads(path.read_text())


def test_every_exported_schema_is_rendered() -> None:
    assert set(RENDERED) == {f"{name}.json" for name in EXPORTED}


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_committed_schema_is_up_to_date(name: str) -> None:
    path = DOCS / name
    assert path.is_file(), f"docs/schemas/{name} is missing: {FIX}"
    on_disk = path.read_text()
    if on_disk != RENDERED[name]:
        # Say which part differs, so the reviewer sees the schema change in the failure.
        old, new = json.loads(on_disk), json.loads(RENDERED[name])
        old_props, new_props = old.get("properties", {}), new.get("properties", {})
        changed = sorted(
            k for k in set(old_props) | set(new_props) if old_props.get(k) != new_props.get(k)
        )
        pytest.fail(
            f"docs/schemas/{name} differs from the {EXPORTED[name[:-5]].__name__} model "
            f"(changed properties: {changed or 'other keys'}): {FIX}"
        )


def test_no_stray_schema_files() -> None:
    stray = sorted(p.name for p in DOCS.glob("*.json") if p.name not in RENDERED)
    assert not stray, f"docs/schemas has files no model exports: {stray}; delete them or {FIX}"


def test_stale_detects_a_changed_file(tmp_path: Path) -> None:
    # The check the CLI and this test rely on really notices a difference.
    for name, text in RENDERED.items():
        (tmp_path / name).write_text(text)
    assert stale(tmp_path) == []
    (tmp_path / "frame.json").write_text(RENDERED["frame.json"].replace('"seq"', '"sequence"'))
    (tmp_path / "result.json").unlink()
    assert stale(tmp_path) == ["frame.json", "result.json"]


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_schema_is_valid_json_schema(name: str) -> None:
    schema = json.loads(RENDERED[name])
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$id"] == f"lensbus/{name[:-5]}.v{SCHEMA_VERSION}.json"
    assert schema["type"] == "object" and "v" in schema["properties"]
    # How versions evolve is written in the file a foreign reader has, not only in ours.
    assert f"schema version {SCHEMA_VERSION}" in schema["$comment"]
    wire = issubclass(EXPORTED[name[:-5]], WireMessage)
    # A wire reader ignores what it does not know; configuration refuses it, parts alike,
    # and stays strict inside a wire record (a pipeline in the group's pipeline record).
    for part in [schema, *schema.get("$defs", {}).values()]:
        if "properties" in part:
            config = part is not schema and part.get("title") in _config_titles()
            assert part["additionalProperties"] is (wire and not config), (name, part.get("title"))


def _config_titles() -> set[str]:
    """The names of the configuration models (what a person writes)."""
    found, todo = set(), [ConfigMessage, ConfigPart]
    while todo:
        cls = todo.pop()
        found.add(cls.__name__)
        todo += cls.__subclasses__()
    return found


# --- real messages validate against the schemas ------------------------------------------


def real_frame() -> FrameEnvelope:
    y, x = np.mgrid[0:240, 0:320]
    image = np.dstack([x % 256, y % 256, (x * y) % 256]).astype(np.uint8)
    return FrameEnvelope(
        camera="porch",
        seq=17,
        capture_ns=1_764_124_800_000_000_000,
        width=320,
        height=240,
        data=encode_jpeg(image),
        source_seq=17,
    )


def real_result() -> Result:
    return Result(
        camera="porch",
        seq=17,
        capture_ns=1_764_124_800_000_000_000,
        result_ns=1_764_124_800_031_000_000,
        width=320,
        height=240,
        model=ModelRef(name="yolov3-tiny", version="1", framework="opencv", device="cpu"),
        task="detection",
        instance="inf-1",
        detections=[
            Detection(
                label="dog",
                class_id=16,
                score=0.87,
                box=Box.from_normalized(0.1, 0.3, 0.5, 0.95, 320, 240),
            )
        ],
        mask_png=b"\x89PNG\r\n\x1a\n\x00\xff",
        timings=Timings(
            queue=0.001, decode=0.002, preprocess=0.001, compute=0.02, postprocess=0.0005
        ),
    )


def validator(schema: dict[str, Any], bytes_as_string: bool) -> jsonschema.Validator:
    cls = jsonschema.Draft202012Validator
    if bytes_as_string:
        # On the wire (msgpack) a bytes field is a bin, which a msgpack reader hands back as
        # bytes; the schema writes it as {"type": "string", "format": "binary"}. Let
        # "string" accept bytes, as a reader of the msgpack form must.
        checker = cls.TYPE_CHECKER.redefine(
            "string", lambda _checker, value: isinstance(value, str | bytes)
        )
        cls = jsonschema.validators.extend(cls, type_checker=checker)
    return cls(schema)


MESSAGES = {"frame": real_frame, "result": real_result}


@pytest.mark.parametrize("source", ["rendered", "committed"])
@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_real_message_json_form_validates(name: str, source: str) -> None:
    schema = json.loads(RENDERED[f"{name}.json"]) if source == "rendered" else committed(name)
    msg = MESSAGES[name]()
    # Bytes need care: model_dump(mode="json") writes bytes as UTF-8 text, which a JPEG or
    # PNG is not, so it raises (and to_jsonable_python(model, bytes_mode=...) follows the
    # model's own config and raises too). JSON has no bytes: dump in Python mode, then turn
    # bytes into (URL-safe) base64 text, a {"type": "string", "format": "binary"} value.
    try:
        doc = msg.model_dump(mode="json")  # works only if Message learns to base64 bytes
    except ValueError as exc:
        assert "utf-8" in str(exc)
        doc = to_jsonable_python(msg.model_dump(mode="python"), bytes_mode="base64")
    assert json.loads(json.dumps(doc)) == doc  # really JSON
    validator(schema, bytes_as_string=False).validate(doc)
    if name == "frame":
        assert isinstance(msg, FrameEnvelope)
        assert base64.urlsafe_b64decode(doc["data"]) == msg.data


@pytest.mark.parametrize("source", ["rendered", "committed"])
@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_real_message_wire_form_validates(name: str, source: str) -> None:
    """What a foreign program sees: msgpack-unpacked bytes, checked against the schema."""
    schema = json.loads(RENDERED[f"{name}.json"]) if source == "rendered" else committed(name)
    wire = msgpack.unpackb(encode(MESSAGES[name]()), raw=False)
    assert wire["v"] == SCHEMA_VERSION
    validator(schema, bytes_as_string=True).validate(wire)


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"width": 100000}, "width"),
        ({"camera": "a.b"}, "camera"),
        ({"seq": -1}, "seq"),
        ({"encoding": "png"}, "encoding"),
        ({"data": None}, "data"),
    ],
)
def test_schema_refuses_what_the_model_refuses(change: dict[str, Any], path: str) -> None:
    """The exported schema is not a rubber stamp: it rejects what decode would reject."""
    schema = json.loads(RENDERED["frame.json"])
    wire = msgpack.unpackb(encode(real_frame()), raw=False) | change
    errors = list(validator(schema, bytes_as_string=True).iter_errors(wire))
    assert errors, f"{change} passed the JSON schema"
    assert any(".".join(map(str, e.absolute_path)) == path for e in errors)


def test_wire_schema_allows_added_fields_and_config_schema_refuses_them() -> None:
    """As decode does: a frame with a field from a later release passes, a camera with a
    misspelt key does not."""
    frame = msgpack.unpackb(encode(real_frame()), raw=False) | {"exposure_us": 250}
    validator(json.loads(RENDERED["frame.json"]), bytes_as_string=True).validate(frame)
    camera = {"v": SCHEMA_VERSION, "id": "porch", "source": "test", "fsp": 5}
    errors = list(validator(json.loads(RENDERED["camera.json"]), False).iter_errors(camera))
    assert [e.validator for e in errors] == ["additionalProperties"] and "fsp" in errors[0].message


def test_required_fields_match_the_model() -> None:
    for name, model in EXPORTED.items():
        schema = json.loads(RENDERED[f"{name}.json"])
        required = {n for n, f in model.model_fields.items() if f.is_required()}
        assert set(schema.get("required", [])) == required, name


def test_every_exported_model_is_a_message() -> None:
    assert all(issubclass(m, Message) for m in EXPORTED.values())
