"""Projects: a user's own code on the device, deployed and swapped like a model.

A project is a folder: ``project.json`` (:class:`ProjectManifest`, written by a person, so
configuration: an unknown key is refused, naming it), the Python code with the handler, and
any other files. The deployer stores it packed (``.tar.gz``) in the object store
``lensbus-projects`` under ``<name>/<version>`` and keeps the desired version in the
deployments bucket (KV ``project.<name>``: :class:`ProjectDeployment`, with history for
rollback); the projects service runs each desired project in a process of its own and
reports what it runs (KV ``project-report.<name>.<instance>``: :class:`ProjectReport`).

What a running project sends, under ``<prefix>.projects.<project>.<camera>.``:

    <topic>     ProjectMessage  ctx.publish(topic, payload): the payload msgpack-encoded
    _overlay    Overlay         ctx.overlay(...): shapes the publisher draws on the project stream
    _frame      FrameEnvelope   a frame the project drew itself (DeepLens's local display)
    _event      Event           ctx.event(...): ``trigger="project"``, ``project`` set; the
                                publisher checks project and camera against the subject and
                                republishes it on ``<prefix>.events.<camera>``

Topics starting with ``_`` are lensbus's own.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from lensbus.schemas.base import CameraId, ConfigMessage, ConfigPart, WireMessage, WirePart
from lensbus.schemas.pipeline import ModelRefText, Pipeline
from lensbus.subjects import TOKEN_PATTERN, validate_token

ProjectName = Annotated[
    str, Field(pattern=TOKEN_PATTERN), AfterValidator(lambda v: validate_token(v, "project name"))
]
ProjectVersion = Annotated[
    str,
    Field(pattern=TOKEN_PATTERN),
    AfterValidator(lambda v: validate_token(v, "project version")),
]
GroupName = Annotated[
    str, Field(pattern=TOKEN_PATTERN), AfterValidator(lambda v: validate_token(v, "group"))
]

# The file a project folder must hold, and the handler module's default name.
MANIFEST_FILE = "project.json"
DEFAULT_HANDLER = "handler.py"
# Largest packed project the deployer accepts (code and small files, not models).
MAX_PROJECT_BYTES = 64 * 1024 * 1024
# Previous releases kept per project for rollback.
PROJECT_HISTORY = 20


def project_key(name: str) -> str:
    """KV key (deployments bucket) of a project's desired release."""
    return f"project.{name}"


def project_report_key(name: str, instance: str) -> str:
    """KV key of what one projects-service instance runs of project ``name``."""
    return f"project-report.{name}.{instance}"


def project_object_name(name: str, version: str) -> str:
    """Object name of a stored project version in the ``lensbus-projects`` object store."""
    return f"{name}/{version}"


class ProjectLimits(ConfigPart):
    """What the projects service allows the project's process."""

    memory_mb: int = Field(
        default=1024,
        ge=64,
        le=65536,
        description="memory limit of its process (MiB): heap and private mappings (RLIMIT_DATA)",
    )
    deadline_s: float = Field(
        default=10.0,
        gt=0.0,
        le=600.0,
        description="a handler call running longer is a hang: the process is killed and restarted",
    )
    mailbox: int = Field(
        default=2, ge=1, le=256, description="results waiting per camera; the oldest is dropped"
    )
    start_s: float = Field(
        default=30.0, gt=0.0, le=600.0, description="time on_start may take before the start fails"
    )


class ProjectManifest(ConfigMessage):
    """``project.json``: what a project is and what it needs."""

    kind: ClassVar[str] = "project_manifest"

    name: ProjectName
    version: ProjectVersion
    description: str = ""
    runtime: Literal["handler", "deeplens"] = Field(
        default="handler",
        description="handler: on_start/on_result/on_stop in `handler`; deeplens: a DeepLens "
        "inference function (a script with its own loop), run as written",
    )
    handler: str = Field(
        default=DEFAULT_HANDLER, description="the Python file (relative) holding the handler"
    )
    groups: list[GroupName] = Field(
        default_factory=lambda: ["default"], min_length=1, description="camera groups it serves"
    )
    cameras: list[CameraId] = Field(
        default_factory=list, description="only these cameras of its groups; [] = all of them"
    )
    models: list[ModelRefText] = Field(
        default_factory=list,
        description="stored models it needs, 'name:version'; the first is activated on its "
        "groups at deploy unless a pipeline is given (deeplens: the models mo.optimize finds)",
    )
    pipeline: Pipeline | None = Field(
        default=None, description="the pipeline set on its groups at deploy"
    )
    frames: bool = Field(
        default=False, description="ctx.frame() is used: the frame of each result is fetched"
    )
    settings: dict[str, Any] = Field(default_factory=dict, description="ctx.settings")
    settings_schema: dict[str, Any] = Field(
        default_factory=dict, description="JSON Schema the settings must satisfy"
    )
    limits: ProjectLimits = Field(default_factory=ProjectLimits)

    @field_validator("handler")
    @classmethod
    def _relative_py(cls, v: str) -> str:
        parts = v.split("/")
        if not v.endswith(".py") or v.startswith("/") or ".." in parts or "" in parts:
            raise ValueError(f"handler must be a relative .py path inside the project, not {v!r}")
        return v

    @model_validator(mode="after")
    def _unique(self) -> ProjectManifest:
        if len(set(self.groups)) != len(self.groups):
            raise ValueError("groups: a group is listed twice")
        return self


class ProjectRelease(WirePart):
    """One deployed version of a project."""

    version: ProjectVersion
    groups: list[GroupName] = Field(min_length=1)
    sha256: str = Field(description="sha256 of the stored .tar.gz")
    deployed_ns: int = Field(ge=0)
    reason: str = Field(default="", description="what set it (deploy, rollback, auto-rollback)")


class ProjectInfo(WirePart):
    """One stored project version."""

    name: ProjectName
    version: ProjectVersion
    size: int = Field(ge=0, description="bytes of the stored .tar.gz")
    sha256: str
    uploaded_ns: int = Field(ge=0)
    description: str = ""
    runtime: str = "handler"
    groups: list[str] = Field(default_factory=list, description="the groups project.json names")


class ProjectDeployment(WireMessage):
    """The desired release of a project (KV ``project.<name>``); deleted: not running."""

    kind: ClassVar[str] = "project_deployment"

    name: ProjectName
    current: ProjectRelease
    state: Literal["active", "rolled_back", "removed"] = "active"
    reason: str = ""
    history: list[ProjectRelease] = Field(
        default_factory=list, description="earlier releases, most recent last"
    )


class ProjectReport(WireMessage):
    """What one projects-service instance runs of a project (KV
    ``project-report.<name>.<instance>``)."""

    kind: ClassVar[str] = "project_report"

    project: ProjectName
    instance: str
    version: str = Field(description="the version this report is about")
    state: Literal["starting", "running", "failed", "stopped"]
    reason: str = Field(default="", description="why it failed (the cause, one line)")
    serving: str = Field(default="", description="the version handling results now ('' none)")
    handled: int = Field(default=0, ge=0, description="results handled by `serving`")
    errors: int = Field(default=0, ge=0, description="handler calls that raised")
    dropped: int = Field(default=0, ge=0, description="results dropped: the handler was behind")
    restarts: int = Field(default=0, ge=0, description="times its process was restarted")
    report_ns: int = Field(ge=0)


class ProjectMessage(WireMessage):
    """What ``ctx.publish(topic, payload)`` sends on
    ``<prefix>.projects.<project>.<camera>.<topic>``."""

    kind: ClassVar[str] = "project_message"

    project: ProjectName
    version: str
    camera: CameraId
    topic: str = Field(description="the topic (subject token), or the IoT topic it came from")
    seq: int = Field(default=0, ge=0, description="seq of the result being handled (0: none)")
    capture_ns: int = Field(default=0, ge=0, description="capture time of that frame")
    published_ns: int = Field(ge=0)
    payload: Any = Field(default=None, description="what the project published (msgpack types)")


Color = Annotated[str, Field(pattern=r"^#[0-9a-fA-F]{6}$")]
NormPoint = tuple[
    Annotated[float, Field(ge=-1.0, le=2.0)], Annotated[float, Field(ge=-1.0, le=2.0)]
]


class Shape(WirePart):
    """One thing to draw; points normalised to the frame (0..1, x right, y down)."""

    shape: Literal["box", "line", "polygon", "text", "blur"]
    points: list[NormPoint] = Field(
        min_length=1,
        max_length=256,
        description="box, blur: 2 corners; line: 2+ points; polygon: 3+; text: its anchor",
    )
    text: str = Field(default="", max_length=200, description="text, or a box's label")
    color: Color = "#00ff00"
    thickness: int = Field(default=2, ge=1, le=20)

    @model_validator(mode="after")
    def _points(self) -> Shape:
        need = {"box": 2, "blur": 2, "line": 2, "polygon": 3, "text": 1}[self.shape]
        if len(self.points) < need:
            raise ValueError(f"a {self.shape} needs at least {need} points")
        return self


class Overlay(WireMessage):
    """Shapes a project wants drawn on a camera's project stream (``ctx.overlay``)."""

    kind: ClassVar[str] = "overlay"

    project: ProjectName
    camera: CameraId
    seq: int = Field(ge=0, description="the frame it was made for")
    capture_ns: int = Field(default=0, ge=0)
    shapes: list[Shape] = Field(default_factory=list, max_length=512)
    ttl_s: float = Field(
        default=1.0, gt=0.0, le=60.0, description="drawn on later frames for this long"
    )
