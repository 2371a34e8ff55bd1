"""Deployer messages: the request/reply API on ``<prefix>.api.deployer.<verb>`` and the
records kept in the KV bucket ``lensbus-deployments``.

KV keys (NATS KV allows dots): ``group.<group>`` holds the group's :class:`Deployment`;
``pipeline.<group>`` its desired pipeline; ``report.<group>.<instance>`` holds what an
inference instance last did (:class:`SwapReport`). Model packages live in the object store
``lensbus-models`` under ``<name>/<version>`` (see :func:`object_name`).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field

from lensbus.schemas.base import WireMessage, WirePart
from lensbus.schemas.manifest import FrameworkKey, _check_name, _check_version
from lensbus.schemas.pipeline import Pipeline
from lensbus.schemas.result import Task
from lensbus.subjects import TOKEN_PATTERN, validate_token

ModelName = Annotated[str, AfterValidator(_check_name)]
ModelVersion = Annotated[str, AfterValidator(_check_version)]
Group = Annotated[
    str, Field(pattern=TOKEN_PATTERN), AfterValidator(lambda v: validate_token(v, "group"))
]

# Largest chunk of an upload in one request (well under NATS's max_payload).
UPLOAD_CHUNK_BYTES = 512 * 1024
# Previous deployments kept per group for rollback.
HISTORY_LENGTH = 20


def object_name(name: str, version: str) -> str:
    return f"{name}/{version}"


def group_key(group: str) -> str:
    return f"group.{group}"


def pipeline_key(group: str) -> str:
    """KV key of a group's desired pipeline (:class:`lensbus.schemas.pipeline.Pipeline`)."""
    return f"pipeline.{group}"


def report_key(group: str, instance: str) -> str:
    return f"report.{group}.{instance}"


class ModelVersionRef(WirePart):
    name: ModelName
    version: ModelVersion

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


class ModelInfo(WirePart):
    """One stored model version."""

    name: ModelName
    version: ModelVersion
    framework: FrameworkKey
    task: Task
    size: int = Field(ge=0, description="bytes of the stored .tar.gz")
    sha256: str = Field(description="sha256 of the stored .tar.gz")
    uploaded_ns: int = Field(ge=0)
    description: str = ""


class Deployment(WireMessage):
    """The desired model of a camera group (KV ``group.<group>``)."""

    kind: ClassVar[str] = "deployment"

    group: Group
    model: ModelVersionRef
    activated_ns: int = Field(ge=0)
    state: Literal["active", "failed", "rolled_back"] = "active"
    reason: str = Field(default="", description="why a deployment failed or was rolled back")
    history: list[ModelVersionRef] = Field(
        default_factory=list, description="earlier desired models, most recent last"
    )
    pipeline_revision: int = Field(
        default=0,
        ge=0,
        description="the group's pipeline revision this model is the primary of (0: the group "
        "has no pipeline, or a plain deploy/rollback set the model)",
    )


class PipelineRevision(WirePart):
    """One desired pipeline of a group, as it was set."""

    revision: int = Field(ge=1, description="counts the group's pipeline changes, from 1")
    pipeline: Pipeline
    activated_ns: int = Field(ge=0)
    reason: str = Field(default="", description="what set it (set, deploy, rollback)")


class PipelineDeployment(WireMessage):
    """The desired pipeline of a camera group (KV ``pipeline.<group>``).

    ``pipeline`` stays strict configuration inside this tolerant record: a reader that does
    not know one of its stages or keys refuses the whole record (``invalid``) and keeps what
    it ran, rather than running the pipeline with that setting left out. Its primary model
    (``stages[0].model``) is also the group's :class:`Deployment` (``group.<group>``, with
    ``pipeline_revision`` = ``revision``), so a reader that knows nothing of pipelines runs
    the primary model alone.
    """

    kind: ClassVar[str] = "pipeline_deployment"

    group: Group
    current: PipelineRevision
    history: list[PipelineRevision] = Field(
        default_factory=list, description="earlier desired pipelines, most recent last"
    )

    @property
    def pipeline(self) -> Pipeline:
        return self.current.pipeline

    @property
    def revision(self) -> int:
        return self.current.revision


class SwapReport(WireMessage):
    """What an inference instance did about its group's desired model."""

    kind: ClassVar[str] = "swap_report"

    group: Group
    instance: str
    desired: ModelVersionRef
    state: Literal["loading", "serving", "failed"]
    reason: str = ""
    serving: ModelVersionRef | None = Field(default=None, description="model in service now")
    time_ns: int = Field(ge=0)
    fetch_s: float = 0.0
    load_s: float = 0.0
    warmup_s: float = 0.0
    stages: dict[str, str] = Field(
        default_factory=dict,
        description="each classify stage of the group's pipeline: the model it serves "
        "('name:version'), or 'loading name:version' / 'failed name:version'",
    )


# ---- request / reply -------------------------------------------------------------------


class Reply(WireMessage):
    """Every reply: ``ok`` false with an ``error`` that says what to do, or the data."""

    kind: ClassVar[str] = "reply"

    ok: bool = True
    error: str = ""
    code: Literal["", "bad_request", "not_found", "conflict", "invalid_package", "internal"] = ""


class UploadBegin(WireMessage):
    kind: ClassVar[str] = "upload_begin"
    size: int = Field(gt=0, description="bytes of the .tar.gz that follows")
    sha256: str = Field(description="sha256 of the whole .tar.gz")


class UploadStarted(Reply):
    upload_id: str = ""
    chunk_bytes: int = UPLOAD_CHUNK_BYTES


class UploadChunk(WireMessage):
    kind: ClassVar[str] = "upload_chunk"
    upload_id: str
    offset: int = Field(ge=0)
    data: bytes


class UploadCommit(WireMessage):
    kind: ClassVar[str] = "upload_commit"
    upload_id: str


class ModelReply(Reply):
    model: ModelInfo | None = None
    created: bool = Field(default=False, description="false when identical content existed")


class ListRequest(WireMessage):
    kind: ClassVar[str] = "list_request"
    name: str | None = None


class ListReply(Reply):
    models: list[ModelInfo] = Field(default_factory=list)


class ActivateRequest(WireMessage):
    kind: ClassVar[str] = "activate_request"
    group: Group
    name: ModelName
    version: ModelVersion | None = Field(default=None, description="latest when omitted")


class RollbackRequest(WireMessage):
    kind: ClassVar[str] = "rollback_request"
    group: Group


class DeploymentReply(Reply):
    deployment: Deployment | None = None


class PipelineSetRequest(WireMessage):
    kind: ClassVar[str] = "pipeline_set_request"
    group: Group
    pipeline: Pipeline


class PipelineRequest(WireMessage):
    """``pipeline_get`` and ``pipeline_rollback``: the group is all they need."""

    kind: ClassVar[str] = "pipeline_request"
    group: Group


class PipelineReply(Reply):
    """The group's pipeline record and the model deployment that goes with it."""

    pipeline: PipelineDeployment | None = None
    deployment: Deployment | None = None


class StatusRequest(WireMessage):
    kind: ClassVar[str] = "status_request"
    group: Group | None = None


class InstanceState(WirePart):
    instance: str
    state: str
    serving: ModelVersionRef | None = None
    reason: str = ""
    seen_ns: int = 0


class GroupStatus(WirePart):
    group: Group
    deployment: Deployment | None = None
    instances: list[InstanceState] = Field(default_factory=list)
    last_failure: str = ""


class StatusReply(Reply):
    groups: list[GroupStatus] = Field(default_factory=list)
