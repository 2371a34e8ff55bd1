"""What every lensbus message has in common: a schema version, and how it may evolve.

Every model chooses one of two kinds, and says so by its base:

* **Wire** (:class:`WireMessage`, :class:`WirePart`): what one process writes and another
  reads: frames, results, events, heartbeats, swap reports, deployments, camera states,
  clip infos, the deployer's requests and replies. Unknown fields are ignored on read, so a
  reader keeps working while a producer one release ahead adds an optional field (a rolling
  upgrade of one service, a program on an older SDK); every field the reader knows is still
  validated as strictly as before. A read-modify-write by an older process drops the fields
  it does not know: a new field must be one whose absence means what it meant before.
* **Configuration** (:class:`ConfigMessage`, :class:`ConfigPart`): what a person writes: the
  model manifest (``model.json``), a camera (``lensbus cameras add``, and the cameras
  bucket). An unknown key there is a typo (``fsp: 5``) that ignoring it would hide, so it
  is refused, naming the key. A camera travels through the cameras bucket too,
  but a capture that does not know one of its settings must not run it as if unset.

Versions: ``v`` is the major version of every schema (:data:`SCHEMA_VERSION`). Adding an
optional field is compatible and keeps it. Removing or renaming a field, changing its type,
narrowing what it accepts, or adding a field an old reader must not ignore needs a new major
version, which readers of the old one refuse (``unknown_version``) instead of misreading.

:class:`Message` and :class:`Part` themselves refuse unknown fields, so a model that chose
neither kind fails closed; ``tests/test_schema_evolution.py`` checks every model chose.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from lensbus.subjects import TOKEN_PATTERN, validate_camera_id

# The major version: bumped only by a change an old reader would misread (see above).
SCHEMA_VERSION = 1

CameraId = Annotated[str, Field(pattern=TOKEN_PATTERN), AfterValidator(validate_camera_id)]

WIRE_RULES = (
    "Wire message, schema version {v} (the 'v' field; the $id names it). Readers ignore "
    "properties they do not know. Compatible, same version: adding an optional property "
    "whose absence keeps today's meaning. Needs a new major version, which readers of this "
    "one refuse: removing or renaming a property, changing its type or narrowing its values, "
    "making one required, or adding one a reader must not ignore."
)
CONFIG_RULES = (
    "Configuration written by a person, schema version {v}: unknown keys are refused (a typo "
    "must not pass). New optional keys may be added in later releases; a file using them is "
    "refused by older readers, naming the key."
)


def _wire_schema(schema: dict[str, Any], cls: type) -> None:
    # pydantic writes nothing for extra="ignore"; a foreign reader must be told it may
    # meet properties it does not know, as ours does.
    schema["additionalProperties"] = True
    if issubclass(cls, Message):
        schema["$comment"] = WIRE_RULES.format(v=SCHEMA_VERSION)


def _config_schema(schema: dict[str, Any], cls: type) -> None:
    if issubclass(cls, Message):
        schema["$comment"] = CONFIG_RULES.format(v=SCHEMA_VERSION)


class Message(BaseModel):
    """Base of every message: ``v`` is the major schema version. Subclass
    :class:`WireMessage` or :class:`ConfigMessage`, never this."""

    # Strict until a subclass chooses its kind: an unclassified model fails closed.
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ClassVar[str] = "message"
    v: int = Field(
        default=SCHEMA_VERSION,
        description="major schema version; a reader refuses a version it does not know",
    )


class Part(BaseModel):
    """Base of every piece of a message. Subclass :class:`WirePart` or :class:`ConfigPart`."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class WireMessage(Message):
    """A message between processes: unknown fields ignored, known ones strict."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=_wire_schema)


class WirePart(Part):
    """A piece of a wire message: unknown fields ignored, known ones strict."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=_wire_schema)


class ConfigMessage(Message):
    """Configuration a person writes: unknown keys refused, naming them."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_config_schema)


class ConfigPart(Part):
    """A piece of configuration: unknown keys refused, naming them."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_config_schema)
