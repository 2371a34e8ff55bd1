"""Projects on decoded records: no NATS, no files.

- a stored project version as an object of ``lensbus-projects`` (its headers, read back as
  :class:`~lensbus.schemas.project.ProjectInfo` so ``project_list`` never downloads one);
- what a deploy, a rollback or a failed start does to ``project.<name>``
  (:class:`~lensbus.schemas.project.ProjectDeployment`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lensbus.schemas.project import (
    PROJECT_HISTORY,
    ProjectDeployment,
    ProjectInfo,
    ProjectManifest,
    ProjectRelease,
    ProjectReport,
    project_object_name,
    project_report_key,
)
from lensbus_deployer.errors import Refused
from lensbus_deployer.model_objects import digest_hex, header

H_NAME = "Lensbus-Project-Name"
H_VERSION = "Lensbus-Project-Version"
H_RUNTIME = "Lensbus-Project-Runtime"
H_GROUPS = "Lensbus-Project-Groups"
H_UPLOADED = "Lensbus-Uploaded-Ns"
H_CONTENT = "Lensbus-Content-Sha256"
H_SHA256 = "Lensbus-Sha256"

AUTO = "auto-rollback"


def content_sha256(root: Path) -> str:
    """What makes two uploads "the same project": every file's name and bytes (two archives
    of the same folder may differ in their tar/gzip headers)."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def object_headers(
    manifest: ProjectManifest, archive_sha256: str, content: str, uploaded_ns: int
) -> dict[str, list[str]]:
    return {
        H_NAME: [manifest.name],
        H_VERSION: [manifest.version],
        H_RUNTIME: [manifest.runtime],
        H_GROUPS: [json.dumps(manifest.groups)],
        H_UPLOADED: [str(uploaded_ns)],
        H_CONTENT: [content],
        H_SHA256: [archive_sha256],
    }


def project_info(
    name: str,
    size: int | None,
    digest: str | None,
    description: str | None,
    headers: Mapping[str, Any] | None,
) -> ProjectInfo | None:
    """A stored object as a project version; ``None`` for objects lensbus did not put."""
    project, version = header(headers, H_NAME), header(headers, H_VERSION)
    if project is None or version is None or project_object_name(project, version) != name:
        return None
    try:
        groups = json.loads(header(headers, H_GROUPS) or "[]")
        return ProjectInfo(
            name=project,
            version=version,
            size=size or 0,
            sha256=digest_hex(digest) or header(headers, H_SHA256) or "",
            uploaded_ns=int(header(headers, H_UPLOADED) or 0),
            description=description or "",
            runtime=header(headers, H_RUNTIME) or "handler",
            groups=groups if isinstance(groups, list) else [],
        )
    except (ValidationError, ValueError):
        return None


def latest(projects: Iterable[ProjectInfo], name: str) -> ProjectInfo | None:
    """The most recently uploaded version of ``name``."""
    versions = [p for p in projects if p.name == name]
    return max(versions, key=lambda p: (p.uploaded_ns, p.version)) if versions else None


# ---- the desired release -------------------------------------------------------------------


def deploy(
    current: ProjectDeployment | None, release: ProjectRelease, name: str
) -> ProjectDeployment:
    """The record once ``release`` is desired: the release it replaces goes to the history
    (deploying the current version again keeps the history, with the new groups)."""
    history = list(current.history) if current else []
    if current is not None and current.current.version != release.version:
        history.append(current.current)
    return ProjectDeployment(
        name=name,
        current=release,
        state="active",
        reason=release.reason,
        history=history[-PROJECT_HISTORY:],
    )


def rollback(current: ProjectDeployment | None, name: str, now_ns: int) -> ProjectDeployment:
    """Back to the previous release (the last history entry), by request."""
    if current is None:
        raise Refused(
            "not_found",
            f"project {name!r} is not deployed: deploy it first (lensbus project deploy DIR)",
        )
    if not current.history:
        raise Refused(
            "conflict",
            f"nothing to roll back to: project {name!r} has had no release before "
            f"version {current.current.version}",
        )
    reason = f"rollback from version {current.current.version}"
    return _back(current, reason, now_ns)


def _back(current: ProjectDeployment, reason: str, now_ns: int) -> ProjectDeployment:
    previous = current.history[-1]
    return ProjectDeployment(
        name=current.name,
        current=previous.model_copy(update={"deployed_ns": now_ns, "reason": reason}),
        state="rolled_back",
        reason=reason,
        history=list(current.history[:-1]),
    )


def auto_rollback(
    current: ProjectDeployment, report: ProjectReport, now_ns: int
) -> ProjectDeployment | None:
    """What a failed start does to the record, or ``None`` when it changes nothing: only a
    failure of the *current* version counts, and only once (after the rollback the current
    version is another one; with nothing to roll back to, the failure is written once into
    the reason and the release stays)."""
    if report.state != "failed" or report.project != current.name:
        return None
    if report.version != current.current.version:
        return None
    why = f"version {report.version} failed on {report.instance}: {report.reason or 'no reason'}"
    if not current.history:
        reason = f"{AUTO} impossible: {why}; nothing to roll back to"
        if current.reason == reason:
            return None
        return current.model_copy(update={"reason": reason})
    return _back(current, f"{AUTO}: {why}", now_ns)


def report_matches_key(key: str, report: ProjectReport) -> bool:
    """Whether a report names the project and instance of its key (the key is what the
    server's permissions scope; the payload is what the writer says)."""
    return key == project_report_key(report.project, report.instance)
