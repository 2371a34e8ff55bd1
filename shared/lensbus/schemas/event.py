"""The event a publisher rule raises, published on ``<prefix>.events.<camera>``.

A rule fires when a label it watches is seen with enough score (optionally on N results in a
row), at most once per cooldown. The JPEG of the frame that fired it is kept in the JetStream
object store ``lensbus-snapshots`` under the name in :attr:`Event.snapshot`.

The publisher also keeps a clip of the camera around the event (``clip_pre_s`` before to
``clip_post_s`` after the event's frame) as an MJPEG AVI in the object store ``lensbus-clips``,
named :func:`clip_id` of the event's camera, seq and capture time, and described by the
:class:`ClipInfo` in its ``Lensbus-Clip`` object header. The name is derived, not carried in
the event, so an event is published at once, seconds before its clip is complete (and
readers from before wire messages ignored unknown fields still read it).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from lensbus.schemas.base import CameraId, WireMessage
from lensbus.schemas.result import Box, ModelRef
from lensbus.subjects import CLIPS_BUCKET, SNAPSHOTS_BUCKET, validate_camera_id


def snapshot_name(camera: str, seq: int, capture_ns: int) -> str:
    """Object name of a frame's snapshot in the snapshots bucket."""
    return f"{camera}/{capture_ns}-{seq}.jpg"


def clip_id(camera: str, seq: int, capture_ns: int) -> str:
    """Id (and object name in the clips bucket) of the clip around an event's frame: one
    token, safe in a URL and a file name (``<camera>-<capture_ns>-<seq>``)."""
    return f"{camera}-{capture_ns}-{seq}"


def parse_clip_id(value: str) -> tuple[str, int, int]:
    """``(camera, capture_ns, seq)`` of a clip id; ValueError when it is not one."""
    camera, _, rest = value.rpartition("-")
    camera, _, ns = camera.rpartition("-")
    if not (ns.isdigit() and rest.isdigit()):
        raise ValueError(f"not a clip id {value!r}: expected <camera>-<capture_ns>-<seq>")
    try:
        validate_camera_id(camera)
    except ValueError as exc:
        raise ValueError(f"not a clip id {value!r}: {exc}") from None
    return camera, int(ns), int(rest)


class Event(WireMessage):
    """A rule fired on a camera's result."""

    kind: ClassVar[str] = "event"

    rule: str = Field(description="name of the rule that fired")
    camera: CameraId
    label: str = Field(description="the label seen")
    score: float = Field(ge=0.0, le=1.0, description="its score (area fraction for a segment)")
    seq: int = Field(ge=0, description="seq of the frame the result is for")
    capture_ns: int = Field(ge=0, description="capture time of that frame, ns since the epoch")
    event_ns: int = Field(ge=0, description="when the event was raised, ns since the epoch")
    consecutive: int = Field(default=1, ge=1, description="matching results in a row so far")
    model: ModelRef | None = Field(default=None, description="model that produced the result")
    box: Box | None = Field(default=None, description="where the label was seen, if it has one")
    snapshot: str = Field(
        default="", description="object name of the frame's JPEG in snapshot_bucket; '' if none"
    )
    snapshot_bucket: str = Field(default=SNAPSHOTS_BUCKET, description="JetStream object store")
    trigger: Literal["rule", "enter", "leave", "loiter", "cross", "project"] = Field(
        default="rule",
        description="a publisher rule, what a tracked object did in a zone/line, or a project's "
        "ctx.event (its name in 'project')",
    )
    zone: str = Field(default="", description="the zone or line (its name is also 'rule')")
    direction: Literal["", "in", "out"] = Field(default="", description="a line crossing's")
    track_id: int | None = Field(default=None, ge=1, description="the tracked object")
    dwell_s: float | None = Field(default=None, ge=0.0, description="seconds in the zone so far")
    project: str = Field(default="", description="the project that raised it (trigger 'project')")
    detail: dict[str, Any] | None = Field(
        default=None, description="what a project attached to its event (msgpack types)"
    )


ClipEnd = Literal["complete", "frames_stopped", "max_bytes"]


class ClipInfo(WireMessage):
    """What a kept clip holds: stored as JSON in its object's ``Lensbus-Clip`` header."""

    kind: ClassVar[str] = "clip"

    id: str = Field(description="clip_id(camera, event seq, event capture_ns)")
    camera: CameraId
    rule: str = Field(description="the rule whose event the clip is around")
    label: str = Field(default="", description="the label the event saw")
    event_seq: int = Field(ge=0, description="seq of the event's frame")
    event_capture_ns: int = Field(ge=0, description="capture time of the event's frame")
    start_ns: int = Field(ge=0, description="capture time of the clip's first frame")
    end_ns: int = Field(ge=0, description="capture time of the clip's last frame")
    frames: int = Field(ge=1, description="JPEG frames in the clip")
    fps: float = Field(gt=0, description="frame rate in the AVI header (frames over the span)")
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    pre_s: float = Field(ge=0, description="seconds asked for before the event's frame")
    post_s: float = Field(ge=0, description="seconds asked for after it")
    ended: ClipEnd = Field(
        default="complete",
        description="complete; frames_stopped (the camera sent nothing more); max_bytes "
        "(cut at clip_max_bytes)",
    )
    container: Literal["avi-mjpeg"] = Field(
        default="avi-mjpeg", description="the stored JPEGs, as they arrived, in a RIFF AVI"
    )
    bucket: str = Field(default=CLIPS_BUCKET, description="JetStream object store")
