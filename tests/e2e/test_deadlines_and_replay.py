"""Deadlines end to end, the replay of repeated requests, and the undo of answers nobody received.

The module's stack runs with short bounds (PROVISION_TIMEOUT_S=2, BUS_REPLY_GRACE_S=1,
PROVISION_REPLAY_WINDOW_S=4) so each rule can be watched happen:
- a write that cannot commit before the request's deadline commits nothing (the name stays free);
- a device repeating its request gets its first answer within the window, "name taken" after it;
- an answer the broker cannot deliver (its caller is gone) is undone, so the name is free again;
- a caller waiting on the bus fails at once when its connection drops, not after its time-out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import aio_pika
import asyncpg
import httpx
import pytest
from devstack import Stack
from provisioning_common.bus import DEADLINE_HEADER, Bus, RpcError
from provisioning_common.contract import CORE, PROVISION
from provisioning_common.models import ProvisionRequest, Transport
from provisioning_common.settings import Settings

from .conftest import Env, tb_request

TIMEOUT_S = 2.0
GRACE_S = 1.0
WINDOW_S = 4.0


@pytest.fixture(scope="module")
def stack(env: Env) -> Iterator[Stack]:
    variables = env.variables(PROVISION_TIMEOUT_S=str(TIMEOUT_S), BUS_REPLY_GRACE_S=str(GRACE_S),
                              PROVISION_REPLAY_WINDOW_S=str(WINDOW_S))
    running = Stack(variables, ["credentials", "provisioning_core", "admin_api", "http_gateway"]).start(timeout=60)
    try:
        yield running
    finally:
        running.stop()


async def wait_for_line(stack: Stack, service: str, text: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in stack[service].output:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{service} never logged {text!r}:\n{stack[service].output[-3000:]}")


@contextlib.asynccontextmanager
async def devices_locked(env: Env) -> AsyncIterator[None]:
    """Every device write blocks until the block ends (the core's statement waits on the lock)."""
    conn = await asyncpg.connect(env.database_url)
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute("LOCK TABLE devices IN SHARE MODE")
        yield
    finally:
        await transaction.rollback()
        await conn.close()


async def test_a_write_held_past_the_deadline_commits_nothing_and_the_retry_succeeds(
    env: Env, stack: Stack, profile: dict, db: asyncpg.Connection
) -> None:
    name = f"late-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(base_url=env.http_url, timeout=30) as client:
        async with devices_locked(env):
            started = time.monotonic()
            response = await client.post("/api/v1/provision", json=tb_request(profile, deviceName=name))
            waited = time.monotonic() - started
            # Told "retry later" once deadline + grace passed; the write is still blocked.
            assert response.status_code == 503, response.text
            assert TIMEOUT_S <= waited < TIMEOUT_S + GRACE_S + 2
            await asyncio.sleep(0.5)
        # The lock is gone: the blocked statement runs on, finds its deadline passed, and rolls back.
        await wait_for_line(stack, "provisioning_core", f"device {name} not written: its request's deadline passed")
        assert await db.fetchval("SELECT count(*) FROM devices WHERE name = $1", name) == 0
        retry = await client.post("/api/v1/provision", json=tb_request(profile, deviceName=name))
        assert retry.json()["status"] == "SUCCESS"


async def test_a_repeated_request_is_replayed_within_the_window_and_refused_after_it(
    env: Env, stack: Stack, profile: dict, db: asyncpg.Connection
) -> None:
    name = f"window-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(base_url=env.http_url, timeout=30) as client:
        first = await client.post("/api/v1/provision", json=tb_request(profile, deviceName=name))
        again = await client.post("/api/v1/provision", json=tb_request(profile, deviceName=name))
        assert first.json()["status"] == "SUCCESS" and again.content == first.content
        await asyncio.sleep(WINDOW_S + 0.5)
        late = await client.post("/api/v1/provision", json=tb_request(profile, deviceName=name))
    assert late.json() == {"errorMsg": "Failed to provision device!", "status": "FAILURE"}
    assert await db.fetchval("SELECT count(*) FROM devices WHERE name = $1", name) == 1


async def test_an_answer_nobody_can_receive_is_undone(
    env: Env, stack: Stack, profile: dict, db: asyncpg.Connection
) -> None:
    """A request whose reply queue does not exist (its gateway died): the broker returns the answer,
    the core deletes the device it had written, and the same request then succeeds afresh."""
    name = f"orphan-{uuid.uuid4().hex[:8]}"
    request = ProvisionRequest(provision_key=profile["provisionDeviceKey"],
                               provision_secret=profile["provisionDeviceSecret"],
                               device_name=name, transport=Transport.HTTP)
    connection = await aio_pika.connect(env.infra.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(request.model_dump_json().encode(), type=PROVISION.name, correlation_id="c1",
                             message_id=request.request_id, reply_to=f"{env.namespace}gone-{uuid.uuid4().hex}",
                             headers={DEADLINE_HEADER: f"{time.time() + TIMEOUT_S:.6f}"}),
            routing_key=f"{env.namespace}{CORE.name}",
        )
    await wait_for_line(stack, "provisioning_core", "its answer reached nobody")
    assert await db.fetchval("SELECT count(*) FROM devices WHERE name = $1", name) == 0
    async with httpx.AsyncClient(base_url=env.http_url, timeout=30) as client:
        retry = await client.post("/api/v1/provision", json=tb_request(profile, deviceName=name))
    assert retry.json()["status"] == "SUCCESS"
    assert await db.fetchval("SELECT count(*) FROM devices WHERE name = $1", name) == 1
    token = retry.json()["credentialsValue"]
    assert token not in stack.output()


async def test_a_request_that_arrives_after_its_deadline_is_not_processed(
    env: Env, stack: Stack, profile: dict, db: asyncpg.Connection
) -> None:
    name = f"expired-{uuid.uuid4().hex[:8]}"
    request = ProvisionRequest(provision_key=profile["provisionDeviceKey"],
                               provision_secret=profile["provisionDeviceSecret"],
                               device_name=name, transport=Transport.HTTP)
    bus = await Bus.connect(Settings(rabbitmq_url=env.infra.rabbitmq_url, bus_namespace=env.namespace), "e2e-tests")
    try:
        with pytest.raises(RpcError, match="deadline"):
            await bus.call(PROVISION, request, deadline=time.time() - 0.01)
        # Positive signal that the core is serving: a fresh request right after is answered.
        fresh = request.model_copy(update={"device_name": f"{name}-fresh"})
        assert (await bus.call(PROVISION, fresh)).status.value == "SUCCESS"
    finally:
        await bus.close()
    assert await db.fetchval("SELECT count(*) FROM devices WHERE name = $1", name) == 0


class Proxy:
    """A TCP proxy in front of RabbitMQ whose connections the test can cut, like a network would."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


async def test_a_caller_fails_at_once_when_its_connection_drops(env: Env, stack: Stack) -> None:
    from urllib.parse import urlsplit

    url = urlsplit(env.infra.rabbitmq_url)
    proxy = Proxy(url.port or 5672)
    port = await proxy.start()
    proxied = url._replace(netloc=f"{url.username}:{url.password}@127.0.0.1:{port}").geturl()
    # A namespace where nobody serves: the call would wait its whole (long) time-out.
    bus = await Bus.connect(Settings(rabbitmq_url=proxied, bus_namespace=f"e2e-cut-{uuid.uuid4().hex[:6]}.",
                                     provision_timeout_s=60), "e2e-tests")
    try:
        request = ProvisionRequest(provision_key="k", provision_secret="s", transport=Transport.HTTP)
        call = asyncio.create_task(bus.call(PROVISION, request))
        # Positive signal first: the request sits in the core's (unserved) queue, so the call has published it
        # and is now waiting for its answer.
        async with await aio_pika.connect(env.infra.rabbitmq_url) as watcher:
            deadline = time.monotonic() + 10
            while True:
                channel = await watcher.channel()
                with contextlib.suppress(aio_pika.exceptions.ChannelNotFoundEntity):  # not declared yet
                    queue = await channel.declare_queue(f"{bus._settings.bus_namespace}{CORE.name}", passive=True)
                    if queue.declaration_result.message_count:
                        break
                    await channel.close()
                assert time.monotonic() < deadline, "the request never reached the core's queue"
                await asyncio.sleep(0.05)
        assert not call.done()  # it is waiting for an answer
        started = time.monotonic()
        proxy.cut()
        with pytest.raises(RpcError, match="connection lost"):
            await asyncio.wait_for(call, 10)
        assert time.monotonic() - started < 5
    finally:
        with contextlib.suppress(Exception):
            await bus.close()
        await proxy.close()
        with contextlib.suppress(Exception):
            conn = await aio_pika.connect(env.infra.rabbitmq_url)
            async with conn:
                await (await conn.channel()).queue_delete(f"{bus._settings.bus_namespace}{CORE.name}")
