"""The HTTP port every service serves: /healthz and /metrics, on a free port when asked for 0."""

from __future__ import annotations

import aiohttp

from lensbus.health import Health, HealthServer


async def test_port_0_serves_health_and_metrics_on_the_port_it_reports() -> None:
    health = Health()
    server = HealthServer(health, "127.0.0.1", 0)
    port = await server.start()
    try:
        assert port > 0 and server.port == port
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/healthz") as resp:
                assert resp.status == 200 and await resp.json() == {"status": "ok"}
            health.set("nats", "not connected")
            async with http.get(f"{base}/healthz") as resp:
                body = await resp.json()
                assert resp.status == 503
                assert body == {"status": "unhealthy", "problems": {"nats": "not connected"}}
            async with http.get(f"{base}/metrics") as resp:
                assert resp.status == 200 and "# HELP" in await resp.text()
    finally:
        await server.stop()
