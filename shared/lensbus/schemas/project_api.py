"""The deployer's project verbs (``<prefix>.api.deployer.project_<verb>``): requests and
replies. An upload uses the model upload's messages (:class:`UploadBegin`,
:class:`UploadChunk`, :class:`UploadCommit`, :class:`UploadStarted`) on the project verbs;
its commit answers :class:`ProjectUploadReply`. The records are in
:mod:`lensbus.schemas.project`.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from lensbus.schemas.base import WireMessage, WirePart
from lensbus.schemas.deploy import Reply
from lensbus.schemas.project import (
    GroupName,
    ProjectDeployment,
    ProjectInfo,
    ProjectName,
    ProjectReport,
    ProjectVersion,
)


class ProjectUploadReply(Reply):
    """``project_upload_commit``: the stored version."""

    project: ProjectInfo | None = None
    created: bool = Field(default=False, description="false when identical content existed")


class ProjectListRequest(WireMessage):
    kind: ClassVar[str] = "project_list_request"
    name: ProjectName | None = Field(default=None, description="only this project's versions")


class ProjectListReply(Reply):
    projects: list[ProjectInfo] = Field(default_factory=list, description="stored versions")
    deployments: list[ProjectDeployment] = Field(
        default_factory=list, description="the desired release of every deployed project"
    )


class ProjectDeployRequest(WireMessage):
    kind: ClassVar[str] = "project_deploy_request"
    name: ProjectName
    version: ProjectVersion | None = Field(default=None, description="latest when omitted")
    groups: list[GroupName] | None = Field(
        default=None, description="camera groups (default: those project.json names)"
    )


class ProjectRequest(WireMessage):
    """``project_rollback`` and ``project_remove``: the project is all they need."""

    kind: ClassVar[str] = "project_request"
    name: ProjectName


class ProjectDeployReply(Reply):
    """The project's record after the change, and what the change did, one line each."""

    deployment: ProjectDeployment | None = None
    changes: list[str] = Field(default_factory=list)


class ProjectStatusRequest(WireMessage):
    kind: ClassVar[str] = "project_status_request"
    name: ProjectName | None = Field(default=None, description="only this project")


class ProjectStatus(WirePart):
    """Desired (the record) against what each projects-service instance runs (its report)."""

    name: ProjectName
    deployment: ProjectDeployment | None = None
    reports: list[ProjectReport] = Field(default_factory=list)


class ProjectStatusReply(Reply):
    projects: list[ProjectStatus] = Field(default_factory=list)
