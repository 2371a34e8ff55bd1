"""The model package manifest (``model.json``).

A model package is a folder or ``.tar.gz`` holding ``model.json`` and the files it lists.
The manifest says how to feed the model (input size, layout, colour order, normalisation)
and how to read its outputs (task, decoder, labels, thresholds).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, model_validator

from lensbus.schemas.base import Message, Part
from lensbus.schemas.result import Task

Framework = Literal["mxnet", "onnx", "opencv"]
Decoder = Literal["classification", "ssd", "yolo", "segmentation"]

# The file roles each framework needs; a backend reads its files by role.
REQUIRED_ROLES: dict[str, frozenset[str]] = {
    "mxnet": frozenset({"symbol", "params"}),
    "onnx": frozenset({"model"}),
    "opencv": frozenset({"model"}),
}
# Which decoders make sense for which task.
TASK_DECODERS: dict[str, frozenset[str]] = {
    "classification": frozenset({"classification"}),
    "detection": frozenset({"ssd", "yolo"}),
    "segmentation": frozenset({"segmentation"}),
}

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


class ModelFile(Part):
    path: Annotated[str, AfterValidator(_check_relpath)] = Field(
        description="path inside the package"
    )
    sha256: Annotated[str, AfterValidator(_check_sha256)]
    size: int = Field(ge=0, description="size in bytes")


class InputSpec(Part):
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
    resize: Literal["stretch", "letterbox"] = "stretch"

    @model_validator(mode="after")
    def _std_positive(self) -> InputSpec:
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self


class Manifest(Message):
    """``model.json``: what a model package holds and how to run it."""

    kind: ClassVar[str] = "manifest"

    name: Annotated[str, AfterValidator(_check_name)]
    version: Annotated[str, AfterValidator(_check_version)]
    framework: Framework
    task: Task
    decoder: Decoder
    input: InputSpec
    labels: list[str] = Field(min_length=1)
    score_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    nms_threshold: float = Field(default=0.45, ge=0.0, le=1.0)
    top_k: int = Field(default=5, gt=0, description="classes reported for classification")
    decoder_options: dict[str, Any] = Field(
        default_factory=dict, description="decoder-specific settings, e.g. SSD output layout"
    )
    files: dict[str, ModelFile] = Field(description="role -> file; roles depend on framework")
    description: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        missing = REQUIRED_ROLES[self.framework] - set(self.files)
        if missing:
            raise ValueError(f"framework {self.framework!r} needs files {sorted(missing)}")
        if self.decoder not in TASK_DECODERS[self.task]:
            raise ValueError(
                f"decoder {self.decoder!r} does not fit task {self.task!r}; "
                f"use one of {sorted(TASK_DECODERS[self.task])}"
            )
        return self

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"
