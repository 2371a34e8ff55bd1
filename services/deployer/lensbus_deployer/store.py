"""The JetStream resources the deployer owns: the object store ``lensbus-models`` (model
packages) and the KV bucket ``lensbus-deployments`` (desired model per group, swap reports).

A put into nats-py's object store publishes the chunks first and the object's meta record
last, so an object becomes visible (in ``list``, to ``get``) only once complete. A put cut
short (a deployer killed mid-put) leaves chunks with no meta: invisible, but taking space;
:meth:`Store.purge_orphans` removes them once they are old enough not to be a put in
progress.
"""

from __future__ import annotations

import asyncio
import io
import logging
import tarfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from nats.js import JetStreamContext, api
from nats.js.api import ObjectInfo
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from lensbus import metrics as shared_metrics
from lensbus.codec import DecodeError, decode, encode
from lensbus.jetstream import ensure_key_value, ensure_object_store
from lensbus.modelpkg import MANIFEST, PackageError, read_manifest
from lensbus.schemas import Deployment, Manifest, ModelInfo, PipelineDeployment, SwapReport
from lensbus.schemas.deploy import group_key, object_name, pipeline_key, report_key
from lensbus.subjects import Subjects
from lensbus_deployer.config import DeployerSettings
from lensbus_deployer.errors import Refused, StaleRecord
from lensbus_deployer.model_objects import (
    H_CONTENT,
    header,
    header_labels,
    model_info,
    object_headers,
)

log = logging.getLogger(__name__)

GROUP_PREFIX = group_key("")  # "group."
REPORT_PATTERN = "report.>"
# Longest wait for the initial values of a KV watch (a snapshot).
SNAPSHOT_TIMEOUT_S = 5.0
# Attempts at a compare-and-set write of a group's record before giving up.
CAS_ATTEMPTS = 10

R = TypeVar("R")


class Stored(Protocol):
    """What a stored version's info (ModelInfo, ProjectInfo) is sorted by."""

    name: str
    version: str
    uploaded_ns: int


S = TypeVar("S", bound=Stored)


async def stored_objects(obs: ObjectStore, parse: Callable[[ObjectInfo], S | None]) -> list[S]:
    """Every complete version in an object store (an interrupted put has no meta, so it is
    not here), by name and upload time."""
    try:
        objects = await obs.list(ignore_deletes=True)
    except NotFoundError:
        return []
    found = [info for o in objects if (info := parse(o)) is not None]
    found.sort(key=lambda i: (i.name, i.uploaded_ns, i.version))
    return found


async def stored_object(
    obs: ObjectStore, name: str, parse: Callable[[ObjectInfo], S | None]
) -> tuple[S, str] | None:
    """One stored version and its content digest, or ``None``."""
    try:
        o = await obs.get_info(name)
    except NotFoundError:
        return None
    info = parse(o)
    return None if info is None else (info, header(o.headers, H_CONTENT) or "")


def _model_info(o: ObjectInfo) -> ModelInfo | None:
    return model_info(o.name, o.size, o.digest, o.description, o.headers)


async def compare_and_set(
    read: Callable[[], Awaitable[tuple[R | None, int]]],
    write: Callable[[R, int], Awaitable[object]],
    change: Callable[[R | None], R],
    what: str,
) -> R:
    """Read a record and its revision, change it, write it if it is still at that revision;
    again when another deployer wrote it first (:class:`StaleRecord`), at most CAS_ATTEMPTS."""
    for _ in range(CAS_ATTEMPTS):
        record, revision = await read()
        new = change(record)
        try:
            await write(new, revision)
        except StaleRecord:
            continue
        return new
    raise Refused("internal", f"{what} changed too often; try again")


@dataclass(frozen=True)
class VersionedPipeline:
    """A group's pipeline record and its KV revision (0: no record). ``unreadable`` says why
    a record that is there could not be decoded (written by a newer lensbus, damaged)."""

    record: PipelineDeployment | None
    revision: int
    unreadable: str = ""


@dataclass(frozen=True)
class Versioned:
    """A group's deployment and the KV revision it was read at (0: no record)."""

    deployment: Deployment | None
    revision: int


class Store:
    """Buckets bound (or created) on a JetStream context; every call may raise NATS errors."""

    def __init__(self, js: JetStreamContext, settings: DeployerSettings) -> None:
        self.js = js
        self.s = settings
        self.names = Subjects(settings.prefix)  # the installation's buckets
        self._obs: ObjectStore | None = None
        self._kv: KeyValue | None = None
        # Labels of stored packages by content digest (a stored version never changes).
        self._labels: dict[str, list[str]] = {}

    @property
    def obs(self) -> ObjectStore:
        assert self._obs is not None, "store not ready"
        return self._obs

    @property
    def kv(self) -> KeyValue:
        assert self._kv is not None, "store not ready"
        return self._kv

    @property
    def ready(self) -> bool:
        return self._obs is not None and self._kv is not None

    async def ensure(self) -> None:
        """Bind the buckets, creating them (file storage, limits) where missing, at the
        settings' replica count (updated in place where it differs)."""
        replicas = self.s.jetstream_replicas
        obs = await ensure_object_store(
            self.js,
            self.names.models_bucket,
            api.ObjectStoreConfig(
                description="lensbus model packages (<name>/<version>, .tar.gz)",
                storage=api.StorageType.FILE,
                max_bytes=self.s.store_max_bytes,
            ),
            replicas=replicas,
        )
        kv = await ensure_key_value(
            self.js,
            api.KeyValueConfig(
                bucket=self.names.deployments_bucket,
                description="lensbus desired model per camera group, and swap reports",
                history=self.s.kv_history,
                max_value_size=self.s.kv_max_value_bytes,
                max_bytes=self.s.kv_max_bytes,
                storage=api.StorageType.FILE,
            ),
            replicas=replicas,
        )
        self._obs, self._kv = obs, kv

    @property
    def models_stream(self) -> str:
        return f"OBJ_{self.names.models_bucket}"

    # ---- models ---------------------------------------------------------------------------

    async def list_models(self) -> list[ModelInfo]:
        """Every complete model version (an interrupted put has no meta, so is not here)."""
        return await stored_objects(self.obs, _model_info)

    async def model(self, name: str, version: str) -> tuple[ModelInfo, str] | None:
        """A stored version and its content digest, or ``None``."""
        return await stored_object(self.obs, object_name(name, version), _model_info)

    async def labels(self, name: str, version: str) -> list[str] | None:
        """The labels of a stored version's manifest, or ``None`` when it is not stored."""
        try:
            o = await self.obs.get_info(object_name(name, version))
        except NotFoundError:
            return None
        labels = header_labels(o.headers)
        if labels is not None:
            return labels
        content = header(o.headers, H_CONTENT) or object_name(name, version)
        if content not in self._labels:
            # Stored before the labels header: read model.json, the archive's first member.
            result = await self.obs.get(object_name(name, version))
            manifest = await asyncio.to_thread(_archive_manifest, result.data or b"")
            self._labels[content] = list(manifest.labels)
        return self._labels[content]

    async def put_model(
        self, manifest: Manifest, archive: Path, archive_sha256: str, content: str
    ) -> ModelInfo:
        uploaded_ns = time.time_ns()
        meta = api.ObjectMeta(
            name=object_name(manifest.name, manifest.version),
            description=manifest.description,
            headers=object_headers(manifest, archive_sha256, content, uploaded_ns),
            options=api.ObjectMetaOptions(max_chunk_size=self.s.store_chunk_bytes),
        )
        f = await asyncio.to_thread(open, archive, "rb")
        try:
            o = await self.obs.put(meta.name or "", f, meta=meta)
        finally:
            f.close()
        info = model_info(o.name, o.size, o.digest, o.description, o.headers)
        assert info is not None
        if info.sha256 != archive_sha256:  # the bytes stored are not the bytes checked
            await self.obs.delete(o.name)
            raise RuntimeError(f"{manifest.ref}: the stored object's sha256 differs; deleted it")
        return info

    async def store_bytes(self) -> int:
        info = await self.js.stream_info(self.models_stream)
        return int(info.state.bytes)

    async def purge_orphans(self, grace_s: float) -> tuple[int, int]:
        """Purge chunk subjects no object's meta refers to (nats-py has no call for it: the
        chunk subjects come from the stream's subject list, the live ones from the metas'
        nuids), last written over ``grace_s`` ago. Returns (objects, bytes) purged."""
        chunks = f"$O.{self.names.models_bucket}.C.>"
        info = await self.js.stream_info(self.models_stream, subjects_filter=chunks)
        subjects = info.state.subjects or {}
        if not subjects:
            return 0, 0
        try:
            live = {o.nuid for o in await self.obs.list(ignore_deletes=True)}
        except NotFoundError:
            live = set()
        purged = 0
        now = time.time()
        for subject in subjects:
            if subject.rsplit(".", 1)[-1] in live:
                continue
            try:
                last = await self.js.get_last_msg(self.models_stream, subject)
            except NotFoundError:
                continue
            if last.time is not None and now - last.time.timestamp() < grace_s:
                continue  # perhaps a put in progress (another deployer's)
            await self.js.purge_stream(self.models_stream, subject=subject)
            purged += 1
            log.info("purged chunks of an incomplete object (%s)", subject)
        if not purged:
            return 0, 0
        # The stream's size before and after: a put elsewhere meanwhile only lowers the
        # figure (never below 0), it never counts bytes that were not freed.
        after = await self.js.stream_info(self.models_stream)
        return purged, max(0, int(info.state.bytes) - int(after.state.bytes))

    # ---- deployments ----------------------------------------------------------------------

    async def deployment(self, group: str) -> Versioned:
        try:
            entry = await self.kv.get(group_key(group))
        except NotFoundError:
            return Versioned(None, 0)
        if not entry.value:
            return Versioned(None, entry.revision or 0)
        try:
            return Versioned(decode(entry.value, Deployment), entry.revision or 0)
        except DecodeError as exc:
            shared_metrics.MESSAGES_REJECTED.labels(exc.reason).inc()
            log.warning("unreadable deployment of group %s (%s); it will be replaced", group, exc)
            return Versioned(None, entry.revision or 0)

    async def write(self, deployment: Deployment, revision: int) -> int:
        """Write a group's record if it is still at ``revision``; else :class:`StaleRecord`."""
        key = group_key(deployment.group)
        try:
            if revision == 0:
                return await self.kv.create(key, encode(deployment))
            return await self.kv.update(key, encode(deployment), last=revision)
        except KeyWrongLastSequenceError:
            raise StaleRecord(key) from None

    async def pipeline(self, group: str) -> VersionedPipeline:
        try:
            entry = await self.kv.get(pipeline_key(group))
        except NotFoundError:
            return VersionedPipeline(None, 0)
        if not entry.value:  # deleted
            return VersionedPipeline(None, entry.revision or 0)
        try:
            return VersionedPipeline(decode(entry.value, PipelineDeployment), entry.revision or 0)
        except DecodeError as exc:
            shared_metrics.MESSAGES_REJECTED.labels(exc.reason).inc()
            log.warning("unreadable pipeline of group %s: %s", group, exc)
            return VersionedPipeline(None, entry.revision or 0, str(exc))

    async def write_pipeline(self, record: PipelineDeployment, revision: int) -> int:
        """Write a group's pipeline if it is still at ``revision``; else :class:`StaleRecord`."""
        key = pipeline_key(record.group)
        try:
            if revision == 0:
                return await self.kv.create(key, encode(record))
            return await self.kv.update(key, encode(record), last=revision)
        except KeyWrongLastSequenceError:
            raise StaleRecord(key) from None

    async def snapshot(self, pattern: str) -> list[KeyValue.Entry]:
        """The current entries of the keys matching ``pattern``."""
        watcher = await self.kv.watch(pattern, ignore_deletes=True)
        entries = []
        try:
            while True:
                entry = await watcher.updates(timeout=SNAPSHOT_TIMEOUT_S)
                if entry is None:
                    break
                if entry.value and entry.operation is None:
                    entries.append(entry)
                if entry.delta == 0:
                    break
        finally:
            await watcher.stop()
        return entries

    async def deployments(self) -> dict[str, Deployment]:
        out = {}
        for entry in await self.snapshot(f"{GROUP_PREFIX}*"):
            try:
                dep = decode(entry.value or b"", Deployment)
            except DecodeError as exc:
                shared_metrics.MESSAGES_REJECTED.labels(exc.reason).inc()
                continue
            out[dep.group] = dep
        return out

    async def reports(self) -> list[SwapReport]:
        out = []
        for entry in await self.snapshot(REPORT_PATTERN):
            try:
                report = decode(entry.value or b"", SwapReport)
            except DecodeError as exc:
                shared_metrics.MESSAGES_REJECTED.labels(exc.reason).inc()
                continue
            if entry.key == report_key(report.group, report.instance):  # else: forged
                out.append(report)
        return out


def _archive_manifest(data: bytes) -> Manifest:
    """``model.json`` of a stored package (``.tar.gz`` bytes)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        member = tar.extractfile(MANIFEST)
        if member is None:
            raise PackageError(f"the stored package has no {MANIFEST}")
        return read_manifest(member.read())
