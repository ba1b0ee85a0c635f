"""Device attributes and server-side RPC, end to end: provisioning-core's device_api queue (what the gateways
call) and the admin API's attribute and RPC endpoints, on the real RabbitMQ and Postgres.

A device "online" here is a DeviceLinks attachment in this test process: exactly what a gateway does for
a session (bind its downlink queue by device id), so the admin API's RPC and attribute updates reach it
the way they reach a real gateway, without depending on one.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
from devstack import Stack
from provisioning_common.bus import Bus, RpcError
from provisioning_common.contract import ATTRIBUTES_EXCHANGE, GET_ATTRIBUTES, SAVE_CLIENT_ATTRIBUTES
from provisioning_common.models import AttributesQuery, AttributesSnapshot, ClientAttributesUpdate
from provisioning_common.settings import Settings

from .conftest import Admin, Env, tb_request

SERVICES = ["credentials", "provisioning_core", "admin_api", "http_gateway"]


@pytest.fixture(scope="module")
def stack(env: Env) -> Iterator[Stack]:
    """What the device API needs without a device gateway: the core (device_api), credentials, the admin
    API, and the HTTP gateway to provision devices with."""
    running = Stack(env.variables(), SERVICES).start(timeout=60)
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


def test_zz_no_traceback_in_the_services_output(stack: Stack) -> None:
    logs = stack.output()
    assert "Traceback" not in logs, logs[-4000:]
