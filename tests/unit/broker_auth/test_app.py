"""broker_auth's probes: /live answers while the event loop does, /health only with the bus connected."""

from __future__ import annotations

import httpx

from broker_auth.app import create_app
from provisioning_common.settings import Settings


async def test_live_needs_nothing_but_health_needs_the_bus() -> None:
    # ASGITransport does not run the lifespan: no bus connection, as while RabbitMQ is unreachable.
    transport = httpx.ASGITransport(app=create_app(Settings()))
    async with httpx.AsyncClient(transport=transport, base_url="http://broker-auth") as client:
        live = await client.get("/live")
        assert (live.status_code, live.json()) == (200, {"status": "UP"})
        health = await client.get("/health")
        assert (health.status_code, health.json()) == (503, {"status": "DOWN"})
