"""The lifecycle every service shares: signals, health port, NATS, heartbeat, drain.

A service's ``app.py`` does::

    async with Runtime(settings) as rt:
        ...  # subscribe, start work
        await rt.stop.wait()

On SIGTERM/SIGINT ``rt.stop`` is set; leaving the block publishes a last ``stopping``
heartbeat, drains NATS within the drain timeout and closes the health port.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import TypeVar

from nats.aio.client import Client as NATS

from lensbus import __version__, metrics
from lensbus.bus import Bus
from lensbus.codec import encode
from lensbus.health import Health, HealthServer
from lensbus.logs import setup_logging
from lensbus.memory import limit_malloc_arenas
from lensbus.placement import place
from lensbus.schemas import ModelRef, State, Status
from lensbus.settings import ServiceSettings, SettingsError, load_settings
from lensbus.subjects import Subjects
from lensbus.waiting import sleep_unless_stopped

log = logging.getLogger(__name__)

S = TypeVar("S", bound=ServiceSettings)


class Runtime:
    """Owns a service's stop event, health, NATS connection and heartbeat."""

    def __init__(
        self,
        settings: ServiceSettings,
        counters: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self.settings = settings
        self.subjects = Subjects(settings.prefix)
        self.stop = asyncio.Event()
        self.health = Health()
        self.bus = Bus(settings, on_change=self._nats_changed)
        self.server = HealthServer(self.health, settings.metrics_host, settings.metrics_port)
        self.model: ModelRef | None = None
        self.detail: dict[str, str] = {}
        self._counters = counters or dict
        self._state: State = "starting"
        self._reason = ""
        self._heartbeat: asyncio.Task[None] | None = None
        metrics.BUILD_INFO.info({"service": settings.service, "version": __version__})

    @property
    def nc(self) -> NATS:
        assert self.bus.nc is not None, "not connected"
        return self.bus.nc

    @property
    def port(self) -> int:
        return self.server.port

    def _nats_changed(self, up: bool, reason: str) -> None:
        self.health.set("nats", None if up else reason or "not connected to NATS")

    def set_state(self, state: State, reason: str = "") -> None:
        """Set the state the heartbeat reports; a 'degraded'/'failed' reason shows in /healthz."""
        if (state, reason) != (self._state, self._reason) and state in ("degraded", "failed"):
            log.warning("state %s: %s", state, reason)
        self._state, self._reason = state, reason
        self.health.set("service", reason or state if state in ("degraded", "failed") else None)

    def status(self) -> Status:
        state, reason = self._state, self._reason
        if state == "running" and not self.health.ok:
            state, reason = "degraded", self.health.reason
        return Status(
            service=self.settings.service,
            instance=self.settings.instance,
            state=state,
            reason=reason,
            version=__version__,
            time_ns=time.time_ns(),
            interval_s=self.settings.heartbeat_s,
            model=self.model,
            counters=self._counters(),
            detail=self.detail,
        )

    async def publish_status(self) -> None:
        if not self.bus.connected:
            return
        subject = self.subjects.status(self.settings.service, self.settings.instance)
        try:
            await self.nc.publish(subject, encode(self.status()))
            metrics.HEARTBEATS.inc()
        except Exception as exc:  # a missed heartbeat is not worth stopping for
            log.debug("heartbeat not sent: %s", exc)

    async def _beat(self) -> None:
        while not self.stop.is_set():
            await self.publish_status()
            await sleep_unless_stopped(self.stop, self.settings.heartbeat_s)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self.stop.is_set():
            log.info("%s received; stopping", sig.name)
        self.stop.set()

    async def __aenter__(self) -> Runtime:
        self._install_signals()
        await self.server.start()
        await self.bus.connect(self.stop)
        self._heartbeat = asyncio.create_task(self._beat(), name="heartbeat")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop.set()
        self._state, self._reason = "stopping", ""
        if self._heartbeat is not None:
            await self._heartbeat
        await self.publish_status()
        await self.bus.close()
        await self.server.stop()


def service_main(
    settings_cls: type[S],
    run: Callable[[S], Coroutine[object, object, int]],
    argv: list[str] | None = None,
) -> int:
    """What every service's ``__main__`` does: settings (fail fast), logging, run."""
    parser = argparse.ArgumentParser(prog=f"lensbus-{settings_cls.service}")
    parser.add_argument(
        "--config", help=f"YAML/TOML settings file (or {settings_cls.env_prefix()}CONFIG)"
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings(settings_cls, args.config)
    except SettingsError as exc:
        print(f"lensbus-{settings_cls.service}: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings_cls.service)
    limit_malloc_arenas()  # before any thread starts: flat RSS under load (lensbus.memory)
    place(settings.nice, settings.cpu_set)  # before threads start: they inherit it
    try:
        return asyncio.run(run(settings))
    except KeyboardInterrupt:
        return 130
