"""Cameras as desired state: what capture should read, and what it reports it is doing.

Both live in the JetStream KV bucket ``lensbus-cameras`` (NATS KV allows dots in keys):

* ``camera.<id>`` holds a :class:`CameraConfig`, written by ``lensbus cameras add/update``
  and deleted by ``lensbus cameras remove``; capture instances watch these keys and start,
  restart or stop a reader for each, without a restart of their own;
* ``state.<id>`` holds the :class:`CameraState` the capture instance that runs the camera
  last reported (opening, running, retrying with the reason, stopped); ``lensbus cameras
  list`` and the publisher's page read them.

A capture instance runs the cameras whose ``node`` is its own ``node`` setting (``default``
unless set), so several capture machines can share one bucket.
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field, model_validator

from lensbus.schemas.base import CameraId, ConfigMessage, ConfigPart, WireMessage
from lensbus.schemas.frame import MAX_SIDE
from lensbus.subjects import validate_token

CAMERA_PREFIX = "camera."
STATE_PREFIX = "state."


def camera_key(camera: str) -> str:
    return f"{CAMERA_PREFIX}{camera}"


def state_key(camera: str) -> str:
    return f"{STATE_PREFIX}{camera}"


_FOURCC = re.compile(r"^[A-Za-z0-9 ]{4}$")


def _check_fourcc(v: str | None) -> str | None:
    if v is not None and not _FOURCC.match(v):
        raise ValueError("a FOURCC is 4 characters, e.g. 'MJPG' or 'YUYV'")
    return v


def _check_node(v: str) -> str:
    return validate_token(v, "node")


class SourceOptions(ConfigPart):
    """How to open a source; every field is optional and only applies where it can."""

    capture_width: int | None = Field(
        default=None, gt=0, le=MAX_SIDE, description="V4L2: ask the camera for this width"
    )
    capture_height: int | None = Field(
        default=None, gt=0, le=MAX_SIDE, description="V4L2: ask the camera for this height"
    )
    fourcc: Annotated[str | None, AfterValidator(_check_fourcc)] = Field(
        default=None, description="V4L2: pixel format to ask for, e.g. 'MJPG' (cheap to read)"
    )
    rtsp_transport: Literal["tcp", "udp"] | None = Field(
        default=None, description="RTSP: transport (FFmpeg's default when unset)"
    )
    open_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="give up opening a network source after this"
    )
    read_timeout_s: float = Field(
        default=5.0, gt=0, le=300, description="a live source silent this long is reopened"
    )


class CameraConfig(ConfigMessage):
    """One camera: where its frames come from and how capture publishes them.

    The same fields as capture's single-camera settings (``LENSBUS_CAPTURE_*``)."""

    kind: ClassVar[str] = "camera"

    id: CameraId = Field(description="camera id used in subjects")
    source: str = Field(
        min_length=1,
        max_length=4096,
        description="'test' (synthetic pattern), a camera index or /dev/videoN, an rtsp:// "
        "or http(s):// URL, a video file, or a folder of images",
    )
    fps: float = Field(default=15.0, gt=0, le=240, description="frames per second, at most")
    width: int | None = Field(default=None, gt=0, le=MAX_SIDE, description="output width")
    height: int | None = Field(default=None, gt=0, le=MAX_SIDE, description="output height")
    jpeg_quality: int = Field(default=85, ge=1, le=100, description="JPEG quality 1-100")
    model_height: int | None = Field(
        default=None,
        gt=0,
        le=MAX_SIDE,
        description="also publish every frame at this height on the model stream",
    )
    device_stream: Literal["on_demand", "always"] = Field(
        default="on_demand",
        description="with a model stream: on_demand encodes every device-stream frame only "
        "while a consumer says it is there (<prefix>.want.frames.<camera>), else idle_fps; "
        "always encodes every frame. Without a model stream inference reads the device "
        "stream: always",
    )
    idle_fps: float = Field(
        default=1.0,
        ge=0,
        le=30,
        description="on_demand, nobody wanting it: device-stream frames a second (0: none)",
    )
    loop: bool = Field(default=False, description="restart a video file or folder at its end")
    group: str | None = Field(
        default=None,
        description="camera group (the deployer's group whose model serves it); informative",
    )
    node: Annotated[str, AfterValidator(_check_node)] = Field(
        default="default", description="the capture instances (their 'node' setting) that run it"
    )
    options: SourceOptions = Field(default_factory=SourceOptions)

    @model_validator(mode="after")
    def _test_pattern_size(self) -> CameraConfig:
        # The test pattern has no size of its own: default to VGA.
        if self.source == "test" and self.width is None and self.height is None:
            object.__setattr__(self, "width", 640)  # frozen: set once, while validating
            object.__setattr__(self, "height", 480)
        return self


CameraStateName = Literal["opening", "running", "retrying", "ended", "stopped"]


class CameraState(WireMessage):
    """What the capture instance running a camera last reported about it."""

    kind: ClassVar[str] = "camera_state"

    camera: CameraId
    state: CameraStateName = Field(
        description="opening; running; retrying (cannot open or lost: see reason, retried "
        "with back-off); ended (a file or folder without loop); stopped (removed)"
    )
    reason: str = Field(default="", description="why it is not running, when it is not")
    instance: str = Field(description="the capture instance that runs it")
    node: str = Field(default="default")
    since_ns: int = Field(ge=0, description="when it entered this state, ns since the epoch")
    frames: int = Field(default=0, ge=0, description="frames published since it started")
