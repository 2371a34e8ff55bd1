"""JetStream API permissions of a NATS user: reading or managing a stream, a KV bucket, an
object store (the building blocks of :mod:`lensbus.natsauth`)."""

from __future__ import annotations

from lensbus.subjects import Subjects

JS_API = "$JS.API"


# JetStream keeps a KV bucket B in the stream KV_B (subjects $KV.B.<key>) and an object
# store B in the stream OBJ_B (subjects $O.B.C.<nuid> for chunks, $O.B.M.<name> for meta).
# The bucket names come from the installation's ``Subjects(prefix)``.
def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def obj_stream(bucket: str) -> str:
    return f"OBJ_{bucket}"


def inbox_prefix(user: str) -> str:
    """Where ``user`` receives replies (JetStream API, deployer, push consumers' deliveries):
    nats-py's ``inbox_prefix``; its permissions allow subscribing to this and no other inbox."""
    return f"_INBOX_{user}"


def stream_read(stream: str) -> list[str]:
    """Publish permissions to read a stream: its info, direct and stored-message gets, and
    consumers of its own (ephemeral, ordered or durable) with their acks and flow control;
    not deleting consumers (nats-py never does on its own; ephemeral ones expire).

    ``STREAM.NAMES`` (the names of the account's streams, nothing else) is how nats-py finds
    the stream of a subject when it subscribes (KV watch, object store get)."""
    return [
        f"{JS_API}.STREAM.NAMES",
        f"{JS_API}.STREAM.INFO.{stream}",
        f"{JS_API}.STREAM.MSG.GET.{stream}",
        f"{JS_API}.DIRECT.GET.{stream}",
        f"{JS_API}.DIRECT.GET.{stream}.>",
        f"{JS_API}.CONSUMER.CREATE.{stream}",
        f"{JS_API}.CONSUMER.CREATE.{stream}.>",
        f"{JS_API}.CONSUMER.DURABLE.CREATE.{stream}.*",
        f"{JS_API}.CONSUMER.INFO.{stream}.*",
        f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.*",
        f"$JS.ACK.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]


def stream_admin(stream: str) -> list[str]:
    """Reading plus creating, updating and purging a stream and deleting its consumers (not
    deleting the stream)."""
    return [
        f"{JS_API}.CONSUMER.DELETE.{stream}.*",
        f"{JS_API}.STREAM.CREATE.{stream}",
        f"{JS_API}.STREAM.UPDATE.{stream}",
        f"{JS_API}.STREAM.PURGE.{stream}",
        f"{JS_API}.STREAM.MSG.DELETE.{stream}",
        *stream_read(stream),
    ]


def cameras_bucket(s: Subjects, keys: str) -> list[str]:
    """Writing the ``keys`` of the cameras bucket, reading all of it, and creating it where
    missing (capture and the CLI both may come first); never updating its limits, purging
    or deleting it."""
    return [
        f"$KV.{s.cameras_bucket}.{keys}",
        f"{JS_API}.STREAM.CREATE.{kv_stream(s.cameras_bucket)}",
        *stream_read(kv_stream(s.cameras_bucket)),
    ]


def object_store(bucket: str) -> list[str]:
    """Writing (chunks, meta) and managing the object store ``bucket``."""
    return [f"$O.{bucket}.>", *stream_admin(obj_stream(bucket))]
