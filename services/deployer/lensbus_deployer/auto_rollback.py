"""The automatic rollback: a watch on the swap reports in ``lensbus-deployments``; a report
that the group's current desired model failed rolls the group back (once)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.js.kv import KeyValue

from lensbus import metrics as shared_metrics
from lensbus.codec import DecodeError, decode
from lensbus.logs import RateLimit, log_limited
from lensbus.schemas import SwapReport
from lensbus_deployer import decisions, metrics
from lensbus_deployer.errors import StaleRecord
from lensbus_deployer.store import CAS_ATTEMPTS, REPORT_PATTERN, Store

log = logging.getLogger(__name__)


class AutoRollback:
    """The task following the swap reports; restarted whenever the buckets are bound again."""

    def __init__(self, store: Store, counts: dict[str, int]) -> None:
        self.store = store
        self.counts = counts
        self._watch: asyncio.Task[None] | None = None
        self._limit = RateLimit(60.0)

    @property
    def running(self) -> bool:
        return self._watch is not None and not self._watch.done()

    async def start(self) -> None:
        await self.stop()
        watcher = await self.store.kv.watch(REPORT_PATTERN)
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
                try:
                    report = decode(entry.value, SwapReport)
                except DecodeError as exc:
                    shared_metrics.MESSAGES_REJECTED.labels(exc.reason).inc()
                    log.warning("unreadable swap report %s: %s", entry.key, exc)
                    continue
                if not decisions.report_matches_key(entry.key, report):
                    shared_metrics.MESSAGES_REJECTED.labels("key_mismatch").inc()
                    log_limited(
                        log,
                        self._limit,
                        entry.key,
                        logging.WARNING,
                        "refused the swap report under %s: it names group %s, instance %s",
                        entry.key,
                        report.group,
                        report.instance,
                    )
                    continue
                if report.state == "failed":
                    try:
                        await self.on_failure(report, entry.revision or 0)
                    except Exception as exc:  # retried when the watcher restarts
                        log.error(
                            "could not act on the failure of %s in group %s: %s",
                            report.desired.ref,
                            report.group,
                            exc,
                        )
                        raise
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

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
