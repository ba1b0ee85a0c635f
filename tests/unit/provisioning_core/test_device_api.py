"""device_api (served by provisioning-core): what a device's attribute request and its published client
attributes become, with the repository and the bus replaced by recorders (no database, no broker)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from provisioning_common.bus import RpcError, Unavailable
from provisioning_common.contract import ATTRIBUTES_EXCHANGE, DEVICE_API
from provisioning_common.db import repository
from provisioning_common.db.repository import AttributeRow
from provisioning_common.models import AttributesQuery, AttributesSnapshot, ClientAttributesUpdate
from provisioning_core.device_api import DeviceApi

DEVICE = str(uuid.uuid4())


class RecordingBus:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, bytes]] = []

    async def publish_event(self, exchange: str, key: str, body: bytes) -> None:
        self.events.append((exchange, key, body))


class FakeRepository:
    """The attribute functions of provisioning_common.db.repository, over a dict; ``fail`` is raised
    by every call when set (an outage, an unknown device...)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows: dict[tuple[str, str, str], Any] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail: BaseException | None = None
        monkeypatch.setattr(repository, "get_attributes", self.get_attributes)
        monkeypatch.setattr(repository, "save_attributes", self.save_attributes)

    async def get_attributes(self, conn: Any, device_id: uuid.UUID, **scopes: list[str] | None) -> list[AttributeRow]:
        self.calls.append(("get", scopes))
        if self.fail is not None:
            raise self.fail
        return [
            AttributeRow(scope, key, value, 1)
            for (device, scope, key), value in sorted(self.rows.items())
            if device == str(device_id) and scopes.get(scope) is not None
            and (scopes[scope] == [] or key in (scopes[scope] or []))
        ]

    async def save_attributes(self, conn: Any, device_id: uuid.UUID, scope: str, values: dict[str, Any]) -> int:
        self.calls.append(("save", {"scope": scope, "values": values}))
        if self.fail is not None:
            raise self.fail
        for key, value in values.items():
            self.rows[(str(device_id), scope, key)] = value
        return len(values)


@pytest.fixture
def repo(monkeypatch: pytest.MonkeyPatch) -> FakeRepository:
    return FakeRepository(monkeypatch)


def api(bus: RecordingBus | None = None, max_connections: int = 8) -> DeviceApi:
    return DeviceApi(None, bus or RecordingBus(), max_connections=max_connections)  # type: ignore[arg-type]


def test_the_handlers_serve_exactly_the_device_api_contract() -> None:
    assert set(DEVICE_API.entry_points(api().handlers())) == {"get_attributes", "save_client_attributes"}


async def test_client_and_shared_attributes_come_back_by_scope_and_server_ones_never(repo: FakeRepository) -> None:
    repo.rows = {(DEVICE, "client", "fw"): "1.0", (DEVICE, "shared", "interval"): 5,
                 (DEVICE, "server", "provisionState"): "provisioned", (str(uuid.uuid4()), "client", "fw"): "other"}
    snapshot = await api().get_attributes(AttributesQuery(device_id=DEVICE, client_keys=[], shared_keys=[]))
    assert snapshot == AttributesSnapshot(client={"fw": "1.0"}, shared={"interval": 5})
    assert repo.calls == [("get", {"client": [], "shared": []})]  # the server scope is never asked for


async def test_named_keys_and_a_scope_not_asked_for(repo: FakeRepository) -> None:
    repo.rows = {(DEVICE, "client", "a"): 1, (DEVICE, "client", "b"): 2, (DEVICE, "shared", "c"): 3}
    snapshot = await api().get_attributes(AttributesQuery(device_id=DEVICE, client_keys=["b", "missing"]))
    assert snapshot == AttributesSnapshot(client={"b": 2})
    assert repo.calls == [("get", {"client": ["b", "missing"], "shared": None})]


async def test_a_query_naming_no_scope_costs_no_query(repo: FakeRepository) -> None:
    assert await api().get_attributes(AttributesQuery(device_id=DEVICE)) == AttributesSnapshot()
    assert repo.calls == []


async def test_saved_client_attributes_are_announced_keyed_by_device_id(repo: FakeRepository) -> None:
    bus = RecordingBus()
    values = {"firmware": "2.1", "nested": {"a": [1, None, True]}}
    saved = await api(bus).save_client_attributes(ClientAttributesUpdate(device_id=DEVICE.upper(), values=values))
    assert saved.saved == 2
    assert repo.calls == [("save", {"scope": "client", "values": values})]
    [(exchange, key, body)] = bus.events
    assert (exchange, key) == (ATTRIBUTES_EXCHANGE, DEVICE)  # the canonical id, whatever case it came in
    assert json.loads(body) == values


@pytest.mark.parametrize("device_id", ["not-a-uuid", str(uuid.uuid4())], ids=["not-a-uuid", "unknown-uuid"])
async def test_an_unknown_device_is_a_clear_error_and_nothing_is_announced(
    repo: FakeRepository, device_id: str
) -> None:
    repo.fail = repository.UnknownDevice(device_id)
    bus = RecordingBus()
    with pytest.raises(RpcError, match="unknown device") as raised:
        await api(bus).save_client_attributes(ClientAttributesUpdate(device_id=device_id, values={"a": 1}))
    assert type(raised.value) is RpcError
    with pytest.raises(RpcError, match="unknown device"):
        await api(bus).get_attributes(AttributesQuery(device_id=device_id, client_keys=[]))
    assert bus.events == []


async def test_values_postgres_cannot_hold_are_refused_and_not_announced(repo: FakeRepository) -> None:
    repo.fail = repository.InvalidAttributes("attribute keys and values must not contain NUL (\\u0000)")
    bus = RecordingBus()
    with pytest.raises(RpcError, match="NUL"):
        await api(bus).save_client_attributes(ClientAttributesUpdate(device_id=DEVICE, values={"a": "x\x00"}))
    assert bus.events == []


async def test_a_database_outage_answers_unavailable(repo: FakeRepository) -> None:
    repo.fail = ConnectionRefusedError("refused")
    bus = RecordingBus()
    with pytest.raises(Unavailable):
        await api(bus).get_attributes(AttributesQuery(device_id=DEVICE, client_keys=[]))
    with pytest.raises(Unavailable):
        await api(bus).save_client_attributes(ClientAttributesUpdate(device_id=DEVICE, values={"a": 1}))
    assert bus.events == []


async def test_device_traffic_holds_at_most_its_share_of_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    running, most, release = 0, 0, asyncio.Event()

    async def slow_get(conn: Any, device_id: uuid.UUID, **scopes: Any) -> list[AttributeRow]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        return []

    monkeypatch.setattr(repository, "get_attributes", slow_get)
    device_api = api(max_connections=2)
    calls = [asyncio.create_task(device_api.get_attributes(AttributesQuery(device_id=DEVICE, client_keys=[])))
             for _ in range(5)]
    while running < 2:
        await asyncio.sleep(0)
    for _ in range(10):  # the others had every chance to start
        await asyncio.sleep(0)
    assert running == 2
    release.set()
    await asyncio.gather(*calls)
    assert most == 2
