"""An async client of the deployer's API (``<prefix>.api.deployer.<verb>``).

::

    async with await DeployClient.connect("nats://127.0.0.1:4222") as dc:
        reply = await dc.upload("models/yolov3-tiny", progress=lambda done, total: ...)
        await dc.activate("cams", "yolov3-tiny")          # latest version
        for group in await dc.status():
            ...

Every call raises :class:`DeployError` when the deployer refuses (``code`` from the reply:
``bad_request``, ``not_found``, ``conflict``, ``invalid_package``, ``internal``) or cannot
be reached (``code`` ``unreachable``).
"""

from __future__ import annotations

import asyncio
import builtins
import inspect
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.errors
from nats.aio.client import Client as NATS
from pydantic import ValidationError

from lensbus.bus import connect
from lensbus.codec import DecodeError, decode, encode
from lensbus.errors import DeployError
from lensbus.modelpkg import PackageError, pack, sha256_file
from lensbus.projects import package as project_package
from lensbus.schemas import (
    ActivateRequest,
    Deployment,
    DeploymentReply,
    FleetDeployReply,
    FleetDeployRequest,
    FleetDesired,
    FleetDeviceReply,
    FleetDeviceRequest,
    FleetDeviceStatus,
    FleetStatusReply,
    FleetStatusRequest,
    GroupStatus,
    ListReply,
    ListRequest,
    Message,
    ModelInfo,
    ModelReply,
    Pipeline,
    PipelineReply,
    PipelineRequest,
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
    RollbackRequest,
    StatusReply,
    StatusRequest,
    UploadBegin,
    UploadChunk,
    UploadCommit,
    UploadStarted,
)
from lensbus.schemas.deploy import UPLOAD_CHUNK_BYTES
from lensbus.schemas.pipeline import ORDER
from lensbus.subjects import DEFAULT_PREFIX, Subjects

R = TypeVar("R", bound=Reply)
M = TypeVar("M", bound=Message)

# (bytes sent, total bytes) after each chunk; may be a coroutine function.
Progress = Callable[[int, int], object | Awaitable[object]]

UNREACHABLE = "unreachable"
# A commit checks the whole package and puts it in the store: allow for slow disks.
COMMIT_BYTES_PER_S = 10 * 1024 * 1024
CHUNK_ATTEMPTS = 3
# A project's commit imports its handler in a child process (the deployer allows it 20 s).
PROJECT_COMMIT_S = 60.0


def _field_path(loc: tuple[int | str, ...]) -> str:
    """``stages.3.cameras.door``: pydantic puts the tag of a discriminated union (the
    stage kind, ``stages.3.zones.cameras``) in the path; the file has no such key."""
    parts = [
        str(p)
        for i, p in enumerate(loc)
        if not (i >= 2 and loc[i - 2] == "stages" and isinstance(loc[i - 1], int) and p in ORDER)
    ]
    return ".".join(parts) or "<root>"


def field_errors(exc: ValidationError) -> str:
    """pydantic's errors as ``field.path: message; ...``."""
    return "; ".join(f"{_field_path(e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False))


class DeployClient:
    """Requests to the deployer over an open NATS connection."""

    def __init__(self, nc: NATS, prefix: str = DEFAULT_PREFIX, timeout: float = 10.0) -> None:
        self.nc = nc
        self.subjects = Subjects(prefix)
        self.timeout = timeout
        self._owns_connection = False

    @classmethod
    async def connect(
        cls, url: str, prefix: str = DEFAULT_PREFIX, timeout_s: float = 10.0, **options: object
    ) -> DeployClient:
        """Connect to NATS (no reconnecting: a command should fail fast) and wrap it."""
        try:
            nc = await connect(
                url,
                **{"name": "lensbus-deployclient", **options},
                reconnect=False,
                timeout_s=timeout_s + 5.0,
            )
        except Exception as exc:
            raise DeployError(
                UNREACHABLE,
                f"cannot reach NATS at {url} ({type(exc).__name__}{': ' if str(exc) else ''}"
                f"{exc}): is nats-server running? Point to it with --nats-url or "
                "LENSBUS_NATS_URL",
            ) from None
        client = cls(nc, prefix, timeout_s)
        client._owns_connection = True
        return client

    async def close(self) -> None:
        if self._owns_connection and not self.nc.is_closed:
            await self.nc.close()

    async def __aenter__(self) -> DeployClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ---- the API ------------------------------------------------------------------------------

    @staticmethod
    def _request(cls: type[M], **fields: object) -> M:
        """Build a request, turning a bad field into a :class:`DeployError`."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise DeployError("bad_request", field_errors(exc)) from None

    async def _call(
        self, verb: str, request: Message, reply_cls: type[R], wait_s: float | None = None
    ) -> R:
        subject = self.subjects.deployer_api(verb)
        limit = wait_s or self.timeout
        try:
            msg = await self.nc.request(subject, encode(request), timeout=limit)
        except nats.errors.NoRespondersError:
            raise DeployError(
                UNREACHABLE,
                f"no deployer is listening on {subject}: is lensbus-deployer running "
                "(with the same subject prefix)?",
            ) from None
        except (nats.errors.TimeoutError, TimeoutError):
            raise DeployError(
                UNREACHABLE,
                f"no deployer answered on {subject} within {limit:g}s: "
                "is lensbus-deployer running?",
            ) from None
        except nats.errors.Error as exc:
            raise DeployError(
                UNREACHABLE, f"NATS failed the request on {subject}: {type(exc).__name__}: {exc}"
            ) from None
        try:
            reply = decode(msg.data, reply_cls)
        except DecodeError as exc:
            raise DeployError(
                "internal",
                f"unreadable reply from the deployer on {subject} ({exc}): "
                "are client and deployer the same lensbus version?",
            ) from None
        if not reply.ok:
            raise DeployError(reply.code or "internal", reply.error or "refused (no reason given)")
        return reply

    async def upload(self, path: str | Path, progress: Progress | None = None) -> ModelReply:
        """Upload a package folder (packed into a temporary .tar.gz) or a ``.tar.gz``.

        ``reply.created`` is false when the same model was already stored.
        """
        path = Path(path)
        if await asyncio.to_thread(path.is_dir):
            with tempfile.TemporaryDirectory(prefix="lensbus-upload-") as tmp:
                archive = Path(tmp) / f"{path.name}.tar.gz"
                try:
                    await asyncio.to_thread(pack, path, archive)
                except PackageError as exc:
                    raise DeployError("invalid_package", f"invalid package: {exc}") from None
                return await self._upload_archive(archive, progress)
        if not await asyncio.to_thread(path.is_file):
            raise DeployError("bad_request", f"{path}: no such package folder or .tar.gz file")
        return await self._upload_archive(path, progress)

    async def _upload_archive(self, archive: Path, progress: Progress | None) -> ModelReply:
        return await self._upload_file(archive, progress, "", ModelReply, 30.0)

    async def _upload_file(
        self,
        archive: Path,
        progress: Progress | None,
        verbs: str,
        reply_cls: type[R],
        commit_s: float,
    ) -> R:
        """Upload an archive on the ``<verbs>upload_*`` verbs: begin, chunks, commit."""
        size = (await asyncio.to_thread(archive.stat)).st_size
        if size == 0:
            raise DeployError("invalid_package", f"{archive} is empty")
        digest = await asyncio.to_thread(sha256_file, archive)
        started = await self._call(
            f"{verbs}upload_begin", UploadBegin(size=size, sha256=digest), UploadStarted
        )
        chunk_bytes = max(1, min(started.chunk_bytes or UPLOAD_CHUNK_BYTES, UPLOAD_CHUNK_BYTES))
        offset = 0
        with open(archive, "rb") as f:  # noqa: ASYNC230 - local reads of 512 KiB
            while offset < size:
                data = f.read(chunk_bytes)
                if not data:
                    raise DeployError("bad_request", f"{archive} shrank while being uploaded")
                chunk = UploadChunk(upload_id=started.upload_id, offset=offset, data=data)
                await self._send_chunk(f"{verbs}upload_chunk", chunk)
                offset += len(data)
                if progress is not None:
                    result = progress(offset, size)
                    if inspect.isawaitable(result):
                        await result
        commit_timeout = max(self.timeout, commit_s + 2 * size / COMMIT_BYTES_PER_S)
        commit = UploadCommit(upload_id=started.upload_id)
        return await self._call(f"{verbs}upload_commit", commit, reply_cls, commit_timeout)

    async def _send_chunk(self, verb: str, chunk: UploadChunk) -> None:
        for attempt in range(CHUNK_ATTEMPTS):
            try:
                await self._call(verb, chunk, Reply)
                return
            except DeployError as exc:  # a lost chunk or reply: send it again
                if exc.code != UNREACHABLE or attempt == CHUNK_ATTEMPTS - 1:
                    raise

    async def list(self, name: str | None = None) -> builtins.list[ModelInfo]:
        """Every stored model version (of ``name`` only, if given)."""
        return (await self._call("list", ListRequest(name=name), ListReply)).models

    async def activate(self, group: str, name: str, version: str | None = None) -> Deployment:
        """Make ``name:version`` (the latest uploaded version if omitted) the group's model."""
        request = self._request(ActivateRequest, group=group, name=name, version=version)
        reply = await self._call("activate", request, DeploymentReply)
        assert reply.deployment is not None
        return reply.deployment

    async def rollback(self, group: str) -> Deployment:
        """Back to the group's previous desired model."""
        request = self._request(RollbackRequest, group=group)
        reply = await self._call("rollback", request, DeploymentReply)
        assert reply.deployment is not None
        return reply.deployment

    async def status(self, group: str | None = None) -> builtins.list[GroupStatus]:
        """Desired and served models, group by group (one group if given)."""
        request = self._request(StatusRequest, group=group)
        return (await self._call("status", request, StatusReply)).groups

    # ---- pipelines ----------------------------------------------------------------------------

    async def pipeline_set(
        self, group: str, pipeline: Pipeline | Mapping[str, Any]
    ) -> PipelineReply:
        """Make ``pipeline`` (a :class:`Pipeline` or its JSON-like dict) the group's desired
        pipeline; its primary model becomes the group's model. A pipeline that does not
        validate, or that the store cannot run, raises ``bad_request``/``not_found`` naming
        the field (``stages.3.cameras.door.zones.0.points: ...``)."""
        if not isinstance(pipeline, Pipeline):
            try:
                pipeline = Pipeline.model_validate(pipeline)
            except ValidationError as exc:
                raise DeployError("bad_request", field_errors(exc)) from None
        request = self._request(PipelineSetRequest, group=group, pipeline=pipeline)
        return await self._call("pipeline_set", request, PipelineReply)

    async def pipeline_get(self, group: str) -> PipelineReply:
        """The group's pipeline record (with its history) and model deployment."""
        request = self._request(PipelineRequest, group=group)
        return await self._call("pipeline_get", request, PipelineReply)

    async def pipeline_rollback(self, group: str) -> PipelineReply:
        """Back to the group's previous pipeline, and its primary model."""
        request = self._request(PipelineRequest, group=group)
        return await self._call("pipeline_rollback", request, PipelineReply)

    # ---- projects -----------------------------------------------------------------------------

    async def project_upload(
        self, path: str | Path, progress: Progress | None = None
    ) -> ProjectUploadReply:
        """Upload a project folder (packed) or a packed ``.tar.gz`` as it is: the deployer
        checks it (project.json, settings, the handler's import) and stores it once per
        version. ``reply.created`` is false when the same content was already stored."""
        path = Path(path)
        with tempfile.TemporaryDirectory(prefix="lensbus-project-") as tmp:
            archive = path
            if await asyncio.to_thread(path.is_dir):
                archive = Path(tmp) / f"{path.name}.tar.gz"
                try:
                    data = await asyncio.to_thread(project_package.pack, path)
                except PackageError as exc:
                    raise DeployError("invalid_package", f"invalid project: {exc}") from None
                await asyncio.to_thread(archive.write_bytes, data)
            elif not await asyncio.to_thread(path.is_file):
                raise DeployError("bad_request", f"{path}: no such project folder or .tar.gz")
            return await self._upload_file(
                archive, progress, "project_", ProjectUploadReply, PROJECT_COMMIT_S
            )

    async def project_list(self, name: str | None = None) -> ProjectListReply:
        """Stored project versions and the deployed projects' records."""
        request = self._request(ProjectListRequest, name=name)
        return await self._call("project_list", request, ProjectListReply)

    async def project_deploy(
        self, name: str, version: str | None = None, groups: Sequence[str] | None = None
    ) -> ProjectDeployReply:
        """Make ``version`` (the latest uploaded if omitted) the project's desired release on
        ``groups`` (default: those its project.json names); ``reply.changes`` says what
        changed (models activated, pipelines set, the record)."""
        request = self._request(
            ProjectDeployRequest,
            name=name,
            version=version,
            groups=list(groups) if groups else None,
        )
        return await self._call("project_deploy", request, ProjectDeployReply)

    async def project_rollback(self, name: str) -> ProjectDeployReply:
        """Back to the project's previous release."""
        request = self._request(ProjectRequest, name=name)
        return await self._call("project_rollback", request, ProjectDeployReply)

    async def project_remove(self, name: str) -> ProjectDeployReply:
        """Stop running the project (its stored versions stay)."""
        request = self._request(ProjectRequest, name=name)
        return await self._call("project_remove", request, ProjectDeployReply)

    async def project_status(self, name: str | None = None) -> builtins.list[ProjectStatus]:
        """Each project's record and what every projects-service instance runs of it."""
        request = self._request(ProjectStatusRequest, name=name)
        return (await self._call("project_status", request, ProjectStatusReply)).projects

    # ---- a fleet (a hub's deployer; lensbus.natsleaf) -------------------------------------------

    async def fleet_add(self, device: str, groups: Sequence[str] | None = None) -> FleetDeviceReply:
        """Join ``device`` (its name is its JetStream domain): the hub sources its results.
        ``groups``: its device groups from now on (``[]``: none); ``None`` keeps its own."""
        listed = None if groups is None else list(groups)
        request = self._request(FleetDeviceRequest, device=device, groups=listed)
        return await self._call("fleet_add", request, FleetDeviceReply)

    async def fleet_remove(self, device: str) -> FleetDeviceReply:
        """Stop sourcing ``device`` and forget its records (its results already here stay)."""
        request = self._request(FleetDeviceRequest, device=device)
        return await self._call("fleet_remove", request, FleetDeviceReply)

    async def fleet_deploy(
        self,
        devices: Sequence[str],
        group: str,
        name: str,
        version: str | None = None,
        device_group: str | None = None,
    ) -> builtins.list[FleetDesired]:
        """Make ``name:version`` (latest if omitted) group ``group``'s model on each device, or
        (``devices`` empty) on every device the hub finds in ``device_group``."""
        fields = {"devices": list(devices), "device_group": device_group, "group": group}
        request = self._request(FleetDeployRequest, name=name, version=version, **fields)
        return (await self._call("fleet_deploy", request, FleetDeployReply)).desired

    async def fleet_status(self, device: str | None = None) -> builtins.list[FleetDeviceStatus]:
        """Each device: desired vs served models, last report, results lag."""
        request = self._request(FleetStatusRequest, device=device)
        return (await self._call("fleet_status", request, FleetStatusReply)).devices
