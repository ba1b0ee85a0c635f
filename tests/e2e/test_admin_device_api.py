"""Device attributes and server-side RPC, end to end: provisioning-core's device_api queue (what the gateways
call) and the admin API's attribute and RPC endpoints, on the real RabbitMQ and Postgres.

A device "online" here is a DeviceLinks attachment in this test process: exactly what a gateway does for
a session (bind its downlink queue by device id), so the admin API's RPC and attribute updates reach it
the way they reach a real gateway, without depending on one.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
from devstack import Stack
from provisioning_common.bus import Bus, RpcError
from provisioning_common.contract import (
    ATTRIBUTES_EXCHANGE,
    DOWNLINK_ATTRIBUTES,
    DOWNLINK_RPC,
    GET_ATTRIBUTES,
    SAVE_CLIENT_ATTRIBUTES,
)
from provisioning_common.device_link import DeviceLinks, Downlink
from provisioning_common.models import AttributesQuery, AttributesSnapshot, ClientAttributesUpdate
from provisioning_common.settings import Settings

from .conftest import Admin, Env, tb_request

SERVICES = ["credentials", "provisioning_core", "admin_api", "http_gateway"]
#: DEVICE_RPC_MAX_TIMEOUT_S of this module: a longer timeout asked for is cut to this (and a 504 comes soon).
RPC_MAX_TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def stack(env: Env) -> Iterator[Stack]:
    """What the device API needs without a device gateway: the core (device_api), credentials, the admin
    API, and the HTTP gateway to provision devices with."""
    variables = env.variables(DEVICE_RPC_MAX_TIMEOUT_S=str(RPC_MAX_TIMEOUT_S), DEVICE_RPC_MIN_TIMEOUT_S="0.3")
    running = Stack(variables, SERVICES).start(timeout=60)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
async def bus(env: Env, stack: Stack) -> AsyncIterator[Bus]:
    """A gateway's view of the bus: the module's namespace, its own connection."""
    settings = Settings(rabbitmq_url=env.infra.rabbitmq_url, bus_namespace=env.namespace)
    connected = await Bus.connect(settings, "e2e-gateway")
    yield connected
    await connected.close()


def provision(http: httpx.Client, admin: Admin, profile: dict[str, Any], name: str | None = None) -> str:
    """Provision a device over HTTP as a device would; returns its id."""
    name = name or f"dev-{uuid.uuid4().hex[:10]}"
    answer = http.post("/api/v1/provision", json=tb_request(profile, deviceName=name)).json()
    assert answer["status"] == "SUCCESS", answer
    return device_id(admin, name)


def device_id(admin: Admin, name: str) -> str:
    [device] = admin.http.get("/api/devices", params={"textSearch": name}).json()["data"]
    return str(device["id"])


async def server_attributes(db: asyncpg.Connection, device: str) -> dict[str, Any]:
    rows = await db.fetch("SELECT key, value::text FROM device_attributes WHERE device_id = $1 AND scope = 'server'",
                          uuid.UUID(device))
    return {row["key"]: json.loads(row["value"]) for row in rows}


# --- provisionState and the device_api queue (what the gateways call) -------------------------------------


async def test_a_device_that_provisions_itself_has_server_attribute_provision_state(
    http: httpx.Client, admin: Admin, profile: dict[str, Any], db: asyncpg.Connection
) -> None:
    created = provision(http, admin, profile)
    assert await server_attributes(db, created) == {"provisionState": "provisioned"}


async def test_a_pre_provisioned_device_gets_provision_state_when_it_claims_its_credentials(
    http: httpx.Client, admin: Admin, db: asyncpg.Connection
) -> None:
    profile = admin.create_profile("CHECK_PRE_PROVISIONED_DEVICES")
    device = admin.create_device(profile["id"])
    assert await server_attributes(db, device["id"]) == {}
    answer = http.post("/api/v1/provision", json=tb_request(profile, deviceName=device["name"])).json()
    assert answer["status"] == "SUCCESS"
    assert await server_attributes(db, device["id"]) == {"provisionState": "provisioned"}


async def test_client_attributes_are_stored_announced_and_read_back_through_the_bus(
    http: httpx.Client, admin: Admin, profile: dict[str, Any], bus: Bus, env: Env
) -> None:
    device = provision(http, admin, profile)
    other = provision(http, admin, profile)
    connection = await aio_pika.connect(env.infra.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(f"{env.namespace}{ATTRIBUTES_EXCHANGE}", "topic", durable=True)
        announced = await channel.declare_queue(exclusive=True)
        await announced.bind(exchange, routing_key=device)

        values = {"firmware": "2.1", "config": {"interval": 5, "tags": ["a", None]}, "ok": True}
        saved = await bus.call(SAVE_CLIENT_ATTRIBUTES, ClientAttributesUpdate(device_id=device, values=values))
        assert saved.saved == 3
        await bus.call(SAVE_CLIENT_ATTRIBUTES, ClientAttributesUpdate(device_id=other, values={"firmware": "9"}))
        message = await announced.get(timeout=5)
        assert message is not None and message.routing_key == device and json.loads(message.body) == values
        await message.ack()

        snapshot = await bus.call(GET_ATTRIBUTES, AttributesQuery(device_id=device, client_keys=[], shared_keys=[]))
        assert snapshot == AttributesSnapshot(client=values)  # provisionState is a server attribute: never shown
        only = await bus.call(GET_ATTRIBUTES, AttributesQuery(device_id=device, client_keys=["ok", "missing"]))
        assert only == AttributesSnapshot(client={"ok": True})
        # A later value replaces the earlier one.
        await bus.call(SAVE_CLIENT_ATTRIBUTES, ClientAttributesUpdate(device_id=device, values={"ok": False}))
        again = await bus.call(GET_ATTRIBUTES, AttributesQuery(device_id=device, client_keys=["ok"]))
        assert again == AttributesSnapshot(client={"ok": False})
        # The other device's attributes were announced under its own id only.
        next_one = await announced.get(timeout=5)
        assert next_one is not None and json.loads(next_one.body) == {"ok": False}


@pytest.mark.parametrize("unknown", ["not-a-device", "00000000-0000-0000-0000-000000000000"])
async def test_an_unknown_device_gets_a_clear_error_from_the_device_api(bus: Bus, unknown: str) -> None:
    with pytest.raises(RpcError, match="unknown device"):
        await bus.call(GET_ATTRIBUTES, AttributesQuery(device_id=unknown, client_keys=[]))
    with pytest.raises(RpcError, match="unknown device"):
        await bus.call(SAVE_CLIENT_ATTRIBUTES, ClientAttributesUpdate(device_id=unknown, values={"a": 1}))


async def test_values_postgres_cannot_hold_are_refused_and_nothing_is_stored(
    http: httpx.Client, admin: Admin, profile: dict[str, Any], bus: Bus
) -> None:
    device = provision(http, admin, profile)
    with pytest.raises(RpcError, match="NUL"):
        await bus.call(SAVE_CLIENT_ATTRIBUTES, ClientAttributesUpdate(device_id=device, values={"a": "x\x00",
                                                                                                  "b": 1}))
    snapshot = await bus.call(GET_ATTRIBUTES, AttributesQuery(device_id=device, client_keys=[]))
    assert snapshot == AttributesSnapshot()


# --- the admin API: attributes ------------------------------------------------------------------------------


@pytest.fixture
async def api(env: Env, stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """The admin API, asynchronously: a device attached in this loop must keep running while a call waits."""
    async with httpx.AsyncClient(base_url=env.admin_url, headers={"Authorization": f"Bearer {env.admin_token}"},
                                 timeout=10) as client:
        yield client


@pytest.fixture
async def links(bus: Bus) -> DeviceLinks:
    """This process as a gateway: attach a device and it is online, its downlink reaching the sink given."""
    return DeviceLinks(bus, "e2e-gateway")


class Session:
    """A device's session as a gateway holds it: the downlink messages it received, in order."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[Downlink] = asyncio.Queue()

    def sink(self, message: Downlink) -> None:
        self.received.put_nowait(message)

    async def next(self) -> Downlink:
        return await asyncio.wait_for(self.received.get(), 10)


def attributes_path(device: str, scope: str) -> str:
    return f"/api/devices/{device}/attributes/{scope}"


async def test_provision_state_reads_back_as_a_server_attribute(
    http: httpx.Client, admin: Admin, profile: dict[str, Any], api: httpx.AsyncClient
) -> None:
    device = provision(http, admin, profile)
    [state] = (await api.get(attributes_path(device, "server"))).json()
    assert state["key"] == "provisionState" and state["value"] == "provisioned"
    assert isinstance(state["lastUpdateTs"], int) and state["lastUpdateTs"] > 1_600_000_000_000  # ms
    assert (await api.get(attributes_path(device, "SERVER_SCOPE"), params={"keys": "provisionState"})).json() == [state]


async def test_set_get_and_delete_attributes_with_both_scope_spellings(
    http: httpx.Client, admin: Admin, profile: dict[str, Any], api: httpx.AsyncClient
) -> None:
    device = provision(http, admin, profile)
    values = {"interval": 30, "config": {"mode": "eco", "levels": [1, 2.5, None]}, "label": "north", "on": False}
    saved = await api.post(attributes_path(device, "shared"), json=values)
    assert saved.status_code == 200 and saved.json() == {"saved": 4}
    assert (await api.post(attributes_path(device, "SERVER_SCOPE"), json={"owner": "ops"})).json() == {"saved": 1}

    shared = (await api.get(attributes_path(device, "SHARED_SCOPE"))).json()
    assert {row["key"]: row["value"] for row in shared} == values
    assert [row["key"] for row in shared] == sorted(values)
    some = (await api.get(attributes_path(device, "shared"), params={"keys": "label, interval,missing"})).json()
    assert {row["key"]: row["value"] for row in some} == {"label": "north", "interval": 30}
    server = (await api.get(attributes_path(device, "server"))).json()
    assert {row["key"]: row["value"] for row in server} == {"owner": "ops", "provisionState": "provisioned"}
    assert (await api.get(attributes_path(device, "client"))).json() == []

    await api.post(attributes_path(device, "shared"), json={"interval": 60})  # replaced, others kept
    deleted = await api.delete(attributes_path(device, "shared"), params={"keys": "label,on,missing"})
    assert deleted.status_code == 200 and deleted.json() == {"deleted": 2}
    shared = (await api.get(attributes_path(device, "shared"))).json()
    assert {row["key"]: row["value"] for row in shared} == {"interval": 60, "config": values["config"]}


async def test_client_attributes_are_the_devices_own_and_read_back_for_the_operator(
    http: httpx.Client, admin: Admin, profile: dict[str, Any], api: httpx.AsyncClient, bus: Bus
) -> None:
    device = provision(http, admin, profile)
    await bus.call(SAVE_CLIENT_ATTRIBUTES, ClientAttributesUpdate(device_id=device, values={"fw": "1.2"}))
    [row] = (await api.get(attributes_path(device, "CLIENT_SCOPE"))).json()
    assert (row["key"], row["value"]) == ("fw", "1.2")
    refused = await api.post(attributes_path(device, "client"), json={"fw": "2"})
    assert refused.status_code == 400 and "device" in refused.json()["message"]
    assert (await api.delete(attributes_path(device, "client"), params={"keys": "fw"})).json() == {"deleted": 1}


async def test_bad_attribute_calls_get_400_or_404_in_the_admin_shape(
    http: httpx.Client, admin: Admin, profile: dict[str, Any], api: httpx.AsyncClient
) -> None:
    device = provision(http, admin, profile)
    path = attributes_path(device, "shared")
    for body in ([1, 2], "text", {}, {"": 1}, {"k" * 256: 1}, {"a\x01b": 1}, {"nul": "a\x00b"}):
        response = await api.post(path, json=body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["status"] == 400 and response.json()["message"]
    not_json = await api.post(path, content=b"{nope", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400
    for raw in (b'{"a": NaN}', b'{"a": "\\ud800x"}', b'{"\\udc00": 1}'):  # no JSON number; unpaired surrogates
        response = await api.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (raw, response.text)
    for scope in ("everything", "Shared", "SHARED"):
        response = await api.get(attributes_path(device, scope))
        assert response.status_code == 400 and "scope" in response.json()["message"], scope
    assert (await api.delete(path)).status_code == 400  # which keys?
    assert (await api.get(path, params={"keys": "k" * 256})).status_code == 400
    assert (await api.get(attributes_path("not-a-uuid", "shared"))).status_code == 400
    unknown = str(uuid.uuid4())
    for response in (await api.get(attributes_path(unknown, "shared")),
                     await api.post(attributes_path(unknown, "shared"), json={"a": 1}),
                     await api.delete(attributes_path(unknown, "shared"), params={"keys": "a"})):
        assert response.status_code == 404 and response.json() == {"status": 404,
                                                                    "message": f"Device {unknown} not found"}
    assert (await api.get(path)).json() == []  # nothing of the refused bodies was stored


async def test_shared_attribute_changes_reach_the_device_session_and_server_ones_never(
    http: httpx.Client, admin: Admin, profile: dict[str, Any], api: httpx.AsyncClient, links: DeviceLinks
) -> None:
    device, other = provision(http, admin, profile), provision(http, admin, profile)
    session, other_session = Session(), Session()
    await links.attach(device, session.sink)
    await links.attach(other, other_session.sink)
    await api.post(attributes_path(device, "server"), json={"secret": "not for the device"})
    await api.post(attributes_path(device, "shared"), json={"interval": 15, "mode": {"eco": True}})
    update = await session.next()  # the first thing it gets: the server attribute was never pushed
    assert update.kind == DOWNLINK_ATTRIBUTES and update.body == {"interval": 15, "mode": {"eco": True}}
    await api.delete(attributes_path(device, "shared"), params={"keys": "mode,missing"})
    deleted = await session.next()
    assert deleted.kind == DOWNLINK_ATTRIBUTES and deleted.body == {"deleted": ["mode"]}
    await api.post(attributes_path(other, "shared"), json={"mine": 1})
    assert (await other_session.next()).body == {"mine": 1}
    assert session.received.empty()


async def test_shared_attributes_set_while_the_device_is_offline_wait_in_postgres(
    http: httpx.Client, admin: Admin, profile: dict[str, Any], api: httpx.AsyncClient, bus: Bus
) -> None:
    device = provision(http, admin, profile)
    saved = await api.post(attributes_path(device, "shared"), json={"target": 21.5})
    assert saved.status_code == 200
    snapshot = await bus.call(GET_ATTRIBUTES, AttributesQuery(device_id=device, shared_keys=["target"]))
    assert snapshot == AttributesSnapshot(shared={"target": 21.5})


# --- the admin API: server-side RPC -------------------------------------------------------------------------


def answering(links: DeviceLinks, session: Session, answer: Callable[[Downlink], Any]) -> asyncio.Task[None]:
    """A device that answers each two-way RPC of its session with ``answer(request)`` (as JSON)."""

    async def run() -> None:
        while True:
            request = await session.received.get()
            await links.answer(request, json.dumps(answer(request)).encode())

    return asyncio.create_task(run())


async def test_two_way_rpc_returns_the_devices_answer(
    http: httpx.Client, admin: Admin, profile: dict[str, Any], api: httpx.AsyncClient, links: DeviceLinks
) -> None:
    device = provision(http, admin, profile)
    session = Session()
    await links.attach(device, session.sink)
    seen: list[Downlink] = []
    device_task = answering(links, session, lambda r: seen.append(r) or {"echo": r.body["params"], "ok": True})
    try:
        response = await api.post(f"/api/devices/{device}/rpc", json={"method": "setGpio", "params": {"pin": 4}})
        assert response.status_code == 200 and response.headers["content-type"] == "application/json"
        assert response.json() == {"echo": {"pin": 4}, "ok": True}
        [request] = seen
        assert request.kind == DOWNLINK_RPC and request.two_way
        assert request.body == {"method": "setGpio", "params": {"pin": 4}}
        # ThingsBoard's path, and a timeout above DEVICE_RPC_MAX_TIMEOUT_S is cut to it.
        alias = await api.post(f"/api/rpc/twoway/{device}", json={"method": "getTemp", "params": None,
                                                                   "timeout": 600_000, "persistent": False})
        assert alias.status_code == 200 and alias.json() == {"echo": None, "ok": True}
        assert 0 < seen[1].seconds_left(99) <= RPC_MAX_TIMEOUT_S
    finally:
        device_task.cancel()


async def test_an_unanswered_rpc_is_504_and_a_device_without_session_409(
    http: httpx.Client, admin: Admin, profile: dict[str, Any], api: httpx.AsyncClient, links: DeviceLinks
) -> None:
    device = provision(http, admin, profile)
    offline = await api.post(f"/api/devices/{device}/rpc", json={"method": "reboot"})
    assert offline.status_code == 409 and offline.json() == {"status": 409, "message": "device is offline"}
    offline_oneway = await api.post(f"/api/rpc/oneway/{device}", json={"method": "reboot"})
    assert offline_oneway.status_code == 409

    session = Session()
    await links.attach(device, session.sink)  # online, but it never answers
    # 1 ms is raised to DEVICE_RPC_MIN_TIMEOUT_S (0.3 s in this module), as ThingsBoard raises it to its min_timeout.
    silent = await api.post(f"/api/devices/{device}/rpc", json={"method": "reboot", "timeout": 1})
    assert silent.status_code == 504 and silent.json()["status"] == 504
    request = await session.next()
    assert request.body["method"] == "reboot" and request.expired()


async def test_one_way_rpc_is_handed_to_the_session(
    http: httpx.Client, admin: Admin, profile: dict[str, Any], api: httpx.AsyncClient, links: DeviceLinks
) -> None:
    device = provision(http, admin, profile)
    session = Session()
    await links.attach(device, session.sink)
    for path, body in ((f"/api/devices/{device}/rpc", {"method": "blink", "params": [1, 2], "oneway": True}),
                       (f"/api/rpc/oneway/{device}", {"method": "blink", "params": [3]})):
        response = await api.post(path, json=body)
        assert response.status_code == 200 and response.json() == {}
        request = await session.next()
        assert request.kind == DOWNLINK_RPC and not request.two_way
        assert request.body == {"method": "blink", "params": body["params"]}


async def test_bad_rpc_calls_get_400_or_404(
    http: httpx.Client, admin: Admin, profile: dict[str, Any], api: httpx.AsyncClient
) -> None:
    device = provision(http, admin, profile)
    for body in ({}, {"method": ""}, {"method": "m" * 256}, {"method": 5}, {"method": "a\x00"}, [],
                 {"method": "x", "timeout": 0}, {"method": "x", "timeout": "soon"}, {"method": "x", "oneway": "yes"}):
        response = await api.post(f"/api/devices/{device}/rpc", json=body)
        assert response.status_code == 400 and response.json()["status"] == 400, (body, response.text)
    unknown = str(uuid.uuid4())
    for path in (f"/api/devices/{unknown}/rpc", f"/api/rpc/twoway/{unknown}", f"/api/rpc/oneway/{unknown}"):
        response = await api.post(path, json={"method": "reboot"})
        assert response.status_code == 404, path
    assert (await api.post("/api/rpc/twoway/not-a-uuid", json={"method": "x"})).status_code == 400


def test_zz_no_traceback_in_the_services_output(stack: Stack) -> None:
    logs = stack.output()
    assert "Traceback" not in logs, logs[-4000:]
