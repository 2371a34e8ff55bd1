"""Following the group's pipeline: KV ``pipeline.<group>`` in ``lensbus-deployments``.

The value is the deployer's :class:`~lensbus.schemas.deploy.PipelineDeployment`; its
current pipeline goes to ``on_change`` (``None`` when the key is deleted or purged); an
unreadable one is counted and logged, and the pipeline in force stays
(:class:`lensbus.keyfollow.KeyFollower` does the following).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from lensbus import metrics as shared_metrics
from lensbus.codec import decode
from lensbus.errors import DecodeError
from lensbus.keyfollow import KeyFollower
from lensbus.runtime import Runtime
from lensbus.schemas.deploy import PipelineDeployment, pipeline_key
from lensbus.schemas.pipeline import Pipeline
from lensbus_analytics import metrics

log = logging.getLogger(__name__)


def read_pipeline(data: bytes) -> Pipeline:
    """The pipeline a KV value holds (DecodeError when it holds none: a stage or key this
    version does not know refuses the whole record, and the pipeline in force stays)."""
    return decode(data, PipelineDeployment).pipeline


class PipelineFollower:
    def __init__(self, rt: Runtime, group: str, on_change: Callable[[Pipeline | None], None]):
        self.rt = rt
        self.key = pipeline_key(group)
        self.on_change = on_change
        self.in_force = False  # a pipeline was handed to on_change (and not removed since)
        self.follower = KeyFollower(rt, self.key, self._read)

    async def _read(self, data: bytes | None) -> None:
        revision = self.follower.last_revision
        if not data:
            if self.in_force:
                log.info("no pipeline for %s: analytics idle", self.key)
                metrics.PIPELINE_UPDATES.labels("removed").inc()
                self.in_force = False
                self.on_change(None)
            return
        try:
            pipeline = read_pipeline(data)
        except DecodeError as exc:
            metrics.PIPELINE_UPDATES.labels("invalid").inc()
            shared_metrics.MESSAGES_REJECTED.labels(exc.reason).inc()
            log.warning(
                "unreadable pipeline %s (revision %d), keeping the last: %s",
                self.key,
                revision,
                exc,
            )
            return
        metrics.PIPELINE_UPDATES.labels("ok").inc()
        stages = ", ".join(f"{s.stage}:{s.name}" for s in pipeline.stages)
        log.info("pipeline %s revision %d: %s", self.key, revision, stages)
        self.in_force = True
        self.on_change(pipeline)

    async def run(self) -> None:
        """Follow the key until stopped; survives NATS and deployer restarts."""
        await self.follower.run()
