"""Several instances of every service on one broker and one database cooperate.

Two HTTP gateways, two MQTT gateways, two provisioning-core and two credentials processes share
one bus namespace. 1,000 devices provision concurrently over all four gateways: every answer must
reach the instance (and the device) that asked - proven by the database, where each device's
stored token hash must be the hash of the token its own request was answered with - with no
duplicates. Then one core gets SIGTERM in the middle of a second wave: no request is lost (each
gets SUCCESS) and none is answered twice or written twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from devstack import Stack

from tests.ports import free_port, free_udp_port

from . import mqtt_clients as mc
from .conftest import Admin, Env, tb_request

BACKEND = ["credentials", "provisioning_core"]
GATEWAYS = ["http_gateway", "mqtt_gateway"]


@pytest.fixture(scope="module")
def second(env: Env, stack: Stack) -> Iterator[tuple[Stack, dict[str, int]]]:
    """A second instance of every service but the admin API, in the same namespace and database."""
    ports = {"http": free_port(), "mqtt": free_port()}
    variables = env.variables(HTTP_PORT=str(ports["http"]), MQTT_PORT=str(ports["mqtt"]), MQTTS_PORT="0",
                              COAP_PORT=str(free_udp_port()), ADMIN_PORT=str(free_port()))
    running = Stack(variables, BACKEND + GATEWAYS).start(timeout=60)
    try:
        yield running, ports
    finally:
        running.stop()


async def _http(port: int, body: dict[str, Any], client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.post(f"http://127.0.0.1:{port}/api/v1/provision", content=json.dumps(body))
    return {"status_code": response.status_code, **response.json()}


async def _mqtt(port: int, body: dict[str, Any]) -> dict[str, Any]:
    return json.loads(await mc.raw_provision(port, json.dumps(body).encode(), timeout=30))


async def _wave(env: Env, ports: dict[str, int], profile: dict, count: int, tag: str,
                concurrency: int = 64) -> dict[str, dict[str, Any]]:
    """Provision ``count`` devices spread over the four gateways; device name -> answer."""
    targets = [("http", env.http_port), ("http", ports["http"]), ("mqtt", env.mqtt_port), ("mqtt", ports["mqtt"])]
    limit = asyncio.Semaphore(concurrency)
    answers: dict[str, dict[str, Any]] = {}
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(i: int) -> None:
            kind, port = targets[i % len(targets)]
            name = f"{tag}-{i:04d}"
            body = tb_request(profile, deviceName=name)
            async with limit:
                answers[name] = await (_http(port, body, client) if kind == "http" else _mqtt(port, body))

        await asyncio.gather(*(one(i) for i in range(count)))
    return answers


async def _assert_each_answer_belongs_to_its_device(db: asyncpg.Connection, answers: dict[str, dict]) -> None:
    rows = await db.fetch(
        "SELECT d.name, c.credentials_id FROM devices d JOIN device_credentials c ON c.device_id = d.id"
        " WHERE d.name = ANY($1::text[])", list(answers))
    stored = {r["name"]: r["credentials_id"] for r in rows}
    assert len(rows) == len(answers) == len(stored)  # every device exactly once
    tokens = [a["credentialsValue"] for a in answers.values()]
    assert len(set(tokens)) == len(tokens)  # no answer delivered twice
    for name, answer in answers.items():
        assert stored[name] == hashlib.sha256(answer["credentialsValue"].encode()).hexdigest(), name


async def test_thousand_provisions_over_two_of_each_gateway(
    env: Env, stack: Stack, second: tuple[Stack, dict[str, int]], admin: Admin, db: asyncpg.Connection
) -> None:
    profile = admin.create_profile()
    answers = await _wave(env, second[1], profile, 1000, f"scale-{uuid.uuid4().hex[:6]}")
    assert {a["status"] for a in answers.values()} == {"SUCCESS"}
    await _assert_each_answer_belongs_to_its_device(db, answers)


async def test_sigterm_to_one_core_mid_load_loses_nothing(
    env: Env, stack: Stack, second: tuple[Stack, dict[str, int]], admin: Admin, db: asyncpg.Connection
) -> None:
    profile = admin.create_profile()
    core = second[0]["provisioning_core"]
    mark = len(core.lines)
    wave = asyncio.create_task(_wave(env, second[1], profile, 600, f"term-{uuid.uuid4().hex[:6]}"))
    # Positive signal first: the core about to be stopped is busy with the wave (it has provisioned some of it).
    deadline = time.monotonic() + 30
    while sum(f"in profile {profile['name']} via" in line for line in core.lines[mark:]) < 20:
        assert not wave.done(), "the wave finished before the core was stopped; make it longer"
        assert time.monotonic() < deadline, f"the core provisioned fewer than 20 of the wave:\n{core.output[-3000:]}"
        await asyncio.sleep(0.05)
    assert not wave.done(), "the wave finished before the core was stopped; make it longer"
    exit_code = await asyncio.to_thread(core.stop, 30)
    answers = await wave
    assert exit_code == 0
    assert {a["status"] for a in answers.values()} == {"SUCCESS"}
    await _assert_each_answer_belongs_to_its_device(db, answers)
    core.start()  # leave the module's second stack whole
    await asyncio.to_thread(core.wait_ready, 30)
