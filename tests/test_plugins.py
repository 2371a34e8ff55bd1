"""Backends and decoders are plugins: one registry each, typed decoder options in the manifest.

A bad option is refused wherever a manifest is read (``Manifest.model_validate``,
``open_package``, the deployer's upload) with the field named, and
``docs/schemas/manifest.json`` documents every option.  Adding a decoder is one class: the
test defines one, registers it, and a manifest naming it validates.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import jsonschema
import numpy as np
import pytest
from pydantic import Field, ValidationError

from lensbus.backends import BACKENDS, Backend, DeviceError, parse_device
from lensbus.decoders import (
    DECODERS,
    DecodedOutputs,
    Decoder,
    DecoderOptions,
    YoloOptions,
    decoder_for,
    register,
    unregister,
)
from lensbus.decoders.base import Array
from lensbus.deployclient import DeployClient, DeployError
from lensbus.errors import OutputsError
from lensbus.geometry import STRETCH, Geometry
from lensbus.modelpkg import MANIFEST, PackageError, open_package, read_manifest, write_package
from lensbus.natsserver import NatsServer
from lensbus.schemas import ClassScore, Manifest, Task
from lensbus.schemas.manifest import DecoderOptions as ManifestDecoderOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services" / "inference"))

from lensbus_inference.config import InferenceSettings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "docs" / "schemas" / "manifest.json"

FIELDS: dict[str, Any] = {
    "name": "tiny-yolo",
    "version": "1",
    "framework": "onnx",
    "task": "detection",
    "decoder": "yolo",
    "input": {"width": 32, "height": 32},
    "labels": ["a", "b"],
    "files": {"model": {"path": "m.onnx", "sha256": "0" * 64, "size": 1}},
}


# ------------------------------------------------------------------------------ the registries


def test_backend_registry_holds_the_builtins() -> None:
    assert set(BACKENDS) == {"mxnet", "onnx", "opencv", "torch"}
    for key, cls in BACKENDS.items():
        assert issubclass(cls, Backend) and cls.framework == key
        assert cls.main_role in cls.roles
        assert not cls.roles & cls.optional_roles
    assert BACKENDS["mxnet"].roles == {"symbol", "params"}
    assert BACKENDS["mxnet"].main_role == "params"
    assert BACKENDS["onnx"].roles == BACKENDS["opencv"].roles == {"model"}
    assert BACKENDS["opencv"].optional_roles == {"config"}


def test_decoder_registry_holds_the_builtins() -> None:
    assert set(DECODERS) == {"classification", "ssd", "yolo", "yolov8", "yolox", "segmentation"}
    tasks = set(get_args(Task))
    for key, cls in DECODERS.items():
        assert issubclass(cls, Decoder) and cls.key == key
        assert cls.tasks and cls.tasks <= tasks
        assert issubclass(cls.Options, DecoderOptions)
        assert cls.Options.model_config.get("extra") == "forbid"
        assert cls.Options().decoder == key
        for name, field in cls.Options.model_fields.items():
            assert not field.is_required(), f"{key}.{name} has no default"
            assert name == "decoder" or field.description, f"{key}.{name} has no description"
    assert DECODERS["ssd"].tasks == DECODERS["yolo"].tasks == {"detection"}
    # The base the manifest validates with is the decoders' own.
    assert DecoderOptions is ManifestDecoderOptions


def test_registration_is_checked() -> None:
    class Again(Decoder):
        key: ClassVar[str] = "yolo"
        tasks: ClassVar[frozenset[str]] = frozenset({"detection"})
        Options: ClassVar[type[DecoderOptions]] = YoloOptions

    with pytest.raises(ValueError, match="already registered"):
        register(Again)

    class Untagged(DecoderOptions):
        threshold: float = Field(default=0.5, description="a threshold")

    class NoTag(Decoder):
        key: ClassVar[str] = "no-tag"
        tasks: ClassVar[frozenset[str]] = frozenset({"detection"})
        Options: ClassVar[type[DecoderOptions]] = Untagged

    with pytest.raises(ValueError, match='decoder: Literal\\["no-tag"\\]'):
        register(NoTag)
    assert "no-tag" not in DECODERS and DECODERS["yolo"].__name__ == "YoloDecoder"


# ------------------------------------------------------------------------------ a new decoder


class CountOptions(DecoderOptions):
    decoder: Literal["count"] = "count"
    min_score: float = Field(default=0.5, ge=0.0, le=1.0, description="scores that count")


class CountDecoder(Decoder):
    """A decoder a user might add: how many scores pass ``min_score``, as the first label."""

    key: ClassVar[str] = "count"
    tasks: ClassVar[frozenset[str]] = frozenset({"classification"})
    Options: ClassVar[type[DecoderOptions]] = CountOptions
    options: CountOptions

    def check(self, outputs: Sequence[Array]) -> None:
        if len(outputs) != 1:
            raise OutputsError(f"count: expected 1 output, got {len(outputs)}")

    def __call__(
        self, outputs: Sequence[Array], geometry: Geometry, frame_w: int, frame_h: int
    ) -> DecodedOutputs:
        self.check(outputs)
        n = int((np.asarray(outputs[0]) >= self.options.min_score).sum())
        return DecodedOutputs(classes=[ClassScore(label=self.labels[0], class_id=0, score=n / 10)])


@pytest.fixture
def count_decoder() -> Iterator[type[Decoder]]:
    register(CountDecoder)
    try:
        yield CountDecoder
    finally:
        unregister("count")


COUNT = {**FIELDS, "task": "classification", "decoder": "count"}


def test_a_new_decoder_is_one_class(count_decoder: type[Decoder]) -> None:
    m = Manifest.model_validate({**COUNT, "decoder_options": {"min_score": 0.25}})
    assert isinstance(m.decoder_options, CountOptions)
    assert m.decoder_options.min_score == 0.25
    assert Manifest.model_validate(COUNT).decoder_options == CountOptions()
    dec = decoder_for(m)
    assert isinstance(dec, CountDecoder)
    out = dec([np.array([0.1, 0.3, 0.9])], STRETCH, 10, 10)
    assert [(c.label, c.score) for c in out.classes] == [("a", 0.2)]
    # Its options are checked like the built-ins' ...
    with pytest.raises(ValidationError) as info:
        Manifest.model_validate({**COUNT, "decoder_options": {"min_score": 2}})
    assert info.value.errors()[0]["loc"] == ("decoder_options", "min_score")
    # ... its task too, and the JSON Schema, built when rendered, lists it.
    with pytest.raises(ValidationError, match="decoder 'count' does not fit task 'detection'"):
        Manifest.model_validate({**COUNT, "task": "detection"})
    schema = Manifest.model_json_schema()
    assert {"$ref": "#/$defs/CountOptions"} in schema["properties"]["decoder_options"]["anyOf"]
    assert "min_score" in schema["$defs"]["CountOptions"]["properties"]


def test_an_unregistered_decoder_is_unknown(count_decoder: type[Decoder]) -> None:
    unregister("count")
    with pytest.raises(ValidationError, match="decoder 'count' is not one of"):
        Manifest.model_validate(COUNT)
    assert "CountOptions" not in json.dumps(Manifest.model_json_schema())


# ------------------------------------------------------------------------------ typed options


@pytest.mark.parametrize(
    ("decoder", "options", "loc"),
    [
        ("yolo", {"anchors": "x"}, "decoder_options.anchors"),
        ("yolo", {"anchors": [[10, 14, 23]]}, "decoder_options.anchors"),
        ("yolo", {"layout": "tf"}, "decoder_options.layout"),
        ("yolo", {"max_detections": "many"}, "decoder_options.max_detections"),
        ("ssd", {"layout": "tf"}, "decoder_options.layout"),
        ("ssd", {"decoder": "yolo"}, "decoder_options.decoder"),
        ("classification", {"softmax": "maybe"}, "decoder_options.softmax"),
        ("segmentation", {"background_id": "sky"}, "decoder_options.background_id"),
    ],
)
def test_a_bad_option_is_refused_with_the_field_named(
    decoder: str, options: dict[str, Any], loc: str
) -> None:
    task = {"classification": "classification", "segmentation": "segmentation"}
    fields = {**FIELDS, "decoder": decoder, "task": task.get(decoder, "detection")}
    with pytest.raises(ValidationError) as info:
        Manifest.model_validate({**fields, "decoder_options": options})
    assert [".".join(map(str, e["loc"])) for e in info.value.errors()] == [loc]


def test_options_are_typed_and_model_json_stays_as_written() -> None:
    text = json.dumps(
        {**FIELDS, "decoder_options": {"anchors": [[10.0, 14.0]], "max_detections": 5}}
    )
    m = read_manifest(text)
    assert isinstance(m.decoder_options, YoloOptions)
    assert m.decoder_options.anchors == [[10.0, 14.0]] and m.decoder_options.class_threshold == 0.2
    dumped = m.model_dump(mode="json")
    assert dumped["decoder_options"] == {"anchors": [[10.0, 14.0]], "max_detections": 5}
    assert Manifest.model_validate(dumped) == m
    # The decoder may be repeated in the options (it must agree); the dump leaves it out.
    again = Manifest.model_validate({**FIELDS, "decoder_options": {"decoder": "yolo"}})
    assert again.model_dump()["decoder_options"] == {}


def test_an_existing_model_json_loads_and_writes_unchanged(tmp_path: Path) -> None:
    """A model.json as the writer made it before options were typed."""
    (tmp_path / "net.caffemodel").write_bytes(b"weights")
    (tmp_path / "deploy.prototxt").write_text("name: 'x'\n")
    files = {"model": "net.caffemodel", "config": "deploy.prototxt"}
    fields = {**FIELDS, "framework": "opencv", "decoder": "ssd"}
    del fields["files"]
    fields["decoder_options"] = {"layout": "caffe", "background_id": 0}
    written = (write_package(tmp_path, files, **fields).root / MANIFEST).read_text()
    assert '"decoder_options": {\n    "layout": "caffe",\n    "background_id": 0\n  }' in written
    pkg = open_package(tmp_path)
    assert pkg.manifest.model_dump_json(indent=2, exclude_defaults=False) + "\n" == written
    assert pkg.manifest.decoder_options.background == 0


def test_open_package_refuses_a_bad_option(tmp_path: Path) -> None:
    pkg = bad_package(tmp_path / "pkg")
    with pytest.raises(
        PackageError, match=r"decoder_options\.anchors: Input should be a valid list"
    ):
        open_package(pkg)


def bad_package(root: Path) -> Path:
    """A package whose files are intact but whose yolo options are not."""
    root.mkdir(parents=True)
    (root / "m.onnx").write_bytes(b"not really onnx")
    fields = {k: v for k, v in FIELDS.items() if k != "files"}
    write_package(root, {"model": "m.onnx"}, **fields)
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["decoder_options"] = {"anchors": "x"}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return root


# ------------------------------------------------------------------------------ JSON Schema


def test_the_committed_schema_documents_every_option() -> None:
    schema = json.loads(SCHEMA.read_text())
    for key, cls in DECODERS.items():
        documented = schema["$defs"][cls.Options.__name__]["properties"]
        for name, field in cls.Options.model_fields.items():
            assert name in documented, f"{key}: {name} is not in {SCHEMA.name}"
            if name != "decoder":
                assert documented[name]["description"] == field.description
    text = SCHEMA.read_text()
    assert '"anchors"' in text and '"layout"' in text and '"softmax"' in text


@pytest.mark.parametrize(
    ("change", "valid"),
    [
        ({}, True),
        ({"decoder_options": {"anchors": [[10, 14]], "class_threshold": 0.3}}, True),
        ({"decoder_options": {"anchors": "x"}}, False),
        ({"decoder_options": {"layout": "caffe"}}, False),  # an ssd option on a yolo model
        ({"decoder": "ssd", "decoder_options": {"layout": "caffe"}}, True),
        ({"decoder": "ssd", "decoder_options": {"layout": "tf"}}, False),
        ({"task": "classification"}, False),  # yolo does not fit it
        ({"framework": "mxnet"}, False),  # no symbol and params files
        ({"framework": "tensorflow"}, False),
    ],
)
def test_the_schema_refuses_what_the_model_refuses(change: dict[str, Any], valid: bool) -> None:
    doc = {**FIELDS, **change}
    errors = list(jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text())).iter_errors(doc))
    try:
        Manifest.model_validate(doc)
        model_valid = True
    except ValidationError:
        model_valid = False
    assert (not errors) == model_valid == valid, errors


# ------------------------------------------------------------------------------ devices


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        "gpu",
        "gpu:1",
        "cuda",
        "cuda:2",
        "CUDA:1",
        " gpu ",
        "cpu:0",
        "cpu:1",
        "tpu",
        "gpu:x",
        "",
    ],
)
def test_settings_read_devices_as_the_backends_do(device: str) -> None:
    try:
        parse_device(device)
        parsed = True
    except DeviceError:
        parsed = False
    try:
        InferenceSettings(model=Path("m"), device=device)
        accepted = True
    except ValidationError as exc:
        assert exc.errors()[0]["loc"] == ("device",)
        accepted = False
    assert accepted == parsed


# ------------------------------------------------------------------------------ import cost


def test_reading_a_manifest_loads_no_framework() -> None:
    """``import lensbus`` stays light; validating a manifest (the deployer does) imports the
    registries, NumPy with them, but neither OpenCV nor a model framework."""
    code = (
        "import sys, json\n"
        "from lensbus.modelpkg import read_manifest\n"
        "assert 'numpy' not in sys.modules\n"
        f"read_manifest({json.dumps(json.dumps(FIELDS))})\n"
        "heavy = {'cv2', 'onnxruntime', 'onnx', 'mxnet'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


# ------------------------------------------------------------------------------ the deployer


def targz(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    return archive


@pytest.mark.slow
async def test_the_deployer_refuses_a_bad_option_at_upload(
    fresh_nats: NatsServer, start_service: Any, tmp_path: Path
) -> None:
    # An archive, not the folder: the client would refuse the folder itself when packing.
    archive = targz(bad_package(tmp_path / "pkg"), tmp_path / "bad.tar.gz")
    dep = start_service("deployer", fresh_nats.url, work_dir=tmp_path / "deployer-work")
    dep.wait_healthy()
    async with await DeployClient.connect(fresh_nats.url, timeout_s=10.0) as dc:
        with pytest.raises(DeployError) as info:
            await dc.upload(archive)
        assert info.value.code == "invalid_package"
        assert "decoder_options.anchors" in info.value.message, info.value.message
        assert await dc.list() == []
