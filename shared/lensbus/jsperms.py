"""JetStream API permissions of a NATS user: reading or managing a stream, a KV bucket, an
object store (the building blocks of :mod:`lensbus.natsauth`), and the JetStream subjects
they are made of (another domain's API, a KV key's subject)."""

from __future__ import annotations

from lensbus.subjects import Subjects, validate_token

JS_API = "$JS.API"
# Every domain at once, in a permission (a hub probing whichever device it sources).
ANY_DOMAIN = "*"


def domain_api(domain: str) -> str:
    """The JetStream API of a domain (``$JS.<domain>.API``: a source's ``external.api``, what
    ``nc.jetstream(domain=...)`` requests on); :data:`ANY_DOMAIN` in a permission."""
    if domain != ANY_DOMAIN:
        validate_token(domain, "JetStream domain")
    return f"$JS.{domain}.API"


def domain_of(api: str) -> str | None:
    """The domain whose API ``api`` is (the inverse of :func:`domain_api`), else ``None``."""
    head, _, rest = api.partition(".")
    domain, _, tail = rest.partition(".")
    if head != "$JS" or tail != "API" or not domain or domain == ANY_DOMAIN:
        return None
    return domain


def account_info(api: str = JS_API) -> str:
    """JetStream's account info request (what answers whether a domain is reachable)."""
    return f"{api}.INFO"


def stream_info(stream: str, api: str = JS_API) -> str:
    """The ``STREAM.INFO`` request of ``stream`` (through another domain's ``api``)."""
    return f"{api}.STREAM.INFO.{stream}"


def kv_subject(bucket: str, key: str = ">") -> str:
    """The subject a KV bucket keeps ``key`` on (a pattern: ``>``, ``seen.*``)."""
    return f"$KV.{bucket}.{key}"


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


def stream_read(stream: str, api: str = JS_API) -> list[str]:
    """Publish permissions to read a stream: its info, direct and stored-message gets, and
    consumers of its own (ephemeral, ordered or durable) with their acks and flow control;
    not deleting consumers (nats-py never does on its own; ephemeral ones expire). ``api``:
    another domain's (:func:`domain_api`), to read a stream of that domain.

    ``STREAM.NAMES`` (the names of the account's streams, nothing else) is how nats-py finds
    the stream of a subject when it subscribes (KV watch, object store get)."""
    return [
        f"{api}.STREAM.NAMES",
        stream_info(stream, api),
        f"{api}.STREAM.MSG.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}.>",
        f"{api}.CONSUMER.CREATE.{stream}",
        f"{api}.CONSUMER.CREATE.{stream}.>",
        f"{api}.CONSUMER.DURABLE.CREATE.{stream}.*",
        f"{api}.CONSUMER.INFO.{stream}.*",
        f"{api}.CONSUMER.MSG.NEXT.{stream}.*",
        f"$JS.ACK.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]


def stream_admin(stream: str, api: str = JS_API) -> list[str]:
    """Reading plus creating, updating and purging a stream and deleting its consumers (not
    deleting the stream)."""
    return [
        f"{api}.CONSUMER.DELETE.{stream}.*",
        f"{api}.STREAM.CREATE.{stream}",
        f"{api}.STREAM.UPDATE.{stream}",
        f"{api}.STREAM.PURGE.{stream}",
        f"{api}.STREAM.MSG.DELETE.{stream}",
        *stream_read(stream, api),
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
