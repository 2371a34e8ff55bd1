"""JetStream as the deployer sees it: whether it answers (``/healthz``, the gauge, the
refusals), the buckets bound on it (again after every NATS reconnect), and the store gauges."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
from nats.js.errors import ServiceUnavailableError

from lensbus.runtime import Runtime
from lensbus_deployer import metrics
from lensbus_deployer.auto_rollback import AutoRollback
from lensbus_deployer.config import DeployerSettings
from lensbus_deployer.errors import Refused
from lensbus_deployer.project_store import ProjectStore
from lensbus_deployer.store import Store

log = logging.getLogger(__name__)


def jetstream_problem(exc: BaseException) -> str:
    """What a failed JetStream call says about JetStream, for /healthz and replies."""
    if isinstance(exc, ServiceUnavailableError | nats.errors.NoRespondersError):
        return "JetStream does not answer: not enabled on this NATS server, or not ready yet"
    if isinstance(exc, TimeoutError):
        return "JetStream did not answer in time"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class JetStream:
    """JetStream's availability and the buckets; :meth:`check` runs every few seconds."""

    def __init__(
        self,
        settings: DeployerSettings,
        rt: Runtime,
        store: Store,
        auto_rollback: AutoRollback,
        counts: dict[str, int],
    ) -> None:
        self.s = settings
        self.rt = rt
        self.store = store
        self.projects = ProjectStore(store)
        self.projects_problem: str | None = "not checked yet"
        self.auto_rollback = auto_rollback
        self.counts = counts
        self.problem: str | None = "not checked yet"
        rt.health.set("jetstream", self.problem)
        self._ensured_at_reconnects: int | None = None

    def require_store(self) -> Store:
        """The store, or a refusal saying why JetStream cannot be used now."""
        if self.problem is not None or not self.store.ready:
            raise Refused(
                "internal",
                f"the deployer cannot use JetStream now ({self.problem}); "
                "check that nats-server runs with JetStream enabled (-js) and has storage",
            )
        return self.store

    def require_projects(self) -> ProjectStore:
        """The projects' store, or a refusal saying why JetStream cannot be used now."""
        self.require_store()
        if not self.projects.ready:
            raise Refused(
                "internal",
                f"the deployer cannot use the object store {self.rt.subjects.projects_bucket} now "
                f"({self.projects_problem})",
            )
        return self.projects

    async def check(self) -> None:
        """Ask JetStream; bind the buckets and restart the report watch where needed."""
        nc = self.rt.bus.nc
        if nc is None or not nc.is_connected:
            self._set("not connected to NATS")
            return
        reconnects = int(nc.stats.get("reconnects", 0))
        try:
            await asyncio.wait_for(self.store.js.account_info(), self.s.request_timeout_s)
            fresh = not self.store.ready or reconnects != self._ensured_at_reconnects
            if fresh:
                await asyncio.wait_for(self.store.ensure(), self.s.request_timeout_s * 2)
            if fresh or not self.projects.ready:
                await self._ensure_projects()
            if fresh or not self.auto_rollback.running:
                # A watcher's consumer does not survive a NATS restart: start a new one.
                await self.auto_rollback.start()
                self._ensured_at_reconnects = reconnects
                await self.update_gauges()
        except Exception as exc:  # any failure here means: not usable now, try again
            self._set(jetstream_problem(exc))
            return
        self._set(None)

    async def _ensure_projects(self) -> None:
        """Bind the projects' store; a failure (e.g. a NATS user without the permission)
        leaves the models working and the project verbs refusing with the cause."""
        try:
            await asyncio.wait_for(self.projects.ensure(), self.s.request_timeout_s)
        except Exception as exc:
            problem = jetstream_problem(exc)
            if problem != self.projects_problem:
                log.warning(
                    "object store %s unavailable: %s", self.rt.subjects.projects_bucket, problem
                )
            self.projects_problem = problem
            return
        if self.projects_problem is not None:
            log.info("object store %s ready", self.rt.subjects.projects_bucket)
        self.projects_problem = None

    def _set(self, problem: str | None) -> None:
        if problem != self.problem:
            if problem is None:
                log.info(
                    "JetStream available; buckets %s and %s ready",
                    self.rt.subjects.models_bucket,
                    self.rt.subjects.deployments_bucket,
                )
            else:
                log.warning("JetStream unavailable: %s", problem)
        self.problem = problem
        self.rt.health.set("jetstream", problem)
        metrics.JETSTREAM_UP.set(1 if problem is None else 0)

    async def update_gauges(self) -> None:
        models = await self.store.list_models()
        self.counts["models"] = len(models)
        metrics.MODELS_STORED.set(len(models))
        with contextlib.suppress(Exception):
            metrics.STORE_BYTES.set(await self.store.store_bytes())
        if self.projects.ready:
            projects = await self.projects.list_projects()
            self.counts["projects"] = len(projects)
            metrics.PROJECTS_STORED.set(len(projects))
