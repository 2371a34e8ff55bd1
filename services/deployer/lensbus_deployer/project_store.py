"""Where projects live in JetStream: the object store ``lensbus-projects`` (packed projects,
``<name>/<version>``) and, in the deployments bucket of :class:`~lensbus_deployer.store.Store`,
the keys ``project.<name>`` (desired release) and ``project-report.<name>.<instance>``."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from nats.js import api
from nats.js.api import ObjectInfo
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.object_store import ObjectStore

from lensbus import metrics as shared_metrics
from lensbus.codec import DecodeError, decode, encode
from lensbus.jetstream import ensure_object_store
from lensbus.projects.package import manifest_of_archive
from lensbus.schemas.project import (
    ProjectDeployment,
    ProjectInfo,
    ProjectManifest,
    ProjectReport,
    project_key,
    project_object_name,
)
from lensbus_deployer.errors import StaleRecord
from lensbus_deployer.project_records import (
    object_headers,
    project_info,
    report_matches_key,
)
from lensbus_deployer.store import Store, stored_object, stored_objects

log = logging.getLogger(__name__)

PROJECT_PREFIX = project_key("")  # "project."
PROJECT_REPORT_PREFIX = "project-report."


@dataclass(frozen=True)
class VersionedProject:
    """A project's record and the KV revision it was read at (0: no record)."""

    deployment: ProjectDeployment | None
    revision: int


class ProjectStore:
    """The projects' object store, bound (or created) beside the models' one."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._obs: ObjectStore | None = None

    @property
    def ready(self) -> bool:
        return self._obs is not None and self.store.ready

    @property
    def obs(self) -> ObjectStore:
        assert self._obs is not None, "project store not ready"
        return self._obs

    async def ensure(self) -> None:
        js, s, bucket = self.store.js, self.store.s, self.store.names.projects_bucket
        self._obs = await ensure_object_store(
            js,
            bucket,
            api.ObjectStoreConfig(
                description="lensbus projects, user code (<name>/<version>, .tar.gz)",
                storage=api.StorageType.FILE,
                max_bytes=s.projects_max_bytes,
            ),
            replicas=s.jetstream_replicas,
        )

    # ---- stored versions ------------------------------------------------------------------

    async def list_projects(self) -> list[ProjectInfo]:
        return await stored_objects(self.obs, _project_info)

    async def project(self, name: str, version: str) -> tuple[ProjectInfo, str] | None:
        """A stored version and its content digest, or ``None``."""
        return await stored_object(self.obs, project_object_name(name, version), _project_info)

    async def archive(self, name: str, version: str) -> bytes:
        result = await self.obs.get(project_object_name(name, version))
        return result.data or b""

    async def put(
        self, manifest: ProjectManifest, data: bytes, archive_sha256: str, content: str
    ) -> ProjectInfo:
        meta = api.ObjectMeta(
            name=project_object_name(manifest.name, manifest.version),
            description=manifest.description,
            headers=object_headers(manifest, archive_sha256, content, time.time_ns()),
            options=api.ObjectMetaOptions(max_chunk_size=self.store.s.store_chunk_bytes),
        )
        o = await self.obs.put(meta.name or "", data, meta=meta)
        info = project_info(o.name, o.size, o.digest, o.description, o.headers)
        assert info is not None
        if info.sha256 != archive_sha256:  # the bytes stored are not the bytes checked
            await self.obs.delete(o.name)
            raise RuntimeError(f"{o.name}: the stored object's sha256 differs; deleted it")
        return info

    # ---- records --------------------------------------------------------------------------

    async def deployment(self, name: str) -> VersionedProject:
        try:
            entry = await self.store.kv.get(project_key(name))
        except NotFoundError:  # never written, or deleted (removed)
            return VersionedProject(None, 0)
        if not entry.value:
            return VersionedProject(None, entry.revision or 0)
        try:
            return VersionedProject(decode(entry.value, ProjectDeployment), entry.revision or 0)
        except DecodeError as exc:
            shared_metrics.MESSAGES_REJECTED.labels(exc.reason).inc()
            log.warning("unreadable record of project %s (%s); it will be replaced", name, exc)
            return VersionedProject(None, entry.revision or 0)

    async def write(self, record: ProjectDeployment, revision: int) -> int:
        """Write the record if it is still at ``revision``; else :class:`StaleRecord`."""
        key = project_key(record.name)
        kv = self.store.kv
        try:
            if revision == 0:
                return await kv.create(key, encode(record))
            return await kv.update(key, encode(record), last=revision)
        except KeyWrongLastSequenceError:
            raise StaleRecord(key) from None

    async def delete(self, name: str, revision: int) -> None:
        try:
            await self.store.kv.delete(project_key(name), last=revision)
        except KeyWrongLastSequenceError:
            raise StaleRecord(project_key(name)) from None

    async def deployments(self) -> dict[str, ProjectDeployment]:
        out = {}
        for entry in await self.store.snapshot(f"{PROJECT_PREFIX}*"):
            try:
                record = decode(entry.value or b"", ProjectDeployment)
            except DecodeError as exc:
                shared_metrics.MESSAGES_REJECTED.labels(exc.reason).inc()
                continue
            if entry.key == project_key(record.name):
                out[record.name] = record
        return out

    async def reports(self, name: str | None = None) -> list[ProjectReport]:
        pattern = f"{PROJECT_REPORT_PREFIX}{name}.*" if name else f"{PROJECT_REPORT_PREFIX}>"
        out = []
        for entry in await self.store.snapshot(pattern):
            try:
                report = decode(entry.value or b"", ProjectReport)
            except DecodeError as exc:
                shared_metrics.MESSAGES_REJECTED.labels(exc.reason).inc()
                continue
            if report_matches_key(entry.key, report):  # else: forged
                out.append(report)
        return out

    @property
    def stream(self) -> str:
        return f"OBJ_{self.store.names.projects_bucket}"

    async def store_bytes(self) -> int:
        info = await self.store.js.stream_info(self.stream)
        return int(info.state.bytes)

    async def manifest(self, name: str, version: str) -> ProjectManifest:
        """``project.json`` of a stored version."""
        data = await self.archive(name, version)
        return await asyncio.to_thread(manifest_of_archive, data)


def _project_info(o: ObjectInfo) -> ProjectInfo | None:
    return project_info(o.name, o.size, o.digest, o.description, o.headers)
