"""Graceful shutdown with requests in flight, on real processes.

Requests are held in flight deterministically: the test takes ``LOCK TABLE devices IN SHARE MODE``
in its own transaction, so every provisioning attempt blocks in the core's device write (its
request claimed, nothing committed, nothing answered) until the test rolls back. Then:

- a gateway on SIGTERM refuses new work at once (HTTP and MQTT: connections refused; CoAP, which has
  no connections: 5.03), answers the requests it holds once the core answers, and exits 0 within its
  bound (PROVISION_TIMEOUT_S + 5 s);
- provisioning-core on SIGTERM stops consuming (new requests go to the second core), finishes what
  it holds, acks, exits 0; when what it holds cannot finish within its drain bound (10 s), it exits 0
  anyway (closing its channel cancels those handlers, and asyncpg cancels their statements, which
  roll back), and the broker redelivers the unacknowledged requests to the second core, which
  answers each of them once: no request is lost (a lost one would be a 503 here) and no device is
  written twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from devstack import ServiceProcess, Stack

from . import mqtt_clients as mc
from .conftest import Admin, Env, tb_request

#: Long enough for a request to survive the core's 10 s drain, its redelivery and the lock's release.
PROVISION_TIMEOUT_S = 40
CORE_DRAIN_S = 10  # Bus.stop_consuming's bound in provisioning_core/__main__.py
GATEWAY_DRAIN_S = PROVISION_TIMEOUT_S + 5  # http_gateway: uvicorn's timeout_graceful_shutdown


def _variables(env: Env) -> dict[str, str]:
    # Each device its own statement (no batching), so that every request in flight is seen waiting on the lock.
    return env.variables(PROVISION_TIMEOUT_S=str(PROVISION_TIMEOUT_S), PROVISION_WRITE_BATCH_MAX="1")


@contextlib.contextmanager
def running(env: Env, *services: str) -> Any:
    stack = Stack(_variables(env), services).start(timeout=60)
    try:
        yield stack
    finally:
        stack.stop()


@contextlib.asynccontextmanager
async def devices_locked(env: Env) -> AsyncIterator[asyncpg.Connection]:
    """Every device write waits until the block ends (reads go on: SHARE mode)."""
    conn = await asyncpg.connect(env.database_url)
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute("LOCK TABLE devices IN SHARE MODE")
        yield conn
    finally:
        await transaction.rollback()
        await conn.close()


async def wait_blocked(conn: asyncpg.Connection, count: int, timeout: float = 20.0) -> None:
    """Until ``count`` sessions wait for the lock: that many requests are in flight in the cores."""
    deadline = time.monotonic() + timeout
    waiting = 0
    while time.monotonic() < deadline:
        # pg_stat_activity is read once per transaction unless the snapshot is cleared.
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        if waiting >= count:
            assert waiting == count
            return
        await asyncio.sleep(0.05)
    activity = await conn.fetch("SELECT state, wait_event_type, wait_event, left(query, 60) AS query"
                                " FROM pg_stat_activity WHERE datname = current_database()")
    raise AssertionError(f"only {waiting} of {count} requests reached the core: {[tuple(r) for r in activity]}")


async def wait_exit(process: ServiceProcess, timeout: float) -> tuple[int, float]:
    assert process.proc is not None
    started = time.monotonic()
    code = await asyncio.to_thread(process.proc.wait, timeout)
    return code, time.monotonic() - started


def refuses_connections(port: int, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except ConnectionRefusedError:
            return True
        time.sleep(0.05)
    return False


@contextlib.asynccontextmanager
async def http_client(env: Env) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=env.http_url, timeout=PROVISION_TIMEOUT_S + 20) as client:
        yield client


def provision_over_http(client: httpx.AsyncClient, profile: dict[str, Any], names: list[str]) -> list[asyncio.Task]:
    """One concurrent request (and connection) per name, left running."""
    return [asyncio.create_task(client.post("/api/v1/provision", json=tb_request(profile, deviceName=name)))
            for name in names]


def create_profile(env: Env) -> dict[str, Any]:
    admin = Admin(env)
    try:
        return admin.create_profile()
    finally:
        admin.http.close()


async def assert_provisioned_once(env: Env, profile: dict[str, Any], answers: dict[str, dict[str, Any]]) -> None:
    """Every SUCCESS answer's device exists exactly once, with the token it was answered; no other device."""
    conn = await asyncpg.connect(env.database_url)
    try:
        rows = await conn.fetch(
            "SELECT d.name, c.credentials_id FROM devices d JOIN device_credentials c ON c.device_id = d.id"
            " WHERE d.profile_id = $1", uuid.UUID(profile["id"]))
    finally:
        await conn.close()
    stored = [row["name"] for row in rows]
    assert sorted(stored) == sorted(answers), "a device without its SUCCESS answer, or a duplicate"
    by_name = {row["name"]: row["credentials_id"] for row in rows}
    for name, answer in answers.items():
        assert answer["status"] == "SUCCESS", (name, answer)
        assert by_name[name] == hashlib.sha256(answer["credentialsValue"].encode()).hexdigest(), name


def _names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{uuid.uuid4().hex[:8]}" for _ in range(count)]


# --- gateways ----------------------------------------------------------------------------------


async def test_http_gateway_finishes_requests_in_flight_refuses_new_ones_and_exits_0(env: Env) -> None:
    with running(env, "credentials", "provisioning_core", "admin_api", "http_gateway") as stack:
        gateway = stack["http_gateway"]
        profile = create_profile(env)
        names = _names("http-drain", 8)
        async with http_client(env) as client:
            async with devices_locked(env) as lock:
                tasks = provision_over_http(client, profile, names)
                await wait_blocked(lock, len(names))
                gateway.signal(signal.SIGTERM)
                assert await asyncio.to_thread(refuses_connections, env.http_port), "still accepting after SIGTERM"
                # Positive signal first: uvicorn has told its open connections to shut down and now waits for
                # them (a cut, or an exit, would have happened by then).
                deadline = time.monotonic() + 10
                while "Waiting for connections to close" not in gateway.output:
                    assert time.monotonic() < deadline, gateway.output[-3000:]
                    await asyncio.sleep(0.05)
                assert not any(t.done() for t in tasks), "a request in flight was cut"
                assert gateway.proc.poll() is None, "exited with requests in flight"
            released = time.monotonic()
            responses = await asyncio.gather(*tasks)
        code, _ = await wait_exit(gateway, GATEWAY_DRAIN_S)
        assert code == 0, gateway.output[-3000:]
        assert time.monotonic() - released < 10
        assert [r.status_code for r in responses] == [200] * len(names)
        await assert_provisioned_once(env, profile, {n: r.json() for n, r in zip(names, responses, strict=False)})


async def test_mqtt_gateway_answers_sessions_in_flight_refuses_new_ones_and_exits_0(env: Env) -> None:
    with running(env, "credentials", "provisioning_core", "admin_api", "mqtt_gateway") as stack:
        profile = create_profile(env)
        names = _names("mqtt-drain", 4)
        async with devices_locked(env) as lock:
            tasks = [asyncio.create_task(asyncio.to_thread(
                mc.provision_json, env.mqtt_port, tb_request(profile, deviceName=name), timeout=PROVISION_TIMEOUT_S))
                for name in names]
            await wait_blocked(lock, len(names))
            stack["mqtt_gateway"].signal(signal.SIGTERM)
            assert await asyncio.to_thread(refuses_connections, env.mqtt_port), "still accepting after SIGTERM"
            assert not any(t.done() for t in tasks)
        answers = await asyncio.gather(*tasks)
        code, _ = await wait_exit(stack["mqtt_gateway"], PROVISION_TIMEOUT_S + 5)
        assert code == 0, stack["mqtt_gateway"].output[-3000:]
        await assert_provisioned_once(env, profile, dict(zip(names, answers, strict=False)))


async def test_coap_gateway_answers_requests_in_flight_refuses_new_ones_with_5_03_and_exits_0(env: Env) -> None:
    import aiocoap
    from aiocoap.numbers.codes import Code

    with running(env, "credentials", "provisioning_core", "admin_api", "coap_gateway") as stack:
        gateway = stack["coap_gateway"]
        profile = create_profile(env)
        names = _names("coap-drain", 4)
        context = await aiocoap.Context.create_client_context(transports=["udp6"])

        def request(name: str) -> asyncio.Future:
            message = aiocoap.Message(code=Code.POST, uri=f"coap://127.0.0.1:{env.coap_port}/api/v1/provision",
                                      payload=json.dumps(tb_request(profile, deviceName=name)).encode())
            return asyncio.ensure_future(context.request(message).response)

        try:
            async with devices_locked(env) as lock:
                tasks = [request(name) for name in names]
                await wait_blocked(lock, len(names))
                gateway.signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                late = await asyncio.wait_for(request(_names("coap-late", 1)[0]), 10)
                assert late.code == Code.SERVICE_UNAVAILABLE, late
                assert not any(t.done() for t in tasks)
            responses = await asyncio.wait_for(asyncio.gather(*tasks), PROVISION_TIMEOUT_S)
        finally:
            await context.shutdown()
        code, _ = await wait_exit(gateway, PROVISION_TIMEOUT_S + 5)
        assert code == 0, gateway.output[-3000:]
        assert all(r.code.is_successful() for r in responses), responses
        await assert_provisioned_once(
            env, profile, {n: json.loads(r.payload) for n, r in zip(names, responses, strict=False)}
        )


# --- provisioning-core -------------------------------------------------------------------------


def _provisioned(process: ServiceProcess) -> int:
    return sum("provisioned device" in line for line in process.lines)


@pytest.fixture
def two_cores(env: Env) -> Any:
    with running(env, "credentials", "provisioning_core", "admin_api", "http_gateway") as stack:
        second = ServiceProcess("provisioning_core", stack.env)
        second.start()
        try:
            second.wait_ready(60)
            yield stack, stack["provisioning_core"], second
        finally:
            second.stop()


async def test_core_finishes_and_acks_what_it_holds_then_exits_0(env: Env, two_cores: Any) -> None:
    _, first, second = two_cores
    profile = create_profile(env)
    names, later = _names("core-drain", 12), _names("core-drain-later", 4)
    async with http_client(env) as client:
        async with devices_locked(env) as lock:
            tasks = provision_over_http(client, profile, names)
            await wait_blocked(lock, len(names))
            first.signal(signal.SIGTERM)
            await asyncio.sleep(1)  # the first core has stopped consuming: what comes now goes to the second
            tasks += provision_over_http(client, profile, later)
            await wait_blocked(lock, len(names) + len(later))
            assert first.proc.poll() is None, "the core exited with transactions in flight"
        code, _ = await wait_exit(first, CORE_DRAIN_S)
        assert code == 0, first.output[-3000:]
        responses = await asyncio.gather(*tasks)
    assert [r.status_code for r in responses] == [200] * len(tasks)
    await assert_provisioned_once(env, profile, {n: r.json() for n, r in zip(names + later, responses, strict=False)})
    assert "still in flight" not in first.output
    # Each device was written by one core, once; the first core wrote its share before it exited.
    assert _provisioned(first) >= 1
    assert _provisioned(first) + _provisioned(second) == len(tasks)


async def test_core_past_its_drain_bound_exits_0_and_its_requests_are_redelivered(
    env: Env, two_cores: Any
) -> None:
    _, first, second = two_cores
    profile = create_profile(env)
    names = _names("core-redeliver", 12)
    async with http_client(env) as client:
        async with devices_locked(env) as lock:
            tasks = provision_over_http(client, profile, names)
            await wait_blocked(lock, len(names))
            first.signal(signal.SIGTERM)
            code, elapsed = await wait_exit(first, CORE_DRAIN_S + 15)
            assert code == 0, first.output[-3000:]
            assert elapsed >= CORE_DRAIN_S - 1  # it waited for its transactions, bounded
            held = re.search(r"(\d+) requests still in flight at shutdown", first.output)
            assert held and int(held[1]) >= 1, first.output[-3000:]
            assert not any(t.done() for t in tasks)
        # The first core is gone and answered nothing; every request is answered now, so the second
        # core answered the ones the first held (redelivered), and each device exists once.
        responses = await asyncio.gather(*tasks)
    assert [r.status_code for r in responses] == [200] * len(names)
    await assert_provisioned_once(env, profile, {n: r.json() for n, r in zip(names, responses, strict=False)})
    assert second.proc.poll() is None
