"""The frame envelope published on ``<prefix>.frames.<camera>`` (the device stream)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from lensbus.schemas.base import CameraId, Message

# A 4K frame is 3840x2160; anything far beyond that is a corrupt or hostile header.
MAX_SIDE = 8192


class FrameEnvelope(Message):
    """One captured frame, JPEG encoded, with when and where it was taken."""

    kind: ClassVar[str] = "frame"

    camera: CameraId = Field(description="camera id (NATS token characters)")
    seq: int = Field(ge=0, description="per-camera sequence number, strictly increasing")
    capture_ns: int = Field(ge=0, description="capture time, wall clock, ns since the Unix epoch")
    width: int = Field(gt=0, le=MAX_SIDE, description="image width in pixels")
    height: int = Field(gt=0, le=MAX_SIDE, description="image height in pixels")
    encoding: Literal["jpeg"] = Field(default="jpeg", description="image encoding of data")
    data: bytes = Field(description="the encoded image (msgpack bin)")
    source_seq: int | None = Field(
        default=None, description="index of the frame in its source, when the source has one"
    )
