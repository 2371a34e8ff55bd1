"""The model package manifest (``model.json``).

A model package is a folder or ``.tar.gz`` holding ``model.json`` and the files it lists.
The manifest says how to feed the model (input size, layout, colour order, normalisation)
and how to read its outputs (task, decoder, labels, thresholds).

``framework`` and ``decoder`` name plugins (:data:`lensbus.backends.BACKENDS`,
:data:`lensbus.decoders.DECODERS`): the backend says which file roles a package needs, the
decoder which tasks it fits and, with its ``Options`` model, what ``decoder_options`` may
hold.  The registries are imported when a manifest is first validated, not with this module:
the decoders need NumPy, which ``import lensbus`` does not load.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from lensbus.schemas.base import ConfigMessage, ConfigPart
from lensbus.schemas.result import Task

if TYPE_CHECKING:
    from lensbus.backends import Backend
    from lensbus.decoders import Decoder


def _backends() -> Mapping[str, type[Backend]]:
    """The backend registry (imported on first use)."""
    from lensbus.backends import BACKENDS

    return BACKENDS


def _decoders() -> Mapping[str, type[Decoder]]:
    """The decoder registry (imported on first use)."""
    from lensbus.decoders import DECODERS

    return DECODERS


class _RegistryKey:
    """Annotation: a ``str`` that must be a key of a registry, listed in the JSON Schema."""

    def __init__(self, what: str, registry: Callable[[], Mapping[str, Any]]) -> None:
        self.what = what
        self.registry = registry

    def _check(self, v: str) -> str:
        known = self.registry()
        if v not in known:
            raise ValueError(f"{self.what} {v!r} is not one of {sorted(known)}")
        return v

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {**handler(schema), "enum": sorted(self.registry())}


FrameworkKey = Annotated[str, _RegistryKey("framework", _backends)]
"""A ``framework`` a registered backend reads."""
DecoderKey = Annotated[str, _RegistryKey("decoder", _decoders)]
"""A registered ``decoder``."""


class _DecoderOptionsSchema:
    """The JSON Schema of ``decoder_options``: any registered decoder's ``Options``.

    Built when the schema is rendered, so it lists the decoders registered by then.
    """

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        # One definition per decoder's Options (in "$defs"), and references to them.
        options = [cls.Options.__pydantic_core_schema__ for _, cls in sorted(_decoders().items())]
        refs: list[CoreSchema | tuple[CoreSchema, str]] = [
            core_schema.definition_reference_schema(s["ref"]) for s in options
        ]
        return handler(core_schema.definitions_schema(core_schema.union_schema(refs), options))


_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_VERSION = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _check_name(v: str) -> str:
    if not _NAME.match(v):
        raise ValueError("use 1-64 characters from A-Z, a-z, 0-9, '_' and '-'")
    return v


def _check_version(v: str) -> str:
    if not _VERSION.match(v):
        raise ValueError("use 1-64 characters from A-Z, a-z, 0-9, '.', '_', '+' and '-'")
    return v


def _check_relpath(v: str) -> str:
    parts = v.replace("\\", "/").split("/")
    if not v or v.startswith(("/", "\\")) or ".." in parts or ":" in v:
        raise ValueError(f"file path {v!r} must be relative and stay inside the package")
    return v


def _check_sha256(v: str) -> str:
    if not _SHA256.match(v):
        raise ValueError("sha256 must be 64 lowercase hex digits")
    return v


class ModelFile(ConfigPart):
    path: Annotated[str, AfterValidator(_check_relpath)] = Field(
        description="path inside the package"
    )
    sha256: Annotated[str, AfterValidator(_check_sha256)]
    size: int = Field(ge=0, description="size in bytes")


class InputSpec(ConfigPart):
    """How a BGR frame becomes the model's input tensor: ``(pixel * scale - mean) / std``."""

    width: int = Field(gt=0, le=4096)
    height: int = Field(gt=0, le=4096)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    color: Literal["rgb", "bgr"] = Field(default="rgb", description="channel order the model wants")
    scale: float = Field(default=1.0, gt=0, description="multiplies pixel values (0..255) first")
    mean: tuple[float, float, float] = Field(
        default=(0.0, 0.0, 0.0), description="per channel, in the model's colour order"
    )
    std: tuple[float, float, float] = Field(default=(1.0, 1.0, 1.0))
    resize: Literal["stretch", "letterbox", "letterbox_top_left"] = Field(
        default="stretch",
        description="'letterbox': scaled to fit, centred (Ultralytics, darknet); "
        "'letterbox_top_left': scaled to fit, padded right and bottom (YOLOX)",
    )
    pad_value: int = Field(
        default=127,
        ge=0,
        le=255,
        description="letterbox padding, a pixel value (0..255) before scale/mean/std: 127 "
        "as darknet, 114 as Ultralytics and YOLOX, 0 as NudeNet",
    )

    @model_serializer(mode="wrap")
    def _without_default_pad(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # As 'precision' below: written only when not the default, so model.json stays
        # readable by instances from before it existed (they refuse unknown keys).
        out: dict[str, Any] = handler(self)
        if self.pad_value == type(self).model_fields["pad_value"].default:
            out.pop("pad_value", None)
        return out

    @model_validator(mode="after")
    def _std_positive(self) -> InputSpec:
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self


class DecoderOptions(ConfigPart):
    """Base of every decoder's ``Options``: an unknown option or a wrong type is refused.

    A subclass (in the decoder's module, :mod:`lensbus.decoders`) declares
    ``decoder: Literal["<key>"] = "<key>"`` (model.json leaves it out: the manifest's
    ``decoder`` says it) and its options, each with a default and a description: they are
    the documentation, in docs/schemas/manifest.json.
    """


class Manifest(ConfigMessage):
    """``model.json``: what a model package holds and how to run it."""

    kind: ClassVar[str] = "manifest"

    name: Annotated[str, AfterValidator(_check_name)]
    version: Annotated[str, AfterValidator(_check_version)]
    framework: FrameworkKey
    task: Task
    decoder: DecoderKey
    input: InputSpec
    labels: list[str] = Field(min_length=1)
    score_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    nms_threshold: float = Field(default=0.45, ge=0.0, le=1.0)
    top_k: int = Field(default=5, gt=0, description="classes reported for classification")
    decoder_options: Annotated[DecoderOptions, _DecoderOptionsSchema()] = Field(
        default_factory=dict,
        validate_default=True,
        description="the options of the decoder named in 'decoder' (each decoder's Options "
        "model); 'decoder' need not be repeated here",
    )
    files: dict[str, ModelFile] = Field(description="role -> file; roles depend on framework")
    precision: Literal["fp32", "fp16"] = Field(
        default="fp32",
        description="'fp16': weights and input in half precision on a GPU (framework 'torch' "
        "only; other frameworks refuse it).  On a CPU the model runs in fp32 and the load "
        "logs that fp16 applies on a GPU only, so one package serves both",
    )
    description: str = ""

    @field_validator("decoder_options", mode="before")
    @classmethod
    def _typed_options(cls, v: Any, info: ValidationInfo) -> Any:
        """Validate the options with the ``Options`` of the decoder named in ``decoder``
        (validated before this field); errors name the option, ``decoder_options.<name>``."""
        decoder = _decoders().get(info.data.get("decoder", ""))
        if decoder is None:  # the error is reported on ``decoder``
            return DecoderOptions()
        if isinstance(v, decoder.Options):
            return v
        if isinstance(v, DecoderOptions):  # another decoder's: its options as given
            v = v.model_dump(exclude_unset=True, exclude={"decoder"})
        return decoder.Options.model_validate(v)

    @field_serializer("decoder_options")
    def _options_as_written(self, v: DecoderOptions, info: SerializationInfo) -> dict[str, Any]:
        # The options given, without the decoder key: model.json stays as its author wrote it.
        out: dict[str, Any] = v.model_dump(mode=info.mode, exclude_unset=True, exclude={"decoder"})
        return out

    @model_serializer(mode="wrap")
    def _without_default_precision(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # model.json written today stays readable by inference instances from before
        # 'precision' existed (they refuse unknown keys): it is written only when it says fp16.
        out: dict[str, Any] = handler(self)
        if self.precision == "fp32":
            out.pop("precision", None)
        return out

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        backend = _backends()[self.framework]
        missing = backend.roles - set(self.files)
        if missing:
            raise ValueError(f"framework {self.framework!r} needs files {sorted(missing)}")
        if self.precision not in backend.precisions:
            raise ValueError(
                f"framework {self.framework!r} runs precision {sorted(backend.precisions)}, "
                f"not {self.precision!r}"
            )
        tasks = _decoders()[self.decoder].tasks
        if self.task not in tasks:
            fit = sorted(k for k, d in _decoders().items() if self.task in d.tasks)
            raise ValueError(
                f"decoder {self.decoder!r} does not fit task {self.task!r}; use one of {fit}"
            )
        return self

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        _add_plugin_rules(handler.resolve_ref_schema(json_schema), handler)
        return json_schema

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


def _add_plugin_rules(schema: JsonSchemaValue, handler: GetJsonSchemaHandler) -> None:
    """What the pydantic model checks across fields, in JSON Schema ``if``/``then`` rules:
    each decoder's options and tasks, each framework's file roles."""
    rules: list[JsonSchemaValue] = []
    for ref in schema["properties"]["decoder_options"]["anyOf"]:
        key = handler.resolve_ref_schema(ref)["properties"]["decoder"]["const"]
        then = {"task": {"enum": sorted(_decoders()[key].tasks)}, "decoder_options": ref}
        rules.append(_when("decoder", key, {"properties": then}))
    for key, backend in sorted(_backends().items()):
        files = {
            "files": {"required": sorted(backend.roles)},
            "precision": {"enum": sorted(backend.precisions)},
        }
        rules.append(_when("framework", key, {"properties": files}))
    schema["allOf"] = rules


def _when(field: str, value: str, then: JsonSchemaValue) -> JsonSchemaValue:
    return {"if": {"properties": {field: {"const": value}}, "required": [field]}, "then": then}
