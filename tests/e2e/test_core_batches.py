"""provisioning-core writes concurrent provisions in batches (issue 18): one statement and one commit per batch,
each device still whole or not at all, and every request of a batch answered as if it had been alone.

A batch is made on purpose: the test locks the ``devices`` table, sends one request (its write waits on the
lock, so the writer is busy), then the requests under test, which queue behind it and go together as the next
batch once the lock is released. Devices written by one batch share ``created_at`` (Postgres's ``now()`` is the
transaction's start), which is how the test sees that they were one batch. A trigger the test installs makes
the database fail the write of any device named ``*-boom`` (SQLSTATE 53100, disk full) midway through a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from devstack import Stack
from provisioning_common.bus import Bus
from provisioning_common.contract import PROVISION
from provisioning_common.models import ProvisionRequest, ProvisionStatus, Transport
from provisioning_common.settings import Settings

from .conftest import Env, tb_request

BOOM = """
CREATE OR REPLACE FUNCTION e2e_boom() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'injected failure' USING ERRCODE = 'disk_full';
END;
$$;
DROP TRIGGER IF EXISTS e2e_boom ON devices;
CREATE TRIGGER e2e_boom BEFORE INSERT ON devices FOR EACH ROW WHEN (NEW.name LIKE '%-boom') EXECUTE FUNCTION e2e_boom();
"""


@pytest.fixture(scope="module", autouse=True)
async def boom(env: Env, stack: Stack) -> AsyncIterator[None]:
    conn = await asyncpg.connect(env.database_url)
    try:
        await conn.execute(BOOM)
        yield
        await conn.execute("DROP TRIGGER IF EXISTS e2e_boom ON devices")
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def batch_held(env: Env, first: Any) -> AsyncIterator[asyncio.Task[Any]]:
    """Holds device writes (a SHARE lock on ``devices``) while ``first`` is sent and its write waits on the lock;
    yields ``first``'s task. Whatever is sent inside the block queues behind it: the next batch, on release."""
    conn = await asyncpg.connect(env.database_url)
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute("LOCK TABLE devices IN SHARE MODE")
        task = asyncio.create_task(first)
        for _ in range(300):  # positive signal: the core's write waits on our lock
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE relation = 'devices'::regclass AND NOT granted"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")
            if waiting:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"the first write never reached the database ({task.done() and task.exception()})")
        yield task
        await asyncio.sleep(2.0)  # the requests sent inside the block reach the core and queue behind the first
    finally:
        await transaction.rollback()
        await conn.close()


async def created_at(db: asyncpg.Connection, names: list[str]) -> dict[str, Any]:
    rows = await db.fetch("SELECT name, created_at FROM devices WHERE name = ANY($1::text[])", names)
    return {row["name"]: row["created_at"] for row in rows}


async def whole(db: asyncpg.Connection, name: str) -> bool:
    """The device exists with its credentials and its replayable answer (written whole)."""
    return bool(await db.fetchval(
        "SELECT count(*) FROM devices d JOIN device_credentials c ON c.device_id = d.id"
        " JOIN provision_requests r ON r.device_id = d.id WHERE d.name = $1", name))


async def test_a_batch_mixing_outcomes_answers_each_request_as_if_alone(
    env: Env, stack: Stack, profile: dict[str, Any], db: asyncpg.Connection
) -> None:
    tag = uuid.uuid4().hex[:6]
    async with httpx.AsyncClient(base_url=env.http_url, timeout=30) as http:
        taken = f"mix-{tag}-taken"  # provisioned before: taken across batches
        assert (await http.post("/api/v1/provision", json=tb_request(profile, deviceName=taken))).json()[
            "status"] == "SUCCESS"

        def provision(**fields: Any) -> Any:
            return http.post("/api/v1/provision", json=tb_request(profile, **fields))

        fresh = [f"mix-{tag}-{i}" for i in range(6)]
        twin = f"mix-{tag}-twin"  # two different requests for one name inside the batch: one SUCCESS
        async with batch_held(env, provision(deviceName=f"mix-{tag}-first")) as first:
            tasks = {
                **{name: asyncio.create_task(provision(deviceName=name)) for name in fresh},
                "boom": asyncio.create_task(provision(deviceName=f"mix-{tag}-3-boom")),
                # Another request (its own token) for the name an earlier batch wrote; the same request again
                # would be a repeat, replayed.
                "taken": asyncio.create_task(provision(deviceName=taken, credentialsType="ACCESS_TOKEN",
                                                       token=f"taken-{uuid.uuid4().hex}")),
                "twin-a": asyncio.create_task(provision(deviceName=twin, credentialsType="ACCESS_TOKEN",
                                                        token=f"twin-a-{uuid.uuid4().hex}")),
                "twin-b": asyncio.create_task(provision(deviceName=twin, credentialsType="ACCESS_TOKEN",
                                                        token=f"twin-b-{uuid.uuid4().hex}")),
                "wrong": asyncio.create_task(http.post("/api/v1/provision", json={
                    "provisionDeviceKey": profile["provisionDeviceKey"], "provisionDeviceSecret": "wrong",
                    "deviceName": f"mix-{tag}-wrong"})),
            }
        answers = {key: await task for key, task in tasks.items()}
        assert (await first).json()["status"] == "SUCCESS"

    bodies = {key: response.json() for key, response in answers.items()}
    for name in fresh:
        assert bodies[name]["status"] == "SUCCESS" and bodies[name]["credentialsValue"], bodies[name]
        assert await whole(db, name)
    assert bodies["taken"] == {"errorMsg": "Failed to provision device!", "status": "FAILURE"}
    assert bodies["wrong"]["status"] == "NOT_FOUND"
    assert sorted([bodies["twin-a"]["status"], bodies["twin-b"]["status"]]) == ["FAILURE", "SUCCESS"]
    # The database failed one device midway: that request is told to retry later, nothing of it is written,
    # and its neighbours (sorted by name, before and after it) are written.
    assert answers["boom"].status_code == 503 and answers["boom"].headers["retry-after"] == "1"
    assert bodies["boom"]["status"] == "FAILURE"
    assert await db.fetchval("SELECT count(*) FROM devices WHERE name = $1", f"mix-{tag}-3-boom") == 0
    assert await db.fetchval("SELECT count(*) FROM devices WHERE name = $1", twin) == 1
    assert await db.fetchval("SELECT count(*) FROM devices WHERE name = $1", f"mix-{tag}-wrong") == 0
    # They were written together: one transaction, one now() (at most two, should one have come late).
    times = list((await created_at(db, [*fresh, twin])).values())
    assert len(set(times)) <= 2 and max(times.count(t) for t in times) >= 4, times
    assert (await created_at(db, [f"mix-{tag}-first"]))[f"mix-{tag}-first"] not in times  # the first went alone
    # The device told to retry does so, and succeeds once the database lets it.
    await db.execute("DROP TRIGGER IF EXISTS e2e_boom ON devices")
    try:
        async with httpx.AsyncClient(base_url=env.http_url, timeout=30) as http:
            retry = await http.post("/api/v1/provision", json=tb_request(profile, deviceName=f"mix-{tag}-3-boom"))
        assert retry.json()["status"] == "SUCCESS" and await whole(db, f"mix-{tag}-3-boom")
    finally:
        await db.execute(BOOM)


async def test_a_redelivery_inside_a_batch_replays_the_first_answer(
    env: Env, stack: Stack, profile: dict[str, Any], db: asyncpg.Connection
) -> None:
    """The same message twice in one batch (a broker redelivery; one without a name, so keyed by its message id,
    and one with a name, keyed by its content): one device each, and both deliveries get its answer."""
    bus = await Bus.connect(Settings(rabbitmq_url=env.infra.rabbitmq_url, bus_namespace=env.namespace), "e2e-tests")
    tag = uuid.uuid4().hex[:6]
    unnamed = ProvisionRequest(provision_key=profile["provisionDeviceKey"],
                               provision_secret=profile["provisionDeviceSecret"], transport=Transport.MQTT)
    named = unnamed.model_copy(update={"request_id": str(uuid.uuid4()), "device_name": f"redelivered-{tag}"})
    first = unnamed.model_copy(update={"request_id": str(uuid.uuid4()), "device_name": f"redelivered-{tag}-first"})
    try:
        # Warm up (the bus's reply queue, the core's prepared statements) before writes are held.
        probe = first.model_copy(update={"request_id": str(uuid.uuid4()), "device_name": f"probe-{tag}"})
        assert (await bus.call(PROVISION, probe, message_id=probe.request_id)).status is ProvisionStatus.SUCCESS
        async with batch_held(env, bus.call(PROVISION, first, message_id=first.request_id)) as held:
            calls = [asyncio.create_task(bus.call(PROVISION, request, message_id=request.request_id))
                     for request in (unnamed, unnamed, named, named)]
        answers = [await call for call in calls]
        assert (await held).status is ProvisionStatus.SUCCESS
    finally:
        await bus.close()
    assert all(a.status is ProvisionStatus.SUCCESS for a in answers), answers
    assert answers[0] == answers[1] and answers[2] == answers[3]
    assert answers[0].device_id != answers[2].device_id
    assert answers[2].device_name == f"redelivered-{tag}"
    for answer in (answers[0], answers[2]):
        assert await db.fetchval("SELECT count(*) FROM devices WHERE id = $1", uuid.UUID(answer.device_id)) == 1
    assert await db.fetchval("SELECT count(*) FROM devices WHERE name LIKE $1", f"redelivered-{tag}%") == 2
    # The four deliveries were one batch with the unnamed device (one transaction, one now()).
    stamps = await db.fetch("SELECT DISTINCT created_at FROM devices WHERE id = ANY($1::uuid[])",
                            [uuid.UUID(answers[0].device_id), uuid.UUID(answers[2].device_id)])
    assert len(stamps) == 1

