"""The automatic rollback: one watch on ``lensbus-deployments``, for the reports in it.

- a swap report (``report.<group>.<instance>``) that the group's current desired model
  failed rolls the group back (once);
- a project report (``project-report.<name>.<instance>``) that the project's current version
  failed to start rolls ``project.<name>`` back to its previous release (once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable

from nats.js.kv import KeyValue

from lensbus import metrics as shared_metrics
from lensbus.codec import DecodeError, decode
from lensbus.logs import RateLimit, log_limited
from lensbus.schemas import ProjectReport, SwapReport
from lensbus_deployer import decisions, metrics, project_records
from lensbus_deployer.errors import StaleRecord
from lensbus_deployer.project_store import PROJECT_REPORT_PREFIX, ProjectStore
from lensbus_deployer.store import CAS_ATTEMPTS, REPORT_PATTERN, Store

SWAP_REPORT_PREFIX = REPORT_PATTERN.removesuffix(">")  # "report."

log = logging.getLogger(__name__)


class AutoRollback:
    """The task following the swap reports; restarted whenever the buckets are bound again."""

    def __init__(self, store: Store, counts: dict[str, int]) -> None:
        self.store = store
        self.projects = ProjectStore(store)
        self.counts = counts
        self._watch: asyncio.Task[None] | None = None
        self._limit = RateLimit(60.0)

    @property
    def running(self) -> bool:
        return self._watch is not None and not self._watch.done()

    async def start(self) -> None:
        await self.stop()
        # Every key: the swap and project reports, and (skipped) the records beside them.
        watcher = await self.store.kv.watch(">")
        self._watch = asyncio.create_task(self._follow_reports(watcher), name="report-watch")

    async def stop(self) -> None:
        task, self._watch = self._watch, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def _follow_reports(self, watcher: KeyValue.KeyWatcher) -> None:
        try:
            while True:
                entry = await watcher.updates(timeout=None)
                if entry is None or not entry.value or entry.operation is not None:
                    continue
                if entry.key.startswith(SWAP_REPORT_PREFIX):
                    report = self._swap_report(entry.key, entry.value)
                    if report is not None and report.state == "failed":
                        await self._act(self.on_failure(report, entry.revision or 0), entry.key)
                elif entry.key.startswith(PROJECT_REPORT_PREFIX):
                    project = self._project_report(entry.key, entry.value)
                    if project is not None and project.state == "failed":
                        await self._act(
                            self.on_project_failure(project, entry.revision or 0), entry.key
                        )
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def _act(self, work: Awaitable[None], key: str) -> None:
        try:
            await work
        except Exception as exc:  # retried when the watcher restarts
            log.error("could not act on the failure reported under %s: %s", key, exc)
            raise

    def _swap_report(self, key: str, value: bytes) -> SwapReport | None:
        try:
            report = decode(value, SwapReport)
        except DecodeError as exc:
            shared_metrics.MESSAGES_REJECTED.labels(exc.reason).inc()
            log.warning("unreadable swap report %s: %s", key, exc)
            return None
        if not decisions.report_matches_key(key, report):
            shared_metrics.MESSAGES_REJECTED.labels("key_mismatch").inc()
            log_limited(
                log,
                self._limit,
                key,
                logging.WARNING,
                "refused the swap report under %s: it names group %s, instance %s",
                key,
                report.group,
                report.instance,
            )
            return None
        return report

    def _project_report(self, key: str, value: bytes) -> ProjectReport | None:
        try:
            report = decode(value, ProjectReport)
        except DecodeError as exc:
            shared_metrics.MESSAGES_REJECTED.labels(exc.reason).inc()
            log_limited(log, self._limit, key, logging.WARNING, "unreadable %s: %s", key, exc)
            return None
        if not project_records.report_matches_key(key, report):
            shared_metrics.MESSAGES_REJECTED.labels("key_mismatch").inc()
            log_limited(
                log,
                self._limit,
                key,
                logging.WARNING,
                "refused the project report under %s: it names project %s, instance %s",
                key,
                report.project,
                report.instance,
            )
            return None
        return report

    async def on_project_failure(self, report: ProjectReport, revision: int) -> None:
        """Roll the project back if the report is about its current version."""
        for _ in range(CAS_ATTEMPTS):
            current = await self.projects.deployment(report.project)
            if current.deployment is None or current.revision > revision:
                return  # removed, or the report predates the current record
            new = project_records.auto_rollback(current.deployment, report, time.time_ns())
            if new is None:
                return
            try:
                await self.projects.write(new, current.revision)
            except StaleRecord:
                continue
            outcome = "ok" if new.current.version != report.version else "nothing_before"
            metrics.PROJECT_CHANGES.labels("auto_rollback", outcome).inc()
            if outcome == "ok":
                self.counts["rollbacks"] += 1
            log.warning("project %s: %s", new.name, new.reason)
            return
        log.error("project %s changed too often to record its failure", report.project)

    async def on_failure(self, report: SwapReport, revision: int) -> None:
        """Roll the group back if the report is about its current desired model."""
        for _ in range(CAS_ATTEMPTS):
            current = await self.store.deployment(report.group)
            if current.deployment is None or current.revision > revision:
                return  # the report predates the group's current record
            new = decisions.auto_rollback(current.deployment, report, time.time_ns())
            if new is None:
                return
            try:
                await self.store.write(new, current.revision)
            except StaleRecord:
                continue
            metrics.DEPLOYMENTS_FAILED.inc()
            if new.state == "rolled_back":
                metrics.ROLLBACKS.labels("automatic").inc()
                self.counts["rollbacks"] += 1
            log.warning("group %s: %s", new.group, new.reason)
            return
        log.error(
            "group %s changed too often to record the failure of %s",
            report.group,
            report.desired.ref,
        )
