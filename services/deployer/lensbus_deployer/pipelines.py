"""A group's desired pipeline, on decoded records: no NATS.

- whether a pipeline fits the models in the store (:func:`check`), each refusal naming the
  field (``stages[2].model: car-kind:3 is not in the store``);
- what setting one, rolling back, or deploying a model does to the group's
  :class:`~lensbus.schemas.PipelineDeployment`.

How the pipeline and the group's model deployment relate: the pipeline's primary model
(``stages[0].model``) is also the group's :class:`~lensbus.schemas.Deployment`, written
after the pipeline with ``pipeline_revision`` set to the pipeline's revision.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lensbus.schemas import (
    ModelInfo,
    ModelStage,
    ModelVersionRef,
    Pipeline,
    PipelineDeployment,
    PipelineRevision,
)
from lensbus.schemas.deploy import HISTORY_LENGTH
from lensbus.schemas.pipeline import ClassifyStage, TrackStage, ZonesStage
from lensbus_deployer.errors import Refused


@dataclass(frozen=True)
class StoredModel:
    """What the check needs of a stored model version."""

    info: ModelInfo
    labels: list[str]

    @property
    def ref(self) -> str:
        return f"{self.info.name}:{self.info.version}"


def model_refs(pipeline: Pipeline) -> list[str]:
    """The model stages' ``name:version``, primary first, each once."""
    refs = [pipeline.primary.model, *(s.model for s in pipeline.cascades)]
    return list(dict.fromkeys(refs))


def version_ref(ref: str) -> ModelVersionRef:
    name, _, version = ref.partition(":")
    return ModelVersionRef(name=name, version=version)


def check(pipeline: Pipeline, models: Mapping[str, StoredModel | None]) -> None:
    """Refuse (:class:`Refused`, the field named) a pipeline the store cannot run:
    ``models`` maps each of :func:`model_refs` to the stored version, or ``None``."""
    for i, stage in enumerate(pipeline.stages):
        if isinstance(stage, ModelStage | ClassifyStage) and models.get(stage.model) is None:
            raise Refused(
                "not_found",
                f"stages[{i}].model: {stage.model} is not in the store; upload it first "
                "(lensbus models upload PATH) or see lensbus models list",
            )
    primary = models[pipeline.primary.model]
    assert primary is not None
    needs = [s.stage for s in pipeline.stages if isinstance(s, ClassifyStage | TrackStage)]
    if needs and primary.info.task != "detection":
        raise Refused(
            "bad_request",
            f"stages[0].model: {primary.ref} is a {primary.info.task} model; a pipeline with "
            f"{' and '.join(sorted(set(needs)))} stages needs a detection model first",
        )
    for i, stage in enumerate(pipeline.stages):
        if isinstance(stage, ClassifyStage):
            secondary = models[stage.model]
            assert secondary is not None
            if secondary.info.task != "classification":
                raise Refused(
                    "bad_request",
                    f"stages[{i}].model: {stage.model} is a {secondary.info.task} model; a "
                    "classify stage needs a classification model",
                )
        for field, labels in _label_fields(i, stage):
            _check_labels(field, labels, primary)


def _label_fields(i: int, stage: object) -> list[tuple[str, list[str]]]:
    """Every label list of a stage, with its field path: each must name primary labels."""
    if isinstance(stage, ClassifyStage | TrackStage):
        return [(f"stages[{i}].labels", stage.labels)]
    if not isinstance(stage, ZonesStage):
        return []
    out = []
    for camera, cz in stage.cameras.items():
        where = f"stages[{i}].cameras.{camera}"
        out += [(f"{where}.zones[{j}].labels", z.labels) for j, z in enumerate(cz.zones)]
        out += [(f"{where}.lines[{j}].labels", ln.labels) for j, ln in enumerate(cz.lines)]
    return out


def _check_labels(field: str, labels: list[str], primary: StoredModel) -> None:
    known = set(primary.labels)
    for label in labels:
        if label not in known:
            raise Refused("bad_request", f"{field}: {label!r} is not a label of {primary.ref}")


def _bounded(history: list[PipelineRevision]) -> list[PipelineRevision]:
    return history[-HISTORY_LENGTH:]


def set_pipeline(
    current: PipelineDeployment | None, group: str, pipeline: Pipeline, now_ns: int, reason: str
) -> PipelineDeployment:
    """The group's record once ``pipeline`` is desired; the one it replaces goes to the
    history (setting the same pipeline again changes nothing but the time)."""
    history = list(current.history) if current else []
    if current is not None and current.pipeline != pipeline:
        history.append(current.current)
    revision = current.revision + 1 if current else 1
    new = PipelineRevision(revision=revision, pipeline=pipeline, activated_ns=now_ns, reason=reason)
    return PipelineDeployment(group=group, current=new, history=_bounded(history))


def rollback(current: PipelineDeployment | None, group: str, now_ns: int) -> PipelineDeployment:
    """Back to the previous pipeline (the last history entry), as a new revision."""
    if current is None:
        raise Refused(
            "not_found",
            f"group {group!r} has no pipeline: set one first "
            f"(lensbus pipeline set --group {group} FILE)",
        )
    if not current.history:
        raise Refused(
            "conflict",
            f"nothing to roll back to: group {group!r} has had no pipeline before "
            f"revision {current.revision}",
        )
    previous = current.history[-1]
    new = PipelineRevision(
        revision=current.revision + 1,
        pipeline=previous.pipeline,
        activated_ns=now_ns,
        reason=f"rollback from revision {current.revision} to revision {previous.revision}",
    )
    return PipelineDeployment(group=group, current=new, history=list(current.history[:-1]))


def with_model(pipeline: Pipeline, model: str) -> Pipeline:
    """The pipeline with its primary model replaced (``lensbus deploy`` on its group)."""
    primary = pipeline.primary.model_copy(update={"model": model})
    return pipeline.model_copy(update={"stages": [primary, *pipeline.stages[1:]]})
