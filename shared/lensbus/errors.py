"""Every error lensbus raises on purpose, under one base (as nats.py keeps its own in
``nats.errors``): a program can catch :class:`LensbusError` for all of them, or one kind.

One name, one meaning: a message that cannot be read is a :class:`DecodeError`, a model's
outputs that do not fit its decoder an :class:`OutputsError`, a message a service will not
process a :class:`Rejected` (whose ``reason`` labels the metric).  The modules that raise
them import them from here.
"""

from __future__ import annotations


class LensbusError(Exception):
    """The base of every lensbus error."""


class SettingsError(LensbusError):
    """Settings that cannot start a service; the message names every bad field."""


class InvalidName(LensbusError, ValueError):
    """A camera id, service, instance or prefix that cannot be a NATS subject token."""


class DecodeError(LensbusError, ValueError):
    """A message that cannot be read. ``reason`` labels the rejection in metrics."""

    reason = "malformed"

    def __init__(self, message: str, *, kind: str = "message") -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class MalformedMessage(DecodeError):
    """Not msgpack, or not a map with an integer ``v``."""

    reason = "malformed"


class UnknownSchemaVersion(DecodeError):
    """A schema version this code does not know."""

    reason = "unknown_version"

    def __init__(self, version: int, expected: int, *, kind: str = "message") -> None:
        super().__init__(f"schema version {version} is not {expected}", kind=kind)
        self.version = version


class InvalidMessage(DecodeError):
    """Well-formed msgpack of the right version whose fields do not fit the schema."""

    reason = "invalid"


class Rejected(LensbusError):
    """A message a service will not process; ``reason`` labels the metric, the message says
    why (it is logged, rate-limited, with the reason)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ImageError(LensbusError, ValueError):
    """Bytes that are not a decodable image, or an image refused before decoding (too large,
    not the size its message says); ``reason`` labels the rejection in metrics."""

    def __init__(self, message: str, reason: str = "corrupt_image") -> None:
        super().__init__(message)
        self.reason = reason


class PackageError(LensbusError, ValueError):
    """A model package that is unsafe, incomplete, corrupt or has a bad manifest."""


class ModelLoadError(LensbusError):
    """A model that cannot be loaded or run; the message names the file and what is wrong."""


class OutputsError(LensbusError, ValueError):
    """A model's outputs that do not have the shape or size its decoder and manifest expect."""


class DeployError(LensbusError):
    """The deployer refused a request (``code`` from its reply) or did not answer
    (``code`` ``unreachable``). ``message`` says what to do."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}" if code else message)
        self.code = code
        self.message = message


class ProjectError(LensbusError):
    """A project's handler asked its ``ctx`` for something it cannot have (``ctx.frame()``
    without ``"frames": true``, a frame that never came, a publish with no camera); the
    message says what to change."""
