"""The frame envelope published on ``<prefix>.frames.<camera>`` (the device stream) and, when
capture makes one, on ``<prefix>.model-frames.<camera>`` (the model stream: the same frames,
smaller, for inference), and what a consumer of the device stream says on
``<prefix>.want.frames.<camera>``."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from lensbus.schemas.base import CameraId, WireMessage

# A 4K frame is 3840x2160; anything far beyond that is a corrupt or hostile header.
MAX_SIDE = 8192


class FrameEnvelope(WireMessage):
    """One captured frame, JPEG encoded, with when and where it was taken."""

    kind: ClassVar[str] = "frame"

    camera: CameraId = Field(description="camera id (NATS token characters)")
    seq: int = Field(ge=0, description="per-camera sequence number, strictly increasing")
    capture_ns: int = Field(
        ge=0,
        description="when the frame was read from the source (a live source: when its reader "
        "thread grabbed it), wall clock, ns since the Unix epoch",
    )
    width: int = Field(gt=0, le=MAX_SIDE, description="image width in pixels")
    height: int = Field(gt=0, le=MAX_SIDE, description="image height in pixels")
    encoding: Literal["jpeg"] = Field(default="jpeg", description="image encoding of data")
    data: bytes = Field(description="the encoded image (msgpack bin)")
    source_seq: int | None = Field(
        default=None, description="index of the frame in its source, when the source has one"
    )
    full_width: int | None = Field(
        default=None,
        gt=0,
        le=MAX_SIDE,
        description="model stream only: width of the device-stream frame this is a copy of",
    )
    full_height: int | None = Field(
        default=None,
        gt=0,
        le=MAX_SIDE,
        description="model stream only: height of the device-stream frame this is a copy of",
    )

    @property
    def frame_size(self) -> tuple[int, int]:
        """(width, height) of the frame as captured: what result pixels refer to."""
        return (self.full_width or self.width, self.full_height or self.height)


class FramesWanted(WireMessage):
    """A consumer of a camera's device stream saying it is there (on
    ``<prefix>.want.frames.<camera>``). An empty message means the same with the defaults:
    the simplest way for a program in any language."""

    kind: ClassVar[str] = "frames_wanted"

    by: str = Field(default="", max_length=128, description="who wants them (for the logs)")
    for_s: float = Field(
        default=10.0,
        ge=1.0,
        le=300.0,
        description="how long this holds, in seconds: say it again before it runs out",
    )
