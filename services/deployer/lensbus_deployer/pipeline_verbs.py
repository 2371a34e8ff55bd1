"""The pipeline verbs of the deployer's API (``pipeline_set``, ``pipeline_get``,
``pipeline_rollback``), and what ``activate``/``rollback`` of a model do to a group's
pipeline.

Two records per group, written in this order by every change made by request:

1. ``pipeline.<group>`` (:class:`~lensbus.schemas.PipelineDeployment`): the pipeline, its
   revision (one more per change) and the earlier ones;
2. ``group.<group>`` (:class:`~lensbus.schemas.Deployment`): the pipeline's primary model,
   with ``pipeline_revision`` = that revision, so an inference instance that knows nothing
   of pipelines serves the primary model, and one that does can tell the two agree.

The Deployment stays the authority on the primary model actually desired: an automatic
rollback (a failed swap) changes it alone, and says so in its ``reason``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from lensbus.schemas import (
    Deployment,
    ModelVersionRef,
    Pipeline,
    PipelineDeployment,
    PipelineReply,
    PipelineRequest,
    PipelineSetRequest,
)
from lensbus_deployer import decisions, metrics, pipelines
from lensbus_deployer.errors import Refused
from lensbus_deployer.jetstream import JetStream
from lensbus_deployer.pipelines import StoredModel
from lensbus_deployer.store import compare_and_set

log = logging.getLogger(__name__)

UpdateDeployment = Callable[[str, Callable[[Deployment | None], Deployment]], Awaitable[Deployment]]
PipelineChange = Callable[[PipelineDeployment | None], PipelineDeployment]


class PipelineVerbs:
    def __init__(
        self, jetstream: JetStream, update_deployment: UpdateDeployment, counts: dict[str, int]
    ) -> None:
        self.jetstream = jetstream
        self._update_deployment = update_deployment
        self.counts = counts

    async def _stored(self, pipeline: Pipeline) -> dict[str, StoredModel | None]:
        store = self.jetstream.require_store()
        out: dict[str, StoredModel | None] = {}
        for ref in pipelines.model_refs(pipeline):
            name, _, version = ref.partition(":")
            found = await store.model(name, version)
            labels = await store.labels(name, version) if found else None
            out[ref] = StoredModel(found[0], labels) if found and labels is not None else None
        return out

    async def check(self, pipeline: Pipeline) -> None:
        """Refuse, the field named, a pipeline the store cannot run."""
        pipelines.check(pipeline, await self._stored(pipeline))

    async def _update(self, group: str, change: PipelineChange) -> PipelineDeployment:
        """Compare-and-set the group's pipeline record."""
        store = self.jetstream.require_store()

        async def read() -> tuple[PipelineDeployment | None, int]:
            current = await store.pipeline(group)
            return current.record, current.revision

        what = f"the pipeline of group {group!r}"
        return await compare_and_set(read, store.write_pipeline, change, what)

    async def _activate(self, record: PipelineDeployment) -> Deployment:
        """The group's Deployment follows the pipeline's primary model."""
        ref = pipelines.version_ref(record.pipeline.primary.model)
        now = time.time_ns()

        def change(cur: Deployment | None) -> Deployment:
            dep = decisions.activate(cur, record.group, ref, now)
            return dep.model_copy(update={"pipeline_revision": record.revision})

        return await self._update_deployment(record.group, change)

    async def pipeline_set(self, req: PipelineSetRequest) -> PipelineReply:
        try:
            await self.check(req.pipeline)
        except Refused as exc:
            metrics.PIPELINES_REFUSED.labels(exc.code).inc()
            raise
        now = time.time_ns()
        record = await self._update(
            req.group,
            lambda cur: pipelines.set_pipeline(cur, req.group, req.pipeline, now, "set"),
        )
        dep = await self._activate(record)
        metrics.PIPELINE_CHANGES.labels("set").inc()
        self.counts["pipelines"] += 1
        log.info("group %s: pipeline revision %d", req.group, record.revision)
        return PipelineReply(pipeline=record, deployment=dep)

    async def pipeline_get(self, req: PipelineRequest) -> PipelineReply:
        store = self.jetstream.require_store()
        current = await store.pipeline(req.group)
        if current.unreadable:
            raise Refused(
                "conflict",
                f"the pipeline of group {req.group!r} cannot be read by this deployer "
                f"({current.unreadable}): a newer lensbus wrote it, or set it again",
            )
        if current.record is None:
            raise Refused(
                "not_found",
                f"group {req.group!r} has no pipeline (it runs its deployed model alone); "
                f"set one with: lensbus pipeline set --group {req.group} FILE",
            )
        dep = (await store.deployment(req.group)).deployment
        return PipelineReply(pipeline=current.record, deployment=dep)

    async def pipeline_rollback(self, req: PipelineRequest) -> PipelineReply:
        now = time.time_ns()
        record = await self._update(req.group, lambda cur: pipelines.rollback(cur, req.group, now))
        dep = await self._activate(record)
        metrics.PIPELINE_CHANGES.labels("rollback").inc()
        log.info("group %s: pipeline %s", req.group, record.current.reason)
        return PipelineReply(pipeline=record, deployment=dep)

    async def follow_model(self, group: str, ref: ModelVersionRef, reason: str, check: bool) -> int:
        """A model deployed (or rolled back) by request on a group with a pipeline replaces
        its model stage, as a new pipeline revision; returns it (0: the group has none).
        ``check``: refuse a model the pipeline's other stages cannot follow."""
        store = self.jetstream.require_store()
        current = await store.pipeline(group)
        if current.record is None or current.record.pipeline.primary.model == ref.ref:
            return current.record.revision if current.record else 0
        if check:
            try:
                await self.check(pipelines.with_model(current.record.pipeline, ref.ref))
            except Refused as exc:
                metrics.PIPELINES_REFUSED.labels(exc.code).inc()
                raise Refused(
                    exc.code,
                    f"group {group!r} has a pipeline whose model stage {ref.ref} would "
                    f"replace, and it does not fit: {exc.message}",
                ) from None
        now = time.time_ns()

        def change(cur: PipelineDeployment | None) -> PipelineDeployment:
            if cur is None:  # removed meanwhile: nothing to follow
                raise Refused("conflict", f"the pipeline of group {group!r} changed; try again")
            new = pipelines.with_model(cur.pipeline, ref.ref)
            return pipelines.set_pipeline(cur, group, new, now, reason)

        record = await self._update(group, change)
        metrics.PIPELINE_CHANGES.labels("model").inc()
        return record.revision
