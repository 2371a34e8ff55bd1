"""The deployer's decisions, on decoded records: no NATS, no files.

- what a new desired model, a rollback or a failed swap does to a group's
  :class:`~lensbus.schemas.Deployment`;
- how a model's manifest is kept in its object's headers, and read back as
  :class:`~lensbus.schemas.ModelInfo` (so ``list`` never downloads a package);
- how deployments, swap reports and heartbeats become a group's status.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from lensbus.schemas import (
    Deployment,
    GroupStatus,
    InstanceState,
    Manifest,
    ModelInfo,
    ModelVersionRef,
    Status,
    SwapReport,
)
from lensbus.schemas.deploy import HISTORY_LENGTH, object_name

# The service whose heartbeats say which model an instance serves.
INFERENCE_SERVICE = "inference"

# Object headers holding what `list` reports (Go clients read headers as lists of strings).
H_NAME = "Lensbus-Model-Name"
H_VERSION = "Lensbus-Model-Version"
H_FRAMEWORK = "Lensbus-Framework"
H_TASK = "Lensbus-Task"
H_DECODER = "Lensbus-Decoder"
H_INPUT = "Lensbus-Input"
H_UPLOADED = "Lensbus-Uploaded-Ns"
H_CONTENT = "Lensbus-Content-Sha256"
H_SHA256 = "Lensbus-Sha256"


AUTOMATIC = "automatic rollback"


class Refused(Exception):
    """A request the deployer turns down; ``code`` and the message go into the reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ---- deployments -----------------------------------------------------------------------


def _bounded(history: Iterable[ModelVersionRef]) -> list[ModelVersionRef]:
    return list(history)[-HISTORY_LENGTH:]


def activate(
    current: Deployment | None, group: str, model: ModelVersionRef, now_ns: int
) -> Deployment:
    """The group's record once ``model`` is its desired model.

    The model it replaces goes to the end of the history, unless it never served (its
    deployment failed with nothing to roll back to): rolling back to it would be pointless.
    Activating the current model again keeps the history and clears a failure.
    """
    history = list(current.history) if current else []
    if current is not None and current.model != model and current.state != "failed":
        history.append(current.model)
    return Deployment(
        group=group, model=model, activated_ns=now_ns, state="active", history=_bounded(history)
    )


def rollback(current: Deployment | None, group: str, now_ns: int) -> Deployment:
    """Back to the previous desired model (the last history entry), by request."""
    if current is None:
        raise Refused(
            "not_found",
            f"group {group!r} has no deployment yet: deploy a model first "
            f"(lensbus deploy NAME --group {group})",
        )
    if not current.history:
        raise Refused(
            "conflict",
            f"nothing to roll back to: group {group!r} has had no model before {current.model.ref}",
        )
    previous = current.history[-1]
    return Deployment(
        group=group,
        model=previous,
        activated_ns=now_ns,
        state="rolled_back",
        reason=f"manual rollback from {current.model.ref}",
        history=list(current.history[:-1]),
    )


def failure_text(report: SwapReport) -> str:
    return f"{report.desired.ref} failed on {report.instance}: {report.reason or 'no reason given'}"


def auto_rollback(current: Deployment, report: SwapReport, now_ns: int) -> Deployment | None:
    """What a failed swap does to the group's record, or ``None`` when it changes nothing.

    Only a failure of the group's *current* desired model counts, and only once: after the
    rollback the desired model is another one, and a deployment already marked failed
    stays as it is. The caller checks that the report is newer than the record.
    """
    if report.state != "failed" or report.group != current.group:
        return None
    if report.desired != current.model or current.state == "failed":
        return None
    what = failure_text(report)
    if not current.history:
        return Deployment(
            group=current.group,
            model=current.model,
            activated_ns=current.activated_ns,
            state="failed",
            reason=f"{what}; nothing to roll back to",
            history=[],
        )
    previous = current.history[-1]
    return Deployment(
        group=current.group,
        model=previous,
        activated_ns=now_ns,
        state="rolled_back",
        reason=f"{AUTOMATIC} to {previous.ref}: {what}",
        history=list(current.history[:-1]),
    )


# ---- models in the object store ----------------------------------------------------------


def content_sha256(manifest: Manifest) -> str:
    """What makes two uploads "the same model": the manifest, which holds every file's
    sha256 and size. (Two archives of the same folder differ in their tar/gzip times.)"""
    return hashlib.sha256(manifest.model_dump_json().encode()).hexdigest()


def object_headers(
    manifest: Manifest, archive_sha256: str, content: str, uploaded_ns: int
) -> dict[str, list[str]]:
    inp = manifest.input
    return {
        H_NAME: [manifest.name],
        H_VERSION: [manifest.version],
        H_FRAMEWORK: [manifest.framework],
        H_TASK: [manifest.task],
        H_DECODER: [manifest.decoder],
        H_INPUT: [f"{inp.width}x{inp.height} {inp.layout} {inp.color}"],
        H_UPLOADED: [str(uploaded_ns)],
        H_CONTENT: [content],
        H_SHA256: [archive_sha256],
    }


def header(headers: Mapping[str, Any] | None, key: str) -> str | None:
    """One header value, whether stored Go-style (a list) or as a plain string."""
    if not headers:
        return None
    value = headers.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, str) else None


def digest_hex(digest: str | None) -> str | None:
    """The object store's ``SHA-256=<base64url>`` digest as hex."""
    if not digest or "=" not in digest:
        return None
    try:
        return base64.urlsafe_b64decode(digest.split("=", 1)[1]).hex()
    except (ValueError, TypeError):
        return None


def model_info(
    name: str,
    size: int | None,
    digest: str | None,
    description: str | None,
    headers: Mapping[str, Any] | None,
) -> ModelInfo | None:
    """A stored object as a model version; ``None`` for objects lensbus did not put."""
    model, version = header(headers, H_NAME), header(headers, H_VERSION)
    if model is None or version is None or object_name(model, version) != name:
        return None
    sha = digest_hex(digest) or header(headers, H_SHA256)
    try:
        return ModelInfo(
            name=model,
            version=version,
            framework=header(headers, H_FRAMEWORK),
            task=header(headers, H_TASK),
            size=size or 0,
            sha256=sha or "",
            uploaded_ns=int(header(headers, H_UPLOADED) or 0),
            description=description or "",
        )
    except (ValidationError, ValueError):
        return None


def latest(models: Iterable[ModelInfo], name: str) -> ModelInfo | None:
    """The most recently uploaded version of ``name``."""
    versions = [m for m in models if m.name == name]
    return max(versions, key=lambda m: (m.uploaded_ns, m.version)) if versions else None


# ---- status --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Heartbeat:
    """The last heartbeat of an inference instance, as received."""

    status: Status
    received_ns: int

    @property
    def group(self) -> str | None:
        return self.status.detail.get("group")

    def fresh(self, now_ns: int) -> bool:
        """Heard from within three heartbeat intervals (and not stopping)."""
        window_ns = int((3 * self.status.interval_s + 1.0) * 1e9)
        return self.status.state != "stopping" and now_ns - self.received_ns <= window_ns


def _instance_state(
    name: str, report: SwapReport | None, hb: Heartbeat | None, now_ns: int, settled: bool
) -> InstanceState:
    fresh = hb is not None and hb.fresh(now_ns)
    serving: ModelVersionRef | None = None
    if fresh and hb is not None and hb.status.model is not None:
        serving = ModelVersionRef(name=hb.status.model.name, version=hb.status.model.version)
    elif report is not None:
        serving = report.serving
    if hb is not None and hb.status.state == "stopping":
        state, serving = "stopped", None
    elif not fresh and (hb is not None or settled):
        state, serving = "offline", None  # what it served last is not served now
    elif report is not None:
        state = report.state
    else:
        state = hb.status.state if hb is not None else "unknown"
    reason = ""
    if report is not None and report.state == "failed":
        reason = failure_text(report)
    elif hb is not None and fresh:
        reason = hb.status.reason
    seen = max(hb.received_ns if hb else 0, report.time_ns if report else 0)
    return InstanceState(instance=name, state=state, serving=serving, reason=reason, seen_ns=seen)


def group_statuses(
    deployments: Mapping[str, Deployment],
    reports: Iterable[SwapReport],
    heartbeats: Iterable[Heartbeat],
    now_ns: int,
    settled: bool = True,
    only: str | None = None,
) -> list[GroupStatus]:
    """Desired (deployments) against served (reports, heartbeats), group by group.

    ``settled`` is false while the deployer has not been up long enough to have heard
    every live instance's heartbeat; until then a silent instance is not called offline.
    """
    by_group: dict[str, dict[str, SwapReport]] = {}
    for rep in reports:
        by_group.setdefault(rep.group, {})[rep.instance] = rep
    beats: dict[str, dict[str, Heartbeat]] = {}
    for hb in heartbeats:
        if hb.status.service == INFERENCE_SERVICE and hb.group:
            beats.setdefault(hb.group, {})[hb.status.instance] = hb
    groups = sorted(set(deployments) | set(by_group) | set(beats))
    out = []
    for group in groups:
        if only is not None and group != only:
            continue
        reps = by_group.get(group, {})
        hbs = beats.get(group, {})
        instances = [
            _instance_state(name, reps.get(name), hbs.get(name), now_ns, settled)
            for name in sorted(set(reps) | set(hbs))
        ]
        dep = deployments.get(group)
        # An instance's failed report is overwritten by its next one (after the rollback,
        # "serving" the previous model), so the deployment's reason keeps the failure too.
        failures = [(r.time_ns, failure_text(r)) for r in reps.values() if r.state == "failed"]
        if dep is not None and (dep.state == "failed" or dep.reason.startswith(AUTOMATIC)):
            failures.append((dep.activated_ns, dep.reason))
        last_failure = max(failures)[1] if failures else ""
        out.append(
            GroupStatus(group=group, deployment=dep, instances=instances, last_failure=last_failure)
        )
    return out
