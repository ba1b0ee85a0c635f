"""GET /metrics beside /health on both doors of provisioning_common.health, the Postgres pool's gauges read
when scraped, the core's decisions counted, and outcome labels bounded."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from provisioning_common import health, metrics
from provisioning_common.contract import Service
from provisioning_common.models import ProvisionResult, ProvisionStatus
from pydantic import BaseModel
from starlette.applications import Starlette


def families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


async def test_the_health_listener_serves_metrics() -> None:
    metrics.set_service("unit_service")
    server = await health.start_health_server("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: prometheus\r\nAccept: text/plain\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Content-Type: text/plain; version=" in head
    assert f"Content-Length: {len(body)}".encode() in head
    found = families(body.decode())
    # Process metrics of prometheus-client, and ours (declared once, with no sample yet for some).
    assert "process_cpu_seconds" in found
    info = found["provisioning_service_info"]
    assert any(s.labels == {"service": "unit_service"} and s.value == 1 for s in info.samples)
    assert {"provisioning_provisions", "provisioning_rpc_client_calls"} <= set(found)


async def test_an_app_serves_metrics_beside_its_probes() -> None:
    app = Starlette()
    health.mount(app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
        response = await client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert "provisioning_bus_reconnects_total" in response.text
        assert (await client.head("/metrics")).status_code == 200
        assert (await client.post("/metrics")).status_code == 405
        assert (await client.get("/health")).status_code == 200


class FakePool:
    __slots__ = ("size", "idle", "max_size", "closing")  # as asyncpg's Pool: no weak references

    def __init__(self, size: int, idle: int, max_size: int) -> None:
        self.size, self.idle, self.max_size, self.closing = size, idle, max_size, False

    def get_size(self) -> int:
        return self.size

    def get_idle_size(self) -> int:
        return self.idle

    def get_max_size(self) -> int:
        return self.max_size

    def is_closing(self) -> bool:
        return self.closing


def test_pool_gauges_are_read_when_scraped() -> None:
    pool = FakePool(size=4, idle=1, max_size=10)
    metrics.watch_pool(pool)
    sample = metrics.REGISTRY.get_sample_value
    assert (sample("provisioning_db_pool_connections"), sample("provisioning_db_pool_in_use"),
            sample("provisioning_db_pool_max")) == (4, 3, 10)
    pool.idle = 4
    assert sample("provisioning_db_pool_in_use") == 0
    pool.closing = True
    assert sample("provisioning_db_pool_connections") is None


@pytest.mark.parametrize(("result", "label"), [
    (ProvisionResult(status=ProvisionStatus.SUCCESS), "success"),
    (ProvisionResult.not_found(), "not_found"),
    (ProvisionResult.failure(), "failure"),
    (ProvisionResult(status=ProvisionStatus.FAILURE, retry_after_s=3.0), "rate_limited"),
    (ProvisionResult(status=ProvisionStatus.NOT_FOUND, retry_after_s=3.0), "rate_limited"),
])
def test_outcome_labels(result: ProvisionResult, label: str) -> None:
    assert metrics.provision_outcome(result) == label
    assert label in metrics.PROVISION_OUTCOMES


class Ask(BaseModel):
    name: str


UNIT_CORE = Service("unit_decisions")
DECIDE = UNIT_CORE.rpc("provision", Ask, ProvisionResult)
FORGET = UNIT_CORE.one_way("abandon", Ask)


async def test_the_core_counts_its_decisions() -> None:
    async def decide(request: Ask) -> ProvisionResult:
        return ProvisionResult.not_found() if request.name == "unknown" else ProvisionResult.failure()

    async def forget(request: Ask) -> None:
        return None

    handlers = metrics.count_decisions([DECIDE.handler(decide), FORGET.handler(forget)])
    UNIT_CORE.entry_points(handlers)  # still the contract's methods, one each

    def count(outcome: str) -> float:
        return metrics.REGISTRY.get_sample_value(
            "provisioning_core_decisions_total", {"method": "provision", "outcome": outcome}) or 0.0

    before = count("not_found"), count("failure")
    assert await handlers[0].func(Ask(name="unknown")) == ProvisionResult.not_found()
    await handlers[0].func(Ask(name="taken"))
    await handlers[0].func(Ask(name="taken"))
    assert (count("not_found"), count("failure")) == (before[0] + 1, before[1] + 2)
    assert handlers[1].func is forget  # one-way methods are left alone


def test_metric_names_are_listed_once() -> None:
    """metrics.NAMES (what deploy/monitoring may use) is exactly what the module defines."""
    defined = set()
    for value in vars(metrics).values():
        name = getattr(value, "_name", None)
        if isinstance(name, str) and name.startswith("provisioning_"):
            kind = getattr(value, "_type", "")
            defined.add(f"{name}_total" if kind == "counter" else name)
    defined |= {"provisioning_db_pool_connections", "provisioning_db_pool_in_use", "provisioning_db_pool_max"}
    assert defined == metrics.NAMES
