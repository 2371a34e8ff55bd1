"""What every lensbus message has in common: a schema version and strict fields."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from lensbus.subjects import TOKEN_PATTERN, validate_camera_id

# Bumped when a message changes in a way an old reader would misread.
SCHEMA_VERSION = 1

CameraId = Annotated[str, Field(pattern=TOKEN_PATTERN), AfterValidator(validate_camera_id)]


class Message(BaseModel):
    """Base of every message on the bus. ``v`` is the schema version."""

    # Unknown fields are refused rather than silently dropped: a field we do not know is
    # a sign of a schema mismatch that a version bump should have announced.
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ClassVar[str] = "message"
    v: int = SCHEMA_VERSION


class Part(BaseModel):
    """A strict, immutable piece of a message."""

    model_config = ConfigDict(extra="forbid", frozen=True)
