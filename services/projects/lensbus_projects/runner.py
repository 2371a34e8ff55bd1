"""One project under supervision: its desired release run in a host process, swapped
live, watched, restarted, reported.

The main loop (:meth:`ProjectRunner.run`) starts the desired version beside the serving one
and hands over (lensbus_projects.hosting), restarts a dead host with back-off, and stops the
project when its record is deleted. A watchdog (:meth:`ProjectRunner.watch`) reads the
serving host's beats every :data:`TICK_S`: counts, the project's own metrics, and a handler
call past ``deadline_s`` (``hang``) or beats stopped that long (``silent``): killed.

A version that fails to start is reported ``failed`` (the deployer rolls the record back)
and not tried again while the record asks for it; the serving version keeps running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from lensbus.projects import control
from lensbus.schemas.project import ProjectManifest, ProjectRelease
from lensbus_projects import metrics
from lensbus_projects.config import ProjectsSettings
from lensbus_projects.fetch import Fetcher, FetchFailed, FetchUnavailable
from lensbus_projects.hosting import StartFailed, host_env, start_host, stop_host, take_over
from lensbus_projects.hostproc import HostProcess

log = logging.getLogger(__name__)

TICK_S = 0.2
MAX_BACKOFF_S = 30.0
STABLE_S = 60.0  # a host up this long starts the back-off over


@dataclass
class Counts:
    handled: int = 0
    errors: int = 0
    dropped: int = 0
    restarts: int = 0


@dataclass
class Status:
    """What the project's report says."""

    version: str
    state: str
    reason: str
    serving: str
    counts: Counts


# Hooks the service gives each runner.
# The cameras a project handles: from its manifest and the groups it was deployed to.
Cameras = Callable[[ProjectManifest, "list[str]"], "list[str] | str"]
Password = Callable[[str], str]
Prepare = Callable[[str], Awaitable[None]]  # before a host first starts (its state bucket)


class ProjectRunner:
    def __init__(
        self,
        name: str,
        s: ProjectsSettings,
        fetcher: Fetcher,
        cameras: Cameras,
        password: Password,
        prepare: Prepare,
    ) -> None:
        self.name = name
        self.s = s
        self.fetcher = fetcher
        self.cameras = cameras
        self.password = password
        self.prepare = prepare
        self.desired: ProjectRelease | None = None
        self.wake = asyncio.Event()
        self.host: HostProcess | None = None  # the serving host (alive or dead)
        self.manifest: ProjectManifest | None = None
        self.folder: Path | None = None
        self.counts = Counts()
        self.failed: tuple[str, str, str] | None = None  # (version, sha256, reason)
        self.starting: str = ""
        self.restart_at: float | None = None
        self.restart_reason = ""
        self.delay_s = s.restart_backoff_s
        self.sent_cameras: list[str] | str = "*"
        self.changed = asyncio.Event()  # a state change: report now
        self._counted = control.Beat()
        self.ended = False  # its hosts stopped: the project or the service is stopping
        self.retry_at = 0.0  # a version whose fetch could not be done: not before this

    def set_desired(self, release: ProjectRelease | None) -> None:
        self.desired = release
        self.wake.set()

    # ---- status ----------------------------------------------------------------------------

    def status(self) -> Status:
        serving = self.manifest.version if self.manifest is not None and self.host else ""
        d = self.desired
        if d is None or self.ended:
            ran = self.manifest.version if self.manifest is not None else "-"
            return Status(ran, "stopped", "", serving, self.counts)
        if self.failed is not None and self.failed[:2] == (d.version, d.sha256):
            return Status(d.version, "failed", self.failed[2], serving, self.counts)
        if self.starting or serving != d.version or self.restart_at is not None:
            why = f"restarting after {self.restart_reason}" if self.restart_at is not None else ""
            return Status(d.version, "starting", why, serving, self.counts)
        return Status(d.version, "running", "", serving, self.counts)

    def _changed(self) -> None:
        st = self.status()
        metrics.set_state(self.name, st.state)
        self.changed.set()

    # ---- the watchdog ----------------------------------------------------------------------

    def account(self, host: HostProcess) -> None:
        """Count what ``host`` beat since the last look (hosts count from 0 each start)."""
        beat, seen = host.beat, self._counted
        for attr, counter in (
            ("handled", metrics.HANDLED),
            ("errors", metrics.HANDLER_ERRORS),
            ("dropped", metrics.DROPPED),
        ):
            delta = getattr(beat, attr) - getattr(seen, attr)
            if delta > 0:
                counter.labels(self.name).inc(delta)
                setattr(self.counts, attr, getattr(self.counts, attr) + delta)
        self._counted = control.Beat(beat.busy_s, beat.handled, beat.errors, beat.dropped)
        metrics.PROJECT_METRICS.update(self.name, beat.metrics)

    def check(self, host: HostProcess, deadline_s: float) -> str | None:
        """Why ``host`` must be killed now (hang, silent), or None."""
        now = time.monotonic()
        if host.beat.busy_s is not None and host.beat.busy_s + (now - host.beat_at) > deadline_s:
            return "hang"
        if now - host.beat_at > max(deadline_s, 2 * control.BEAT_S + 1.0):
            return "silent"
        return None

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                self._watch_once()
            except Exception:  # a bug here must not end the watch: hangs would go unseen
                log.exception("project %s: watchdog round failed", self.name)
            await asyncio.sleep(TICK_S)

    def _watch_once(self) -> None:
        host, manifest = self.host, self.manifest
        if host is None or manifest is None or host.returncode is not None:
            return
        self.account(host)
        why = None if host.killed else self.check(host, manifest.limits.deadline_s)
        if why is not None:
            log.warning(
                "project %s %s: %s for %.1f s (deadline_s); killing its process",
                self.name,
                manifest.version,
                "a handler call ran" if why == "hang" else "no beat",
                manifest.limits.deadline_s,
            )
            host.kill_reason = why
            host.kill()

    # ---- the main loop ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        watchdog = asyncio.create_task(self.watch(stop), name=f"watch-{self.name}")
        try:
            while not stop.is_set():
                if self.desired is None:
                    break
                await self.step(self.desired)
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), TICK_S)
                except TimeoutError:
                    pass
        finally:
            await self.shutdown()
            watchdog.cancel()

    async def step(self, d: ProjectRelease) -> None:
        host = self.host
        if host is not None and host.returncode is not None and self.restart_at is None:
            await self._died(host)
        serving = self.manifest.version if self.manifest is not None else None
        failed = self.failed is not None and self.failed[:2] == (d.version, d.sha256)
        if d.version != serving and not failed:
            if time.monotonic() >= self.retry_at:
                await self.start(d)
        elif self.restart_at is not None and time.monotonic() >= self.restart_at:
            await self.start(d, restart=True)
        elif host is not None and host.ready and self.manifest is not None:
            await self._update_cameras(host, self.manifest)

    async def _died(self, host: HostProcess) -> None:
        code = host.returncode
        tail = host.log_tail(3)
        why = host.kill_reason or ("memory" if "MemoryError" in tail else "exit")
        self.account(host)
        await host.close()
        metrics.RESTARTS.labels(self.name, why).inc()
        self.counts.restarts += 1
        self.restart_reason = why
        if time.monotonic() - host.started_at > STABLE_S:
            self.delay_s = self.s.restart_backoff_s
        self.restart_at = time.monotonic() + self.delay_s
        log.warning(
            "project %s %s: process lost (%s, code %s); restarting in %.1f s%s",
            self.name,
            host.version,
            why,
            code,
            self.delay_s,
            f" (log: {tail})" if tail else "",
        )
        self.delay_s = min(self.delay_s * 2, MAX_BACKOFF_S)
        self._changed()

    async def start(self, d: ProjectRelease, restart: bool = False) -> None:
        self.starting = d.version
        self._changed()
        try:
            folder, manifest = await self.fetcher.project(self.name, d)
            models = await self.fetcher.models_for(manifest)
            await self.prepare(self.name)
            cameras = self.cameras(manifest, d.groups)
            env = host_env(self.s, folder, manifest, cameras, self.password(self.name), models)
            new = await start_host(self.s, manifest, folder, env)
        except FetchUnavailable as exc:  # not the version's fault: again after a back-off
            log.warning("project %s %s: %s; trying again", self.name, d.version, exc)
            self.retry_at = time.monotonic() + self.s.restart_backoff_s
            return
        except (FetchFailed, StartFailed) as exc:
            self._start_failed(d, str(exc), restart)
            return
        finally:
            self.starting = ""
        await self._hand_over(new, manifest, folder, cameras, restart)

    def _start_failed(self, d: ProjectRelease, reason: str, restart: bool) -> None:
        log.warning("project %s %s did not start: %s", self.name, d.version, reason)
        if restart:  # the serving version: try again later
            self.restart_at = time.monotonic() + self.delay_s
            self.delay_s = min(self.delay_s * 2, MAX_BACKOFF_S)
            self.restart_reason = f"a failed restart: {reason}"[:300]
        else:
            self.failed = (d.version, d.sha256, reason[:500])
        self._changed()

    async def _hand_over(
        self,
        new: HostProcess,
        manifest: ProjectManifest,
        folder: Path,
        cameras: list[str] | str,
        restart: bool,
    ) -> None:
        old, old_manifest = self.host, self.manifest
        deadline = old_manifest.limits.deadline_s if old_manifest is not None else 0.0
        if old is not None and old.returncode is None:
            self.account(old)
        if cameras == []:  # the environment cannot say "none" ('' is every camera)
            await new.send({"t": "cameras", "cameras": []})
        await take_over(self.name, new, old, deadline)
        if old is not None and old is self.host:
            self.account(old)  # its beats up to 'stopped', before the new one's count
        if not restart:
            self.counts = Counts()
        self.host, self.manifest, self.folder = new, manifest, folder
        self._counted = control.Beat()
        self.sent_cameras = cameras
        self.restart_at = None
        self.failed = None
        log.info(
            "project %s %s %s (cameras %s)",
            self.name,
            manifest.version,
            "restarted" if restart else "serving",
            cameras,
        )
        self._changed()

    async def _update_cameras(self, host: HostProcess, manifest: ProjectManifest) -> None:
        groups = self.desired.groups if self.desired is not None else manifest.groups
        cameras = self.cameras(manifest, groups)
        if cameras != self.sent_cameras and await host.send({"t": "cameras", "cameras": cameras}):
            log.info("project %s: cameras now %s", self.name, cameras)
            self.sent_cameras = cameras

    async def shutdown(self) -> None:
        """Stop the serving host (it runs on_stop), then say so."""
        host, manifest = self.host, self.manifest
        if host is not None and host.returncode is None and manifest is not None:
            self.account(host)
            await stop_host(host, manifest.limits.deadline_s)
            self.account(host)  # its last beats
        self.host = None
        self.ended = True
        metrics.PROJECT_METRICS.forget(self.name)
        self._changed()
