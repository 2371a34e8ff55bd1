"""Inference settings: env ``LENSBUS_INFERENCE_*`` or a YAML/TOML file."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from lensbus.backends import parse_device
from lensbus.images import MAX_PIXELS
from lensbus.settings import ServiceSettings
from lensbus.subjects import INFERENCE_QUEUE_GROUP, validate_camera_id, validate_token


class InferenceSettings(ServiceSettings):
    service: ClassVar[str] = "inference"

    model: Path | None = Field(
        default=None, description="local model package (folder or .tar.gz) to serve"
    )
    group: str | None = Field(
        default=None, description="camera group whose desired model (from the deployer) to serve"
    )
    model_cache: Path = Field(
        default_factory=lambda: Path(tempfile.gettempdir()) / "lensbus-model-cache",
        description="where packages fetched from the model store are kept",
    )
    max_package_bytes: int = Field(
        default=512 * 1024 * 1024, gt=0, description="larger model packages are refused"
    )
    cameras: str = Field(default="*", description="'*' for every camera, or a comma list")
    device: str = Field(
        default="cpu", description="'cpu', 'gpu' or 'gpu:N' ('cuda', 'cuda:N' are the same)"
    )
    threads: int | None = Field(default=None, gt=0, le=256, description="model threads")
    queue_group: str = Field(default=INFERENCE_QUEUE_GROUP, description="NATS queue group")
    stream: Literal["device", "model"] = Field(
        default="device",
        description="frames to read: 'device' (as captured) or 'model' (the smaller copies "
        "capture publishes with its model_height set)",
    )
    queue_depth: int = Field(
        default=1,
        ge=1,
        le=16,
        description="frames kept per camera while the model is busy; older ones are dropped "
        "as stale (1: the newest frame wins; 2 rides out one slow frame without a loss)",
    )
    reduced_decode: bool = Field(
        default=True, description="decode JPEG at 1/2, 1/4 or 1/8 scale when the model is small"
    )
    mask_png: bool = Field(default=False, description="attach segmentation masks as PNG")
    max_frame_bytes: int = Field(
        default=16 * 1024 * 1024, gt=0, description="larger frame messages are rejected"
    )
    max_frame_pixels: int = Field(
        default=MAX_PIXELS,
        gt=0,
        description="frames whose JPEG header declares more pixels are rejected before "
        "decoding (image_too_large)",
    )
    results_acked: bool = Field(
        default=False,
        description="publish results as JetStream publishes and retry each until the results "
        "stream stores it (a cluster: none lost while a node fails; lensbus.stored)",
    )
    metrics_port: int = Field(default=9102, ge=0, le=65535, description="0 picks a free port")

    @field_validator("cameras")
    @classmethod
    def _cameras(cls, v: str) -> str:
        if v.strip() != "*":
            for cam in v.split(","):
                validate_camera_id(cam.strip())
        return v.strip()

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        parse_device(v)  # the backends' own reading: what it refuses, they would
        return v

    @field_validator("group")
    @classmethod
    def _group_token(cls, v: str | None) -> str | None:
        return None if v is None else validate_token(v, "group")

    @model_validator(mode="after")
    def _some_model(self) -> InferenceSettings:
        if self.model is None and self.group is None:
            raise ValueError("set model (a local package) or group (follow the deployer), or both")
        return self

    @field_validator("queue_group")
    @classmethod
    def _group(cls, v: str) -> str:
        return validate_token(v, "queue group")

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, v: object) -> object:
        # compose passes ${LENSBUS_INFERENCE_THREADS:-}: empty is "unset", not an error.
        return None if isinstance(v, str) and not v.strip() else v

    @property
    def camera_list(self) -> list[str] | None:
        """The cameras to serve, or ``None`` for all."""
        if self.cameras == "*":
            return None
        return [c.strip() for c in self.cameras.split(",")]
