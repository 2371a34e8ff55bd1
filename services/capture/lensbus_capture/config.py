"""Capture settings: env ``LENSBUS_CAPTURE_*`` or a YAML/TOML file."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from lensbus.schemas import MAX_SIDE, CameraId
from lensbus.settings import ServiceSettings


class CaptureSettings(ServiceSettings):
    service: ClassVar[str] = "capture"

    camera: CameraId = Field(default="cam1", description="camera id used in subjects")
    source: str = Field(
        default="test",
        description="'test' (synthetic pattern), a camera index or /dev/videoN, "
        "an rtsp:// or http(s):// URL, a video file, or a folder of images",
    )
    fps: float = Field(default=15.0, gt=0, le=240, description="frames per second, at most")
    width: int | None = Field(default=None, gt=0, le=MAX_SIDE, description="output width")
    height: int | None = Field(default=None, gt=0, le=MAX_SIDE, description="output height")
    jpeg_quality: int = Field(default=85, ge=1, le=100, description="JPEG quality 1-100")
    model_height: int | None = Field(
        default=None,
        gt=0,
        le=MAX_SIDE,
        description="also publish every frame at this height (aspect kept) on the model "
        "stream, for inference (its stream='model'); unset: no model stream",
    )
    loop: bool = Field(default=False, description="restart a video file or folder at its end")
    reopen_max_s: float = Field(default=5.0, gt=0, le=300, description="longest reopen back-off")
    metrics_port: int = Field(default=9101, ge=0, le=65535, description="0 picks a free port")

    @model_validator(mode="after")
    def _test_pattern_size(self) -> CaptureSettings:
        # The test pattern has no size of its own: default to VGA.
        if self.source == "test" and self.width is None and self.height is None:
            self.width, self.height = 640, 480
        return self
