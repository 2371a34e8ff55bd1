"""The one place lensbus creates JetStream resources and keeps them as the settings say:
streams (the results stream, the webhooks stream), KV buckets and object stores, each with
a replica count (``ServiceSettings.jetstream_replicas``: 1 on a single server, 3 on a
cluster).

A resource that exists is bound as it is, except for the fields its owner names (``owned``:
stream config field names; ``num_replicas`` whenever ``replicas`` is given): where one
differs, the stream is updated in place (``js.update_stream`` on the stream itself, or on a
bucket's ``KV_<bucket>``/``OBJ_<bucket>`` stream, with the config the server holds and only
those fields changed), and what changed is logged once. NATS moves the data itself when the
count changes (R1 -> R3 copies every message to the new peers; no client is involved).

``replicas=None`` means "not this caller's to decide" (a reader that may create a bucket
first, the CLI without ``--replicas``): an existing resource keeps its count, a new one
gets 1.

A count the cluster cannot place (more than its JetStream servers, or above 1 on a server
that is not in a cluster) raises :class:`ReplicasError`, naming the setting. Any other
failure to update (a NATS user allowed to create a bucket but not to change it, a timeout
during an election) is logged and the resource used as it is: it works, at its old
settings, and the next ensure tries again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import nats.errors
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, BadRequestError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from lensbus.errors import LensbusError
from lensbus.jsperms import kv_stream, obj_stream
from lensbus.logs import RateLimit, log_limited

log = logging.getLogger(__name__)
B = TypeVar("B", KeyValue, ObjectStore)

SETTING = "jetstream_replicas"
REPLICAS = "num_replicas"
# The server's err_codes for a replica count it cannot place.
NOT_CLUSTERED = 10074  # "replicas > 1 not supported in non-clustered mode"
NO_PEERS = 10005  # "no suitable peers for placement"
INSUFFICIENT_RESOURCES = 10023
PLACEMENT_ERRORS = frozenset({NOT_CLUSTERED, NO_PEERS, INSUFFICIENT_RESOURCES})
# "stream name already in use with a different configuration": made meanwhile by another
# instance (or before, with other limits): bind it and update what we own.
NAME_IN_USE = 10058

# KV and object store settings -> the fields of the stream that holds them (nats-py's own
# mapping in create_key_value / create_object_store).
KV_FIELDS = {
    "history": "max_msgs_per_subject",
    "max_value_size": "max_msg_size",
    "max_bytes": "max_bytes",
    "ttl": "max_age",
    "description": "description",
}
OBJ_FIELDS = {"max_bytes": "max_bytes", "ttl": "max_age", "description": "description"}

_warned = RateLimit(300.0)


class ReplicasError(LensbusError, ValueError):
    """A replica count the NATS servers cannot place; names the setting to change."""

    def __init__(self, resource: str, replicas: int, cause: str) -> None:
        super().__init__(
            f"{resource}: {SETTING}={replicas} cannot be placed ({cause}); set "
            f"{SETTING} (LENSBUS_<SERVICE>_JETSTREAM_REPLICAS) to at most the number of "
            "JetStream servers in the cluster, 1 on a single server"
        )
        self.resource = resource
        self.replicas = replicas


# ---- pure parts -----------------------------------------------------------------------------


def changes(have: api.StreamConfig, want: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The fields of ``want`` (stream config field -> value) that ``have`` holds otherwise,
    as ``{field: (have, want)}``. Subjects compare as sets (the server keeps their order)."""
    diff: dict[str, tuple[Any, Any]] = {}
    for name, value in want.items():
        current = getattr(have, name)
        if name == "subjects":
            same = sorted(current or []) == sorted(value or [])
        elif name == REPLICAS:
            same = (current or 1) == (value or 1)  # the server's default is 1
        elif name == "max_age":
            same = (current or 0) == (value or 0)  # None and 0 both mean "no age limit"
        else:
            same = current == value
        if not same:
            diff[name] = (current, value)
    return diff


def updated(have: api.StreamConfig, diff: Mapping[str, tuple[Any, Any]]) -> api.StreamConfig:
    """The config the server holds with the changed fields only: every other field (set by
    nats-py for a KV or object store, or by the server) goes back as it was."""
    return dataclasses.replace(have, **{name: new for name, (_, new) in diff.items()})


def describe(diff: Mapping[str, tuple[Any, Any]]) -> str:
    """``num_replicas 1 -> 3, max_age 60.0 -> 120.0``."""
    return ", ".join(f"{name} {old} -> {new}" for name, (old, new) in diff.items())


def wanted(config: api.StreamConfig, owned: Iterable[str], replicas: int | None) -> dict[str, Any]:
    """The stream fields the caller owns, with their values from ``config``; the replica
    count when given."""
    want = {name: getattr(config, name) for name in owned}
    if replicas is not None:
        want[REPLICAS] = replicas
    return want


def bucket_wanted(
    config: api.KeyValueConfig | api.ObjectStoreConfig,
    fields: Mapping[str, str],
    owned: Iterable[str],
    replicas: int | None,
) -> dict[str, Any]:
    """As :func:`wanted` for a KV or object store: ``owned`` names the bucket's settings
    (``history``, ``max_bytes``, ...), translated to its stream's fields."""
    want = {fields[name]: getattr(config, name) for name in owned}
    if replicas is not None:
        want[REPLICAS] = replicas
    return want


def placement_error(exc: BaseException) -> bool:
    """Whether a JetStream error says the replica count cannot be placed."""
    return isinstance(exc, APIError) and exc.err_code in PLACEMENT_ERRORS


def check_replicas(replicas: int | None) -> int | None:
    if replicas is not None and not 1 <= replicas <= 5:
        raise ValueError(f"{SETTING} must be 1..5, not {replicas}")
    return replicas


# ---- against the server ---------------------------------------------------------------------


async def ensure_stream(
    js: JetStreamContext,
    config: api.StreamConfig,
    owned: Iterable[str] = ("subjects",),
    *,
    replicas: int | None,
) -> api.StreamInfo:
    """Create the stream ``config`` names, or bring the ``owned`` fields and the replica
    count of the one in place to ``config``'s: the settings win."""
    name = config.name or ""
    want = wanted(config, owned, check_replicas(replicas))
    create = dataclasses.replace(config, num_replicas=replicas or config.num_replicas or 1)
    info, created = await _create_or_info(js, name, f"stream {name}", create, replicas)
    if created:
        shown = ", ".join(f"{k} {v}" for k, v in want.items() if k != "subjects")
        log.info("created stream %s over %s (%s)", name, config.subjects, shown)
        return info
    return await _bring_to(js, f"stream {name}", info, want, replicas)


async def ensure_key_value(
    js: JetStreamContext,
    config: api.KeyValueConfig,
    owned: Iterable[str] = (),
    *,
    replicas: int | None,
) -> KeyValue:
    """Bind the KV bucket ``config.bucket``, creating it where missing; the ``owned``
    settings (``history``, ``max_bytes``, ...) and the replica count are kept as given."""
    stream = kv_stream(config.bucket)
    want = bucket_wanted(config, KV_FIELDS, owned, check_replicas(replicas))
    what = f"KV bucket {config.bucket}"
    return await _ensure_bucket(
        js,
        stream,
        what,
        want,
        replicas,
        lambda: js.create_key_value(config.evolve(replicas=replicas or 1)),
        lambda: js.key_value(config.bucket),
    )


async def ensure_object_store(
    js: JetStreamContext,
    bucket: str,
    config: api.ObjectStoreConfig,
    owned: Iterable[str] = (),
    *,
    replicas: int | None,
) -> ObjectStore:
    """Bind the object store ``bucket``, creating it where missing; the ``owned`` settings
    (``max_bytes``, ``ttl``) and the replica count are kept as given.

    Lowering an object store's byte limit in place would make the server drop the chunks
    of stored objects (its stream discards), so callers own only what is safe to change."""
    stream = obj_stream(bucket)
    want = bucket_wanted(config, OBJ_FIELDS, owned, check_replicas(replicas))
    what = f"object store {bucket}"
    create = dataclasses.replace(config, bucket=bucket, replicas=replicas or 1)
    return await _ensure_bucket(
        js,
        stream,
        what,
        want,
        replicas,
        lambda: js.create_object_store(bucket, config=create),
        lambda: js.object_store(bucket),
    )


async def _ensure_bucket(
    js: JetStreamContext,
    stream: str,
    what: str,
    want: Mapping[str, Any],
    replicas: int | None,
    create: Callable[[], Awaitable[B]],
    bind: Callable[[], Awaitable[B]],
) -> B:
    """A KV bucket or object store (``stream`` holds it): created where missing (made
    meanwhile by another instance: bound), else brought to ``want``."""
    info = await _stream_info(js, stream)
    if info is None:
        try:
            made = await create()
        except Exception as exc:
            _raise_placement(exc, what, replicas)
            if not _in_use(exc):
                raise
        else:
            log.info("created %s (%s)", what, _shown(want))
            return made
        info = await js.stream_info(stream)
    await _bring_to(js, what, info, want, replicas)
    return await bind()


async def _stream_info(js: JetStreamContext, stream: str) -> api.StreamInfo | None:
    try:
        return await js.stream_info(stream)
    except NotFoundError:
        return None


async def _create_or_info(
    js: JetStreamContext,
    name: str,
    what: str,
    config: api.StreamConfig,
    replicas: int | None,
) -> tuple[api.StreamInfo, bool]:
    """The stream's info, and whether this call created it."""
    info = await _stream_info(js, name)
    if info is not None:
        return info, False
    try:
        return await js.add_stream(config), True
    except Exception as exc:
        _raise_placement(exc, what, replicas)
        if not _in_use(exc):
            raise
    return await js.stream_info(name), False


async def _bring_to(
    js: JetStreamContext,
    what: str,
    info: api.StreamInfo,
    want: Mapping[str, Any],
    replicas: int | None,
) -> api.StreamInfo:
    """Update the stream behind ``what`` where it differs from ``want``."""
    diff = changes(info.config, want)
    if not diff:
        return info
    try:
        new = await js.update_stream(updated(info.config, diff))
    except Exception as exc:
        _raise_placement(exc, what, replicas)
        if not isinstance(exc, nats.errors.Error | TimeoutError | OSError):
            raise
        key = f"{what}: {describe(diff)}"
        log_limited(
            log,
            _warned,
            key,
            logging.WARNING,
            "%s not updated (%s): %s: %s; using it as it is",
            what,
            describe(diff),
            type(exc).__name__,
            exc,
        )
        return info
    log.info("updated %s in place: %s", what, describe(diff))
    return new


def _raise_placement(exc: BaseException, what: str, replicas: int | None) -> None:
    if placement_error(exc):
        assert isinstance(exc, APIError)
        cause = exc.description or str(exc)
        raise ReplicasError(what, replicas or 1, cause) from exc


def _in_use(exc: BaseException) -> bool:
    return isinstance(exc, BadRequestError) and exc.err_code == NAME_IN_USE


def _shown(want: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in want.items() if k != "description") or "defaults"
