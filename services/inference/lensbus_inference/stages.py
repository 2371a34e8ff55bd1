"""Following a camera group's pipeline: its classify stages, each loaded and swapped live.

The desired pipeline of group G is under ``pipeline.G`` in the deployments bucket (written
by the deployer). Its primary model is the group's deployment (the deployer keeps the two
in agreement; :class:`~lensbus_inference.deployment.Follower` follows that one). Each
classify stage's model goes through the same path as the primary
(:meth:`Follower.prepare`: fetch, verify, load, warm up while the old one serves), and is
put in service on its own: a change of one stage leaves the others' models in place.
Without a pipeline (or once it is deleted) the group runs its single model as before.
"""

from __future__ import annotations

import asyncio
import logging

from lensbus import metrics as shared_metrics
from lensbus.codec import decode
from lensbus.errors import DecodeError
from lensbus.keyfollow import KeyFollower
from lensbus.schemas import ModelVersionRef, Pipeline, PipelineDeployment
from lensbus.schemas.deploy import pipeline_key
from lensbus.schemas.pipeline import ClassifyStage
from lensbus_inference import cache, metrics
from lensbus_inference.cascade import Cascade
from lensbus_inference.deployment import Follower, SwapFailed
from lensbus_inference.frames import Plan
from lensbus_inference.model import LoadedModel
from lensbus_inference.worker import Worker

log = logging.getLogger(__name__)


def decode_pipeline(data: bytes) -> Pipeline:
    """The pipeline in a ``pipeline.<group>`` value (the deployer's record). Raises
    DecodeError."""
    return decode(data, PipelineDeployment).pipeline


def _ref(stage: ClassifyStage) -> ModelVersionRef:
    name, _, version = stage.model.partition(":")
    return ModelVersionRef(name=name, version=version)


class StagesFollower:
    """Keeps this instance's classify stages on its group's desired pipeline."""

    def __init__(self, follower: Follower, worker: Worker) -> None:
        self.f = follower
        self.worker = worker
        self.rt = follower.rt
        # A stage model that failed is not retried until the stage's model changes.
        self.failed: dict[str, str] = {}
        self.pipeline: Pipeline | None = None

    async def run(self) -> None:
        await KeyFollower(self.rt, pipeline_key(self.f.group), self._read).run()

    async def _read(self, data: bytes | None) -> None:
        if data is None:
            await self.apply(None)
            return
        try:
            pipeline = decode_pipeline(data)
        except DecodeError as exc:  # the stages in service stay as they are
            shared_metrics.MESSAGES_REJECTED.labels(exc.reason).inc()
            log.warning("unreadable pipeline for group %s: %s", self.f.group, exc)
            return
        await self.apply(pipeline)

    def _serving(self) -> dict[str, Cascade]:
        plan = self.worker.plan
        return {c.stage.name: c for c in plan.cascades} if plan else {}

    async def apply(self, pipeline: Pipeline | None) -> None:
        """Put ``pipeline`` in service: settings at once, each changed model once warm."""
        old = self._serving()
        if pipeline is None:
            if self.worker.plan is not None:
                log.info("group %s has no pipeline now: the single model serves", self.f.group)
            self.pipeline = None
            await self.worker.set_plan(None)
            await self._close([c.model for c in old.values()])
            await self._report(None)
            return
        # Stages whose model is unchanged take the new settings now; a changed one keeps
        # its old model (if it had one) until the new one is warm.
        self.pipeline = pipeline
        plan = self._plan({name: c.model for name, c in old.items()})
        await self.worker.set_plan(plan)
        kept = {id(c.model) for c in plan.cascades}
        await self._close([c.model for c in old.values() if id(c.model) not in kept])
        await self._report(pipeline)
        for stage in pipeline.cascades:
            have = old.get(stage.name)
            if have is None or have.ref != stage.model:
                await self._load_stage(stage)
        await self._report(pipeline)

    async def _load_stage(self, stage: ClassifyStage) -> None:
        if self.failed.get(stage.name) == stage.model:
            return
        log.info("group %s stage %s wants %s: loading", self.f.group, stage.name, stage.model)
        try:
            model, work, timings = await self.f.prepare(_ref(stage))
        except SwapFailed as exc:
            self.failed[stage.name] = stage.model
            metrics.STAGE_SWAPS.labels(stage.name, "failed").inc()
            log.error("stage %s: %s failed, keeping what it had: %s", stage.name, stage.model, exc)
            self.rt.detail["last_failure"] = f"stage {stage.name} {stage.model}: {exc}"
            return
        self.failed.pop(stage.name, None)
        models = {name: c.model for name, c in self._serving().items()}
        replaced = models.get(stage.name)
        models[stage.name] = model
        await self.worker.set_plan(self._plan(models))
        await self._close([replaced] if replaced is not None else [])
        await asyncio.to_thread(cache.keep, work)
        metrics.STAGE_SWAPS.labels(stage.name, "ok").inc()
        log.info(
            "stage %s now serving %s (fetch %.2fs, load %.2fs, warm-up %.2fs)",
            stage.name,
            stage.model,
            *timings,
        )

    def _plan(self, models: dict[str, LoadedModel]) -> Plan:
        """The pipeline's stages, in its order, with the models at hand (a stage without
        one is skipped until its model is warm)."""
        p = self.pipeline
        assert p is not None
        cascades = tuple(Cascade(s, models[s.name]) for s in p.cascades if s.name in models)
        return Plan(p.primary.name, cascades, p.has_analytics)

    async def _close(self, models: list[LoadedModel]) -> None:
        for model in models:
            await asyncio.to_thread(model.close)

    async def _report(self, pipeline: Pipeline | None) -> None:
        """Each stage's state in the heartbeat (``stage:<name>``) and the swap report: the
        model it serves, or what it waits for (``loading <ref>``, ``failed <ref>``)."""
        for key in [k for k in self.rt.detail if k.startswith("stage:")]:
            del self.rt.detail[key]
        states: dict[str, str] = {}
        serving = self._serving()
        for stage in pipeline.cascades if pipeline else []:
            have = serving.get(stage.name)
            if have is not None and have.ref == stage.model:
                states[stage.name] = have.ref
            elif self.failed.get(stage.name) == stage.model:
                states[stage.name] = f"failed {stage.model}"
            else:
                states[stage.name] = f"loading {stage.model}"
            self.rt.detail[f"stage:{stage.name}"] = states[stage.name]
        await self.f.report_stages(states)
