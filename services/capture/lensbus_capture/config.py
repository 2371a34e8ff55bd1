"""Capture settings: env ``LENSBUS_CAPTURE_*`` or a YAML/TOML file."""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

from pydantic import Field

from lensbus.schemas import CameraId
from lensbus.schemas.camera import CameraConfig, SourceOptions
from lensbus.settings import ServiceSettings


def _camera_field(name: str, default: Any = None) -> Any:
    """``CameraConfig``'s field ``name`` (type rules, bounds, description) for a setting."""
    field = copy.copy(CameraConfig.model_fields[name])
    if default is not None:
        field.default = default
    return field


class CaptureSettings(ServiceSettings):
    service: ClassVar[str] = "capture"

    # Capture yields the CPU to the model when both want it: with the model behind the
    # camera on 2 cores, 1.46x the results/s at a lower latency (bench/cores.py, ONNX 1080p,
    # docs/architecture.md "Cores"); at a camera's rate nothing waits, so nothing changes.
    nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="capture's nice value (0-19): 10 yields the CPU to the model when both want it",
    )
    camera: CameraId = Field(default="cam1", description="camera id used in subjects")
    # The camera's fields and their rules are CameraConfig's (the bucket's cameras), once.
    source: str = _camera_field("source", "test")
    fps: float = _camera_field("fps")
    width: int | None = _camera_field("width")
    height: int | None = _camera_field("height")
    jpeg_quality: int = _camera_field("jpeg_quality")
    model_height: int | None = _camera_field("model_height")
    device_stream: Literal["on_demand", "always"] = _camera_field("device_stream")
    idle_fps: float = _camera_field("idle_fps")
    loop: bool = _camera_field("loop")
    options: SourceOptions = _camera_field("options")
    cameras_from: Literal["settings", "bucket", "both"] = Field(
        default="settings",
        description="settings: the one camera above; bucket: the cameras of this node in the "
        "lensbus-cameras KV bucket, added and removed at run time; both",
    )
    # this instance runs the bucket's cameras whose node is this one
    node: str = _camera_field("node")
    reopen_max_s: float = Field(default=5.0, gt=0, le=300, description="longest reopen back-off")
    metrics_port: int = Field(default=9101, ge=0, le=65535, description="0 picks a free port")

    def camera_config(self) -> CameraConfig:
        """The one camera these settings describe (``CameraConfig`` applies its own rules,
        the test pattern's default size among them)."""
        return CameraConfig(
            id=self.camera,
            source=self.source,
            fps=self.fps,
            width=self.width,
            height=self.height,
            jpeg_quality=self.jpeg_quality,
            model_height=self.model_height,
            device_stream=self.device_stream,
            idle_fps=self.idle_fps,
            loop=self.loop,
            node=self.node,
            options=self.options,
        )
