"""The event a publisher rule raises, published on ``<prefix>.events.<camera>``.

A rule fires when a label it watches is seen with enough score (optionally on N results in a
row), at most once per cooldown. The JPEG of the frame that fired it is kept in the JetStream
object store ``lensbus-snapshots`` under the name in :attr:`Event.snapshot`.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from lensbus.schemas.base import CameraId, Message
from lensbus.schemas.result import Box, ModelRef
from lensbus.subjects import SNAPSHOTS_BUCKET


def snapshot_name(camera: str, seq: int, capture_ns: int) -> str:
    """Object name of a frame's snapshot in the snapshots bucket."""
    return f"{camera}/{capture_ns}-{seq}.jpg"


class Event(Message):
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
