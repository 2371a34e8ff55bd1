"""The project verbs of the deployer's API: ``project_upload_begin/chunk/commit`` (the model
upload's machinery; the commit unpacks the project and runs every check of
:mod:`lensbus.projects.package` on it, the handler's import in a child process, before the
store takes it once per version), ``project_list``, ``project_deploy`` (the models or pipeline
the project names set on its groups, then ``project.<name>``), ``project_rollback``,
``project_remove`` and ``project_status``. The automatic rollback on a failed start is
:mod:`lensbus_deployer.auto_rollback`'s."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from nats.js.errors import APIError

from lensbus.errors import PackageError
from lensbus.projects import package
from lensbus.schemas import (
    ActivateRequest,
    DeploymentReply,
    PipelineSetRequest,
    ProjectDeployReply,
    ProjectDeployRequest,
    ProjectListReply,
    ProjectListRequest,
    ProjectRequest,
    ProjectStatus,
    ProjectStatusReply,
    ProjectStatusRequest,
    ProjectUploadReply,
    Reply,
    UploadBegin,
    UploadChunk,
    UploadCommit,
    UploadStarted,
)
from lensbus.schemas.deploy import UPLOAD_CHUNK_BYTES
from lensbus.schemas.project import (
    MAX_PROJECT_BYTES,
    ProjectDeployment,
    ProjectManifest,
    ProjectRelease,
)
from lensbus_deployer import metrics, pipelines
from lensbus_deployer import project_records as records
from lensbus_deployer.config import DeployerSettings
from lensbus_deployer.errors import Refused, StaleRecord
from lensbus_deployer.jetstream import JetStream
from lensbus_deployer.pipeline_verbs import PipelineVerbs
from lensbus_deployer.project_store import ProjectStore
from lensbus_deployer.store import CAS_ATTEMPTS, compare_and_set
from lensbus_deployer.upload_verbs import UploadVerbs
from lensbus_deployer.uploads import Upload, Uploads, human_bytes

log = logging.getLogger(__name__)

Activate = Callable[[ActivateRequest], Awaitable[DeploymentReply]]
Change = Callable[[ProjectDeployment | None], ProjectDeployment]


def _outcome(exc: BaseException) -> str:
    return exc.code if isinstance(exc, Refused) else "error"


class ProjectVerbs:
    """The project verbs of one deployer."""

    def __init__(
        self,
        settings: DeployerSettings,
        jetstream: JetStream,
        upload_verbs: UploadVerbs,
        pipeline_verbs: PipelineVerbs,
        activate: Activate,
    ) -> None:
        self.s = settings
        self.jetstream = jetstream
        self.upload_verbs = upload_verbs
        self.uploads: Uploads = upload_verbs.uploads
        self.pipeline_verbs = pipeline_verbs
        self._activate = activate
        self._locks: dict[str, asyncio.Lock] = {}

    async def _counted(self, verb: str, work: Awaitable[ProjectDeployReply]) -> ProjectDeployReply:
        try:
            reply = await work
        except BaseException as exc:
            metrics.PROJECT_CHANGES.labels(verb, _outcome(exc)).inc()
            raise
        metrics.PROJECT_CHANGES.labels(verb, "ok").inc()
        return reply

    # ---- upload ---------------------------------------------------------------------------

    async def upload_begin(self, req: UploadBegin) -> UploadStarted:
        self.jetstream.require_projects()
        try:
            if req.size > MAX_PROJECT_BYTES:
                raise Refused(
                    "invalid_package",
                    f"the project is {human_bytes(req.size)} packed, over the limit of "
                    f"{human_bytes(MAX_PROJECT_BYTES)}: keep models out of it (project.json "
                    "'models' names stored ones) and large data elsewhere",
                )
            upload = self.uploads.begin(req.size, req.sha256)
        except Refused as exc:
            metrics.PROJECT_CHANGES.labels("upload", exc.code).inc()
            raise
        metrics.UPLOADS_IN_PROGRESS.set(len(self.uploads))
        log.info("project upload %s started: %s", upload.id, human_bytes(req.size))
        return UploadStarted(upload_id=upload.id, chunk_bytes=UPLOAD_CHUNK_BYTES)

    async def upload_chunk(self, req: UploadChunk) -> Reply | None:
        return await self.upload_verbs.upload_chunk(req)

    async def upload_commit(self, req: UploadCommit) -> ProjectUploadReply | None:
        if not self.uploads.owns(req.upload_id):
            return None  # another deployer's upload: it answers
        upload = self.uploads.get(req.upload_id)
        async with upload.lock:
            upload = self.uploads.take(req.upload_id)
        metrics.UPLOADS_IN_PROGRESS.set(len(self.uploads))
        try:
            reply = await self._commit(upload)
        except BaseException as exc:
            metrics.PROJECT_CHANGES.labels("upload", _outcome(exc)).inc()
            if isinstance(exc, Refused):
                log.warning("project upload %s refused: %s", upload.id, exc.message)
            raise
        finally:
            await asyncio.to_thread(upload.discard)
        metrics.PROJECT_CHANGES.labels("upload", "created" if reply.created else "identical").inc()
        return reply

    async def _commit(self, upload: Upload) -> ProjectUploadReply:
        store = self.jetstream.require_projects()
        digest = await self.upload_verbs.checked_digest(upload)
        data = await asyncio.to_thread(upload.path.read_bytes)
        manifest, content = await self._checked(data, upload)
        key = f"{manifest.name}/{manifest.version}"
        async with self._locks.setdefault(key, asyncio.Lock()):
            existing = await store.project(manifest.name, manifest.version)
            if existing is not None:
                info, stored_content = existing
                if stored_content != content:
                    raise Refused(
                        "conflict",
                        f"project {manifest.name} version {manifest.version} is already stored "
                        f"with different content (sha256 {info.sha256[:12]}...); a version "
                        "never changes: give it another version in project.json",
                    )
                log.info("project %s uploaded again, identical: kept the stored one", key)
                return ProjectUploadReply(project=info, created=False)
            try:
                info = await store.put(manifest, data, digest, content)
            except APIError as exc:  # e.g. the store is full
                raise Refused(
                    "internal",
                    f"the project store did not take {key} ({exc.description or exc}); if "
                    f"it is full, raise the limit of the stream {store.stream}",
                ) from None
        log.info("stored project %s: %s, sha256 %s", key, human_bytes(info.size), digest[:12])
        with contextlib.suppress(Exception):
            await self.jetstream.update_gauges()
        return ProjectUploadReply(project=info, created=True)

    async def _checked(self, data: bytes, upload: Upload) -> tuple[ProjectManifest, str]:
        """The manifest and content digest of a project that passes every check."""
        unpack = self.uploads.unpack_dir / upload.path.stem
        self.uploads.busy.add(unpack)
        try:
            return await asyncio.to_thread(self._check, data, unpack)
        except PackageError as exc:
            text = str(exc).replace(f"{unpack}/", "").replace(str(unpack), "the project")
            raise Refused("invalid_package", f"invalid project: {text}") from None
        finally:
            self.uploads.busy.discard(unpack)
            await asyncio.to_thread(shutil.rmtree, unpack, True)

    def _check(self, data: bytes, unpack: Path) -> tuple[ProjectManifest, str]:
        root = package.unpack(data, unpack)
        content = records.content_sha256(root)  # before the import check adds anything
        manifest = package.check(root, self.s.project_import_timeout_s)
        return manifest, content

    # ---- list, deploy ---------------------------------------------------------------------

    def _store(self) -> ProjectStore:
        return self.jetstream.require_projects()

    async def project_list(self, req: ProjectListRequest) -> ProjectListReply:
        store = self._store()
        stored, deployed = await asyncio.gather(store.list_projects(), store.deployments())
        if req.name is not None:
            stored = [p for p in stored if p.name == req.name]
            deployed = {k: v for k, v in deployed.items() if k == req.name}
        return ProjectListReply(projects=stored, deployments=sorted(deployed.values(), key=_name))

    async def project_deploy(self, req: ProjectDeployRequest) -> ProjectDeployReply:
        return await self._counted("deploy", self._deploy(req))

    async def _deploy(self, req: ProjectDeployRequest) -> ProjectDeployReply:
        store = self._store()
        version = await self._version(store, req)
        found = await store.project(req.name, version)
        assert found is not None
        manifest = await store.manifest(req.name, version)
        groups = list(req.groups or manifest.groups)
        await self._check_models(manifest)
        changes = await self._set_models(manifest, groups)
        release = ProjectRelease(
            version=version,
            groups=groups,
            sha256=found[0].sha256,
            deployed_ns=time.time_ns(),
            reason=f"deploy of version {version}",
        )
        before = (await store.deployment(req.name)).deployment
        record = await self._update(req.name, lambda cur: records.deploy(cur, release, req.name))
        was = f" (was {before.current.version})" if before is not None else ""
        changes.append(f"project {req.name}: version {version} desired on {', '.join(groups)}{was}")
        log.info("project %s: version %s desired on %s", req.name, version, groups)
        return ProjectDeployReply(deployment=record, changes=changes)

    async def _version(self, store: ProjectStore, req: ProjectDeployRequest) -> str:
        """The stored version ``project_deploy`` names, or the latest one uploaded."""
        stored = [p for p in await store.list_projects() if p.name == req.name]
        if req.version is None:
            newest = records.latest(stored, req.name)
            if newest is not None:
                return newest.version
        elif any(p.version == req.version for p in stored):
            return req.version
        known = ", ".join(p.version for p in stored) or "none stored"
        what = f"{req.name} version {req.version}" if req.version else f"project {req.name!r}"
        raise Refused(
            "not_found",
            f"no {what} in the store (versions: {known}); upload it first "
            "(lensbus project deploy DIR uploads and deploys)",
        )

    async def _check_models(self, manifest: ProjectManifest) -> None:
        """Refuse a project naming a model the model store does not hold."""
        refs = list(manifest.models)
        if manifest.pipeline is not None:
            refs += pipelines.model_refs(manifest.pipeline)
        models = self.jetstream.require_store()
        for ref in dict.fromkeys(refs):
            name, _, version = ref.partition(":")
            if await models.model(name, version) is None:
                raise Refused(
                    "not_found",
                    f"project {manifest.name}: model {ref} (project.json) is not in the model "
                    "store; upload it first (lensbus models upload PATH)",
                )

    async def _set_models(self, manifest: ProjectManifest, groups: list[str]) -> list[str]:
        """The project's pipeline, or its first model, on each group; what changed."""
        models = self.jetstream.require_store()
        changes: list[str] = []
        for group in groups:
            if manifest.pipeline is not None:
                current = await models.pipeline(group)
                if current.record is not None and current.record.pipeline == manifest.pipeline:
                    changes.append(f"group {group}: already runs the project's pipeline")
                    continue
                reply = await self.pipeline_verbs.pipeline_set(
                    PipelineSetRequest(group=group, pipeline=manifest.pipeline)
                )
                assert reply.pipeline is not None
                changes.append(
                    f"group {group}: pipeline set (revision {reply.pipeline.revision}, model "
                    f"{manifest.pipeline.primary.model})"
                )
            elif manifest.models:
                ref = manifest.models[0]
                dep = (await models.deployment(group)).deployment
                if dep is not None and dep.model.ref == ref:
                    changes.append(f"group {group}: model {ref} already desired")
                    continue
                name, _, version = ref.partition(":")
                await self._activate(ActivateRequest(group=group, name=name, version=version))
                was = f" (was {dep.model.ref})" if dep is not None else ""
                changes.append(f"group {group}: model {ref} activated{was}")
        return changes

    async def _update(self, name: str, change: Change) -> ProjectDeployment:
        """Compare-and-set ``project.<name>`` (another deployer may write it too)."""
        store = self._store()

        async def read() -> tuple[ProjectDeployment | None, int]:
            current = await store.deployment(name)
            return current.deployment, current.revision

        return await compare_and_set(read, store.write, change, f"project {name!r}")

    # ---- rollback, remove, status ---------------------------------------------------------

    async def project_rollback(self, req: ProjectRequest) -> ProjectDeployReply:
        return await self._counted("rollback", self._rollback(req))

    async def _rollback(self, req: ProjectRequest) -> ProjectDeployReply:
        now = time.time_ns()
        record = await self._update(req.name, lambda cur: records.rollback(cur, req.name, now))
        log.info("project %s: %s", req.name, record.reason)
        changes = [f"project {req.name}: version {record.current.version} ({record.reason})"]
        return ProjectDeployReply(deployment=record, changes=changes)

    async def project_remove(self, req: ProjectRequest) -> ProjectDeployReply:
        return await self._counted("remove", self._remove(req))

    async def _remove(self, req: ProjectRequest) -> ProjectDeployReply:
        store = self._store()
        for _ in range(CAS_ATTEMPTS):
            current = await store.deployment(req.name)
            if current.deployment is None:
                raise Refused("not_found", f"project {req.name!r} is not deployed")
            try:
                await store.delete(req.name, current.revision)
            except StaleRecord:
                continue
            removed = current.deployment.model_copy(
                update={"state": "removed", "reason": "removed by request"}
            )
            log.info("project %s removed (was version %s)", req.name, removed.current.version)
            changes = [f"project {req.name}: removed (was version {removed.current.version})"]
            return ProjectDeployReply(deployment=removed, changes=changes)
        raise Refused("internal", f"project {req.name!r} changed too often; try again")

    async def project_status(self, req: ProjectStatusRequest) -> ProjectStatusReply:
        store = self._store()
        deployed, reports = await asyncio.gather(store.deployments(), store.reports(req.name))
        by_name: dict[str, list] = {}
        for report in reports:
            by_name.setdefault(report.project, []).append(report)
        names = sorted(set(deployed) | set(by_name))
        if req.name is not None:
            names = [req.name]
        out = [
            ProjectStatus(
                name=name,
                deployment=deployed.get(name),
                reports=sorted(by_name.get(name, []), key=lambda r: r.instance),
            )
            for name in names
        ]
        return ProjectStatusReply(projects=out)


def _name(record: ProjectDeployment) -> str:
    return record.name
