"""msgpack codec for lensbus messages.

Every message is a msgpack map with a schema version ``v``. Decoding never raises
anything but :class:`DecodeError`, whose ``reason`` is a short label fit for a metric.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgpack
from pydantic import ValidationError

from lensbus.errors import DecodeError, InvalidMessage, MalformedMessage, UnknownSchemaVersion
from lensbus.schemas.base import SCHEMA_VERSION, Message

__all__ = [
    "DecodeError",
    "InvalidMessage",
    "MalformedMessage",
    "UnknownSchemaVersion",
    "decode",
    "encode",
    "unpack",
]

M = TypeVar("M", bound=Message)

# Refuse messages larger than this outright: msgpack would otherwise try to allocate
# whatever length a corrupt header claims.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def encode(message: Message) -> bytes:
    """Serialize a message to msgpack bytes."""
    return msgpack.packb(message.model_dump(mode="python"), use_bin_type=True)


def unpack(data: bytes, *, kind: str = "message") -> dict[str, Any]:
    """Read the msgpack map of a message and check its schema version."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedMessage(f"expected bytes, got {type(data).__name__}", kind=kind)
    if len(data) == 0:
        raise MalformedMessage("empty payload", kind=kind)
    if len(data) > MAX_MESSAGE_BYTES:
        raise MalformedMessage(f"{len(data)} bytes is over {MAX_MESSAGE_BYTES}", kind=kind)
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types for bad input; all mean "malformed"
        raise MalformedMessage(f"not msgpack ({type(exc).__name__}: {exc})", kind=kind) from exc
    if not isinstance(obj, dict):
        raise MalformedMessage(f"expected a map, got {type(obj).__name__}", kind=kind)
    version = obj.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise MalformedMessage("missing or non-integer schema version 'v'", kind=kind)
    if version != SCHEMA_VERSION:
        raise UnknownSchemaVersion(version, SCHEMA_VERSION, kind=kind)
    return obj


def decode(data: bytes, schema: type[M]) -> M:
    """Deserialize and validate a message; raises :class:`DecodeError` and nothing else."""
    obj = unpack(data, kind=schema.kind)
    try:
        return schema.model_validate(obj)
    except ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
            for e in exc.errors(include_url=False)[:3]
        )
        raise InvalidMessage(errors, kind=schema.kind) from exc
    except Exception as exc:  # a validator on hostile input must not take a service down
        raise InvalidMessage(f"{type(exc).__name__}: {exc}", kind=schema.kind) from exc
