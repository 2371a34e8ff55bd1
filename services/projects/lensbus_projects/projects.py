"""The projects of one box: a :class:`~lensbus_projects.runner.ProjectRunner` per deployed
project, started when its record appears and stopped when it is deleted, each project's
state bucket made before its host first starts, and each project's report written to the
deployments bucket (``project-report.<name>.<instance>``) on every state change and every
``report_s``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import nats.errors
from nats.js.api import KeyValueConfig

from lensbus.codec import encode
from lensbus.jetstream import ReplicasError, ensure_key_value
from lensbus.projects.state import MAX_VALUE_BYTES, STATE_MAX_BYTES
from lensbus.runtime import Runtime
from lensbus.schemas.project import ProjectDeployment, ProjectReport, project_report_key
from lensbus_projects import metrics
from lensbus_projects.config import ProjectsSettings
from lensbus_projects.fetch import Fetcher
from lensbus_projects.follow import CameraGroups
from lensbus_projects.runner import ProjectRunner, Status

log = logging.getLogger(__name__)

# A project's NATS password ('' when the server has no auth callout).
ProjectPassword = Callable[[str], str]


class Projects:
    def __init__(self, rt: Runtime, s: ProjectsSettings, password: ProjectPassword) -> None:
        self.rt = rt
        self.s = s
        self.password = password
        self.fetcher = Fetcher(rt, s.cache_dir)
        self.groups = CameraGroups(rt)
        self.runners: dict[str, ProjectRunner] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.reporters: dict[str, asyncio.Task[None]] = {}
        self.stop = asyncio.Event()

    async def on_record(self, name: str, record: ProjectDeployment | None) -> None:
        runner = self.runners.get(name)
        if record is None:
            if runner is not None:
                log.info("project %s removed: stopping it", name)
                runner.set_desired(None)
            return
        if runner is not None and runner.desired is None and not self.tasks[name].done():
            await asyncio.wait({self.tasks[name]})  # back while it stops: start it afresh
        if runner is None or self.tasks[name].done():
            runner = ProjectRunner(
                name, self.s, self.fetcher, self.groups.cameras, self.password, self.prepare
            )
            self.runners[name] = runner
            runner.set_desired(record.current)
            self.tasks[name] = asyncio.create_task(self._run(runner), name=f"project-{name}")
            self.reporters[name] = asyncio.create_task(self.reporter(runner), name=f"rep-{name}")
            log.info("project %s: desired version %s", name, record.current.version)
            return
        if runner.desired is None or runner.desired.version != record.current.version:
            log.info("project %s: desired version %s", name, record.current.version)
        runner.set_desired(record.current)

    async def _run(self, runner: ProjectRunner) -> None:
        try:
            await runner.run(self.stop)
        except Exception:  # one project's failure must not end the others
            log.exception("project %s: its supervision failed", runner.name)

    async def prepare(self, name: str) -> None:
        """The project's state bucket (ctx.state), made before its host first starts."""
        # Bounded on the server: a project writing to its bucket directly (its permissions
        # allow it) cannot fill the store models and results share.
        config = KeyValueConfig(
            bucket=self.rt.subjects.project_state_bucket(name),
            history=1,
            max_bytes=STATE_MAX_BYTES,
            max_value_size=MAX_VALUE_BYTES,
        )
        try:
            js = self.rt.nc.jetstream()
            await ensure_key_value(js, config, replicas=self.s.jetstream_replicas)
        except (nats.errors.Error, ReplicasError) as exc:  # the host binds or makes it itself
            log.warning("project %s: state bucket %s not made: %s", name, config.bucket, exc)

    # ---- reports ---------------------------------------------------------------------------

    def report_of(self, runner: ProjectRunner) -> ProjectReport:
        st: Status = runner.status()
        return ProjectReport(
            project=runner.name,
            instance=self.s.instance,
            version=st.version,
            state=st.state,
            reason=st.reason,
            serving=st.serving,
            handled=st.counts.handled,
            errors=st.counts.errors,
            dropped=st.counts.dropped,
            restarts=st.counts.restarts,
            report_ns=time.time_ns(),
        )

    async def write_report(self, runner: ProjectRunner) -> None:
        report = self.report_of(runner)
        self.rt.detail[f"project.{runner.name}"] = f"{report.state} {report.version}"
        try:
            kv = await self.rt.nc.jetstream().key_value(self.rt.subjects.deployments_bucket)
            await kv.put(project_report_key(runner.name, self.s.instance), encode(report))
            metrics.REPORTS.labels("ok").inc()
        except Exception as exc:  # the heartbeat still carries the state
            metrics.REPORTS.labels("failed").inc()
            log.debug("report of %s not written: %s", runner.name, exc)

    async def reporter(self, runner: ProjectRunner) -> None:
        """Writes the project's report on each change and every report_s, until its runner
        ends (a last 'stopped' report)."""
        name = runner.name
        task = self.tasks[name]
        while not task.done():
            runner.changed.clear()
            await self.write_report(runner)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(runner.changed.wait(), self.s.report_s)
        if self.runners.get(name) is runner:  # not when a new runner took the project over
            await self.write_report(runner)
            if not self.stop.is_set():
                self.rt.detail.pop(f"project.{name}", None)

    def counters(self) -> dict[str, float]:
        states = [r.status().state for r in self.runners.values() if not self.tasks[r.name].done()]
        return {
            "projects": len(states),
            "running": states.count("running"),
            "failed": states.count("failed"),
        }

    async def close(self) -> None:
        """Stop every project (each host runs on_stop) and write the last reports."""
        self.stop.set()
        for runner in self.runners.values():
            runner.wake.set()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        await asyncio.gather(*self.reporters.values(), return_exceptions=True)
