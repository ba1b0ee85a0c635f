"""provisioning-core over the bus: redelivery, time-outs, and migrations under concurrency."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import httpx
import pytest
from devstack import Stack
from provisioning_common.bus import Bus
from provisioning_common.contract import PROVISION
from provisioning_common.db.migrate import apply_migrations, migrations
from provisioning_common.models import ProvisionRequest, Transport
from provisioning_common.settings import Settings

from .conftest import Admin, Env, _create_database, _drop_database, drop_core_queue


@pytest.fixture
async def bus(env: Env, stack: Stack):
    connected = await Bus.connect(Settings(rabbitmq_url=env.infra.rabbitmq_url, bus_namespace=env.namespace,
                                           provision_timeout_s=5), "e2e-tests")
    yield connected
    await connected.close()


def _request(profile: dict, **fields) -> ProvisionRequest:
    return ProvisionRequest(
        provision_key=profile["provisionDeviceKey"],
        provision_secret=profile["provisionDeviceSecret"],
        transport=Transport.HTTP,
        **fields,
    )


async def test_redelivered_request_returns_the_first_answer(
    bus: Bus, profile: dict, db: asyncpg.Connection
) -> None:
    request = _request(profile, device_name=f"redeliver-{uuid.uuid4().hex[:6]}")
    first = await bus.call(PROVISION, request, message_id=request.request_id)
    second = await bus.call(PROVISION, request, message_id=request.request_id)
    assert first.status.value == "SUCCESS"
    assert second == first  # same token, same device, not FAILURE for an existing name
    assert await db.fetchval("SELECT count(*) FROM devices WHERE name = $1", request.device_name) == 1


async def test_concurrent_duplicates_of_one_request_create_one_device(
    bus: Bus, profile: dict, db: asyncpg.Connection
) -> None:
    request = _request(profile)  # no name: every *new* request would create a new device
    results = await asyncio.gather(
        *(bus.call(PROVISION, request) for _ in range(8))
    )
    assert {r.status.value for r in results} == {"SUCCESS"}
    assert len({r.credentials_value for r in results}) == 1
    assert await db.fetchval(
        "SELECT count(*) FROM devices WHERE profile_id = $1", uuid.UUID(profile["id"])
    ) == 1


async def test_invalid_bus_message_gets_an_error_reply_not_a_hang(bus: Bus) -> None:
    from provisioning_common.bus import RpcError
    from provisioning_common.models import AuthenticateRequest

    started = time.monotonic()
    with pytest.raises(RpcError, match="invalid provision request"):
        # A body the contract's request model refuses (mypy would too: it is not a ProvisionRequest).
        await bus.call(PROVISION, AuthenticateRequest(token="x"))  # type: ignore[arg-type]
    assert time.monotonic() - started < 4


def test_gateway_without_core_answers_503_within_the_timeout(env: Env, stack: Stack) -> None:
    """A gateway in a namespace where no core listens: FAILURE + 503 + Retry-After, never a hang
    (it waits the deadline plus BUS_REPLY_GRACE_S, then answers)."""
    lonely = Env(env.infra, database=env.database, namespace=f"e2e-nocore-{uuid.uuid4().hex[:6]}.")
    gateway = Stack(lonely.variables(PROVISION_TIMEOUT_S="1", BUS_REPLY_GRACE_S="0.5"), ["http_gateway"]).start()
    try:
        started = time.monotonic()
        tb = httpx.post(f"{lonely.http_url}/api/v1/provision",
                        json={"provisionDeviceKey": "k", "provisionDeviceSecret": "s"}, timeout=10)
        elapsed = time.monotonic() - started
        assert tb.status_code == 503 and tb.headers["retry-after"] == "1"
        assert tb.content == b'{"errorMsg":"Provisioning timed out","status":"FAILURE"}'
        assert 1.5 <= elapsed < 3
        inno = httpx.post(f"{lonely.http_url}/api/provision",
                          json={"provision_key": "k", "provision_secret": "s"}, timeout=10)
        assert inno.status_code == 503
        assert inno.content == b'{"status":"FAILURE","error_msg":"Provisioning timed out"}'
    finally:
        gateway.stop()
        asyncio.run(drop_core_queue(env.infra.rabbitmq_url, lonely.namespace))


def test_expired_request_is_not_processed_after_the_caller_gave_up(
    env: Env, stack: Stack, admin: Admin
) -> None:
    """Requests wait in the queue while the core is down; once their TTL passed they must not create devices."""
    profile = admin.create_profile()
    name = f"expired-{uuid.uuid4().hex[:6]}"
    core = stack["provisioning_core"]
    core.stop()
    try:
        response = httpx.post(
            f"{env.http_url}/api/v1/provision",
            json={"provisionDeviceKey": profile["provisionDeviceKey"],
                  "provisionDeviceSecret": profile["provisionDeviceSecret"], "deviceName": name},
            timeout=15,
        )
        assert response.status_code == 503
    finally:
        mark = len(core.lines)
        core.start()
        core.wait_ready(30)
    # Positive signal first: a later request through the same queue is answered and logged, so the core
    # has taken (or the broker has dropped) everything queued before it, the expired request included.
    control_name = f"control-{uuid.uuid4().hex[:6]}"
    control = httpx.post(
        f"{env.http_url}/api/v1/provision",
        json={"provisionDeviceKey": profile["provisionDeviceKey"],
              "provisionDeviceSecret": profile["provisionDeviceSecret"], "deviceName": control_name},
        timeout=15,
    )
    assert control.json()["status"] == "SUCCESS", control.text
    [control_device] = admin.http.get("/api/devices", params={"textSearch": control_name}).json()["data"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(control_device["id"] in line for line in core.lines[mark:]):
        time.sleep(0.05)
    in_profile = [line for line in core.lines[mark:] if f"in profile {profile['name']} via" in line]
    assert any(control_device["id"] in line for line in in_profile), core.output[-3000:]
    page = admin.http.get("/api/devices", params={"textSearch": name}).json()
    assert page["totalElements"] == 0
    # Not written and then undone by the gateway's abandon either: the control is all the core provisioned.
    assert len(in_profile) == 1, in_profile


async def test_migrations_are_safe_when_instances_start_together(env: Env) -> None:
    fresh = Env(env.infra)
    await asyncio.to_thread(_create_database, fresh)
    try:
        conns = [await asyncpg.connect(fresh.database_url) for _ in range(4)]
        applied = await asyncio.gather(*(apply_migrations(c) for c in conns))
        versions = [v for v, _, _ in migrations()]
        assert sorted(v for batch in applied for v in batch) == versions  # each applied exactly once
        rows = await conns[0].fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == versions
        assert await apply_migrations(conns[0]) == []
        for conn in conns:
            await conn.close()
    finally:
        await asyncio.to_thread(_drop_database, fresh)
