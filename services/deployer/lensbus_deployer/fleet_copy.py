"""A model copied from the hub's store into a device's: the relay of a fleet deploy.

The package is read from the hub's object store through the hub's JetStream domain straight
into an upload of this deployer (its file in the work dir, swept like any upload's if the
deployer dies), then committed as an upload is: the sha256 the hub announced, every file of
the package checked, stored once per version. So a device stores exactly what an operator
uploading the package to it would have stored, with the same checks.

The object is read with an ordered consumer of our own rather than nats-py's
``ObjectStore.get``: that one leaves its subscription (and its heartbeat task, which makes
the consumer anew every 10 s) running when it is cancelled or its write raises, so a copy
that timed out would keep pulling the package over the link into a dead subscription.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import Callable
from hashlib import sha256
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import DigestMismatchError
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, OBJ_DIGEST_TYPE, ObjectStore

from lensbus.jsperms import obj_stream
from lensbus.schemas import FleetDesired, ModelInfo, UploadBegin, UploadCommit
from lensbus.schemas.deploy import object_name
from lensbus.subjects import Subjects
from lensbus_deployer import metrics
from lensbus_deployer.errors import Refused
from lensbus_deployer.upload_verbs import UploadVerbs
from lensbus_deployer.uploads import Upload

# The slowest link a copy is given time for, beyond the JetStream call limit.
COPY_BYTES_PER_S = 256 * 1024


class _IntoUpload:
    """What the object's chunks are written into (in a thread, one chunk at a time): the
    upload's file, counted as the chunks of an upload are."""

    def __init__(self, upload: Upload) -> None:
        self.upload = upload

    def write(self, data: bytes) -> int:
        upload = self.upload
        if upload.received + len(data) > upload.size:
            raise ValueError(f"the hub's object is larger than its announced {upload.size} bytes")
        upload.file.write(data)
        upload.received += len(data)
        upload.last_active = time.monotonic()
        return len(data)


async def read_object(
    js: JetStreamContext, obs: ObjectStore, bucket: str, name: str, write: Callable[[bytes], Any]
) -> None:
    """``obs.get(name, writeinto=...)`` (``write`` runs in a thread, one chunk at a time),
    whose subscription ends however the read ends: done, cancelled, refused by ``write`` or
    by the digest."""
    info = await obs.get_info(name)
    if info.is_link() or not info.size:
        raise ValueError(f"{name} in the hub's store is {'a link' if info.size else 'empty'}")
    sub = await js.subscribe(
        OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=info.nuid),
        stream=obj_stream(bucket),
        ordered_consumer=True,
    )
    digest = sha256()
    try:
        pending = 1
        while pending:
            msg = await sub.next_msg(timeout=None)  # the caller's wait_for bounds the copy
            await asyncio.to_thread(write, msg.data)
            digest.update(msg.data)
            pending = msg.metadata.num_pending
    finally:
        with contextlib.suppress(Exception):  # the link may be gone: the consumer expires
            await sub.unsubscribe()
    want = (info.digest or "").replace(OBJ_DIGEST_TYPE, "").replace(OBJ_DIGEST_TYPE.upper(), "")
    if digest.digest() != base64.urlsafe_b64decode(want):
        raise DigestMismatchError


async def copy_model(
    hub_js: JetStreamContext,
    prefix: str,
    upload_verbs: UploadVerbs,
    want: FleetDesired,
    timeout_s: float,
) -> ModelInfo:
    """Copy ``want.model`` from the hub's store into the local one; its stored info. Raises
    :class:`Refused` (the checks of an upload) or NATS errors (the hub unreachable)."""
    t0 = time.perf_counter()
    bucket = Subjects(prefix).models_bucket
    obs = await hub_js.object_store(bucket)
    started = await upload_verbs.upload_begin(UploadBegin(size=want.size, sha256=want.sha256))
    uploads = upload_verbs.uploads
    upload = uploads.get(started.upload_id)
    limit = timeout_s + want.size / COPY_BYTES_PER_S
    name = object_name(want.model.name, want.model.version)
    try:
        async with upload.lock:
            await asyncio.wait_for(
                read_object(hub_js, obs, bucket, name, _IntoUpload(upload).write), limit
            )
    except BaseException:
        with contextlib.suppress(Refused):
            uploads.take(upload.id)
        upload.discard()
        metrics.UPLOADS_IN_PROGRESS.set(len(uploads))
        raise
    reply = await upload_verbs.upload_commit(UploadCommit(upload_id=upload.id))
    assert reply is not None and reply.model is not None  # our own upload
    metrics.FLEET_COPY_BYTES.inc(want.size)
    metrics.FLEET_COPY_SECONDS.observe(time.perf_counter() - t0)
    return reply.model
