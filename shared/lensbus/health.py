"""The HTTP port every service serves: ``/metrics`` (Prometheus) and ``/healthz``."""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

log = logging.getLogger(__name__)


class Health:
    """Named checks; the service is healthy when none reports a problem."""

    def __init__(self) -> None:
        self._problems: dict[str, str] = {}

    def set(self, check: str, problem: str | None) -> None:
        """Record ``problem`` for ``check``, or clear it with ``None``."""
        if problem is None:
            self._problems.pop(check, None)
        else:
            self._problems[check] = problem

    @property
    def ok(self) -> bool:
        return not self._problems

    @property
    def problems(self) -> dict[str, str]:
        return dict(self._problems)

    @property
    def reason(self) -> str:
        return "; ".join(f"{k}: {v}" for k, v in sorted(self._problems.items()))


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_health_routes(app: web.Application, health: Health) -> None:
    """Add ``/metrics`` and ``/healthz`` to an aiohttp app (the publisher reuses this)."""

    async def healthz(request: web.Request) -> web.Response:
        if health.ok:
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "unhealthy", "problems": health.problems}, status=503)

    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", healthz)


class HealthServer:
    """A small aiohttp server with only ``/metrics`` and ``/healthz``."""

    def __init__(self, health: Health, host: str, port: int) -> None:
        self.app = web.Application()
        add_health_routes(self.app, health)
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        if self.port == 0:
            # Port 0 let the system pick a free port: report the one it bound.
            addresses = self._runner.addresses
            if addresses:
                self.port = addresses[0][1]
        log.info("metrics and health on http://%s:%d/metrics and /healthz", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
