"""The admin API's attribute and RPC routes without Postgres or RabbitMQ: the repository and the bus are
stand-ins, so each outcome of the bus (answer, offline, time-out, broker down) maps to its status."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from admin_api.app import create_app
from admin_api.routers.rpc import rpc_timeout_s
from admin_api.schemas import ScopeIn
from provisioning_common.bus import ConnectionLost, NoRoute, RpcError, RpcTimeout
from provisioning_common.contract import DOWNLINK_ATTRIBUTES, DOWNLINK_EXCHANGE, DOWNLINK_RPC
from provisioning_common.db import repository
from provisioning_common.models import AttributeScope
from provisioning_common.secretbox import generate_key
from provisioning_common.settings import Settings
from pydantic import SecretStr

TOKEN = "unit-test-token"
DEVICE = uuid.uuid4()


class FakeBus:
    """Records what is published; ``outcome`` is raised by the next publish/ask, or ``answer`` returned."""

    def __init__(self) -> None:
        self.published: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []
        self.outcome: Exception | None = None
        self.answer = b'{"ok":true}'

    async def publish(self, exchange: str, key: str, body: bytes, **options: Any) -> None:
        self.published.append((exchange, key, json.loads(body), options))
        if self.outcome is not None:
            raise self.outcome

    async def ask(self, exchange: str, key: str, body: bytes, **options: Any) -> bytes:
        self.published.append((exchange, key, json.loads(body), options))
        if self.outcome is not None:
            raise self.outcome
        return self.answer


@pytest.fixture
def bus() -> FakeBus:
    return FakeBus()


@pytest.fixture
async def client(monkeypatch: pytest.MonkeyPatch, bus: FakeBus) -> AsyncIterator[httpx.AsyncClient]:
    async def device_record(conn: Any, device_id: uuid.UUID) -> object | None:
        return object() if device_id == DEVICE else None

    async def save_attributes(conn: Any, device_id: uuid.UUID, scope: str, values: dict[str, Any]) -> int:
        json.dumps(values, allow_nan=False)
        return len(values)

    async def delete_attributes(conn: Any, device_id: uuid.UUID, scope: str, keys: list[str]) -> list[str]:
        return sorted(keys)

    monkeypatch.setattr(repository, "device_record", device_record)
    monkeypatch.setattr(repository, "save_attributes", save_attributes)
    monkeypatch.setattr(repository, "delete_attributes", delete_attributes)
    settings = Settings(admin_api_token=SecretStr(TOKEN), data_encryption_key=SecretStr(generate_key()),
                        device_rpc_default_timeout_s=10, device_rpc_min_timeout_s=5, device_rpc_max_timeout_s=60)
    app = create_app(settings)
    app.state.pool, app.state.bus = object(), bus  # no lifespan under ASGITransport
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://admin",
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        yield http


def test_both_spellings_of_a_scope_name_the_same_scope() -> None:
    assert {s.value: s.scope for s in ScopeIn} == {
        "client": AttributeScope.CLIENT, "CLIENT_SCOPE": AttributeScope.CLIENT,
        "shared": AttributeScope.SHARED, "SHARED_SCOPE": AttributeScope.SHARED,
        "server": AttributeScope.SERVER, "SERVER_SCOPE": AttributeScope.SERVER,
    }


@pytest.mark.parametrize(("timeout_ms", "seconds"), [(None, 10), (1, 5), (7_500, 7.5), (3_600_000, 60)])
def test_the_rpc_timeout_is_in_ms_with_thingsboards_floor_and_our_cap(timeout_ms: int | None, seconds: float) -> None:
    settings = Settings(device_rpc_default_timeout_s=10, device_rpc_min_timeout_s=5, device_rpc_max_timeout_s=60)
    assert rpc_timeout_s(settings, timeout_ms) == seconds


async def test_two_way_rpc_asks_the_downlink_exchange_and_answers_with_the_devices_json(
    client: httpx.AsyncClient, bus: FakeBus
) -> None:
    response = await client.post(f"/api/rpc/twoway/{DEVICE}", json={"method": "m", "params": {"a": 1},
                                                                    "timeout": 20_000, "retries": 3})
    assert response.status_code == 200 and response.json() == {"ok": True}
    assert response.headers["content-type"] == "application/json"
    [(exchange, key, body, options)] = bus.published
    assert (exchange, key, body) == (DOWNLINK_EXCHANGE, str(DEVICE), {"method": "m", "params": {"a": 1}})
    assert options == {"timeout": 20.0, "type": DOWNLINK_RPC}


async def test_an_answer_that_is_not_json_comes_back_as_a_json_string(client: httpx.AsyncClient, bus: FakeBus) -> None:
    bus.answer = b"plain \xff text"
    response = await client.post(f"/api/devices/{DEVICE}/rpc", json={"method": "m"})
    assert response.status_code == 200 and response.json() == "plain \ufffd text"


@pytest.mark.parametrize(("outcome", "status"), [
    (NoRoute("unroutable"), 409), (RpcTimeout("late"), 504), (ConnectionLost("gone"), 503), (RpcError("down"), 503),
])
@pytest.mark.parametrize("oneway", [False, True])
async def test_each_bus_outcome_has_its_status(
    client: httpx.AsyncClient, bus: FakeBus, outcome: Exception, status: int, oneway: bool
) -> None:
    bus.outcome = outcome
    response = await client.post(f"/api/devices/{DEVICE}/rpc", json={"method": "m", "oneway": oneway})
    assert response.status_code == status and response.json()["status"] == status


async def test_one_way_rpc_is_mandatory_and_expires_with_its_timeout(client: httpx.AsyncClient, bus: FakeBus) -> None:
    response = await client.post(f"/api/rpc/oneway/{DEVICE}", json={"method": "m"})
    assert response.status_code == 200 and response.json() == {}
    [(_, _, body, options)] = bus.published
    assert body == {"method": "m", "params": None}
    assert options["mandatory"] is True and options["type"] == DOWNLINK_RPC and options["expiration"] == 10
    assert "x-deadline" in options["headers"]


async def test_shared_changes_are_pushed_and_a_push_the_broker_refuses_still_saves(
    client: httpx.AsyncClient, bus: FakeBus
) -> None:
    assert (await client.post(f"/api/devices/{DEVICE}/attributes/server", json={"a": 1})).status_code == 200
    assert bus.published == []  # server attributes never reach the device
    assert (await client.post(f"/api/devices/{DEVICE}/attributes/shared", json={"a": 1})).json() == {"saved": 1}
    deleted = await client.delete(f"/api/devices/{DEVICE}/attributes/SHARED_SCOPE", params={"keys": "b,a,a"})
    assert deleted.json() == {"deleted": 2}
    assert [(e, k, b, o["type"]) for e, k, b, o in bus.published] == [
        (DOWNLINK_EXCHANGE, str(DEVICE), {"a": 1}, DOWNLINK_ATTRIBUTES),
        (DOWNLINK_EXCHANGE, str(DEVICE), {"deleted": ["a", "b"]}, DOWNLINK_ATTRIBUTES),
    ]
    assert all(not o.get("mandatory") for *_, o in bus.published)  # an offline device reads them later
    bus.outcome = RpcError("bus unavailable")
    assert (await client.post(f"/api/devices/{DEVICE}/attributes/shared", json={"a": 2})).json() == {"saved": 1}


async def test_values_json_cannot_carry_are_400(client: httpx.AsyncClient) -> None:
    response = await client.post(f"/api/devices/{DEVICE}/attributes/shared", content=b'{"a": Infinity}',
                                 headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["status"] == 400
