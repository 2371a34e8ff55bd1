"""The deployer's decisions, on decoded records: no NATS, no files.

- what a new desired model, a rollback or a failed swap does to a group's
  :class:`~lensbus.schemas.Deployment`;
- how deployments, swap reports and heartbeats become a group's status.

How a model is kept in the object store is :mod:`lensbus_deployer.model_objects`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lensbus.schemas import (
    Deployment,
    GroupStatus,
    InstanceState,
    ModelVersionRef,
    Status,
    SwapReport,
)
from lensbus.schemas.deploy import HISTORY_LENGTH, report_key
from lensbus_deployer.errors import Refused

# The service whose heartbeats say which model an instance serves.
INFERENCE_SERVICE = "inference"

AUTOMATIC = "automatic rollback"


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


def report_matches_key(key: str, report: SwapReport) -> bool:
    """Whether a swap report names the group and instance of the key it was written under:
    the key is what the server's permissions scope (an inference user writes only its own
    group's reports); the payload is what the writer says."""
    return key == report_key(report.group, report.instance)
