"""Issue 13, "Least privilege on the bus": each service on its own RabbitMQ user, with the permissions of
``provisioning_common.bus_permissions``, on a PRIVATE RabbitMQ node (users and permissions are never
created on the shared broker).

The definitions the deployments load are rendered for this test's namespace and imported with
``rabbitmqctl import_definitions`` into the private node; credentials, provisioning-core, admin-api and the
HTTP gateway then run as real processes, each with its own user. A device provisions through them (the
gateway calls the core, the core mints through credentials.internal); then a connection with the HTTP
gateway's credentials tries what an attacker holding them would: publishing to the signing exchange, to
the default exchange (which reaches every queue), consuming credentials' queue, binding ``#`` on
``rpc.replies`` and ``device.downlink``. RabbitMQ closes each of those channels with ACCESS_REFUSED, while
the gateway's own calls (authenticate) still work on the same connection.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiormq.exceptions
import httpx
import pytest
from devstack import ServiceProcess, Stack
from provisioning_common.bus import Bus
from provisioning_common.bus_permissions import USERS, definitions
from provisioning_common.contract import AUTHENTICATE, CREDENTIALS_INTERNAL, REPLY_EXCHANGE, request_exchange
from provisioning_common.models import AuthenticateRequest
from provisioning_common.settings import Settings

from tests.conftest import Infra
from tests.e2e.conftest import Admin, Env, _create_database

from .infra import PrivatePostgres, PrivateRabbitMQ

pytestmark = pytest.mark.faults

SERVICES = ("credentials", "provisioning_core", "admin_api", "http_gateway")


def rabbitmqctl(rabbit: PrivateRabbitMQ, *args: str) -> str:
    """rabbitmqctl against the private node only (its node name, cookie in its HOME, its epmd port)."""
    done = subprocess.run(["/usr/lib/rabbitmq/bin/rabbitmqctl", "-n", rabbit.node_name, *args],
                          env=rabbit._environment(), capture_output=True, text=True, timeout=60)  # noqa: SLF001
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def user_url(rabbit: PrivateRabbitMQ, user: str, password: str) -> str:
    return f"amqp://{user}:{password}@127.0.0.1:{rabbit.amqp_port}/"


async def _wait_login(url: str, timeout: float = 30.0) -> None:
    """``import_definitions`` returns before the import is done: wait until the user can log in."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection = await aio_pika.connect(url, timeout=2)
            await connection.close()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


class Deployment:
    def __init__(self, env: Env, stack: Stack, passwords: dict[str, str], rabbit: PrivateRabbitMQ) -> None:
        self.env, self.stack, self.passwords, self.rabbit = env, stack, passwords, rabbit

    def url(self, user: str) -> str:
        return user_url(self.rabbit, user, self.passwords[user])


@pytest.fixture(scope="module")
def deployment(rabbit: PrivateRabbitMQ, postgres: PrivatePostgres, tmp_path_factory: pytest.TempPathFactory,
               ) -> Iterator[Deployment]:
    env = Env(Infra(rabbitmq_url=rabbit.url, postgres_url=postgres.url))
    passwords = {user.name: secrets.token_urlsafe(18) for user in USERS}
    settings = Settings(bus_namespace=env.namespace)
    path: Path = tmp_path_factory.mktemp("rabbit-definitions") / "definitions.json"
    path.write_text(json.dumps(definitions(settings, passwords)))
    rabbitmqctl(rabbit, "import_definitions", str(path))
    for user in SERVICES:
        asyncio.run(_wait_login(user_url(rabbit, user, passwords[user])))
    _create_database(env)
    stack = Stack(env.variables(), services=SERVICES)
    for name in SERVICES:  # each service on its own user
        own = {**stack.env, "RABBITMQ_URL": user_url(rabbit, name, passwords[name])}
        stack.processes[name] = ServiceProcess(name, own)
    stack.start(timeout=90)
    try:
        yield Deployment(env, stack, passwords, rabbit)
    finally:
        stack.stop()


def test_the_services_run_on_their_own_users(deployment: Deployment) -> None:
    """Provisioning end to end (gateway -> core -> credentials.internal), pre-provisioning through the admin
    API (admin-api -> credentials.internal), and nothing refused in any service's log."""
    admin = Admin(deployment.env)
    profile = admin.create_profile()
    created = admin.create_device(profile["id"], credentials={"credentialsType": "ACCESS_TOKEN",
                                                              "credentialsValue": f"tok-{uuid.uuid4().hex}"})
    assert created["name"]
    body = {"deviceName": f"perm-{uuid.uuid4().hex[:8]}", "provisionDeviceKey": profile["provisionDeviceKey"],
            "provisionDeviceSecret": profile["provisionDeviceSecret"]}
    answer = httpx.post(f"{deployment.env.http_url}/api/v1/provision", content=json.dumps(body), timeout=20).json()
    assert answer["status"] == "SUCCESS", answer
    token = answer["credentialsValue"]
    telemetry = httpx.post(f"{deployment.env.http_url}/api/v1/{token}/telemetry", json={"t": 1}, timeout=20)
    assert telemetry.status_code == 200, telemetry.text
    output = deployment.stack.output()
    assert "ACCESS_REFUSED" not in output and "Traceback" not in output, output[-3000:]


async def _refused(connection: aio_pika.abc.AbstractConnection,
                   action: Callable[[aio_pika.abc.AbstractChannel], Awaitable[Any]]) -> str:
    """Run ``action`` on a fresh channel; return RabbitMQ's refusal (the channel is closed with 403)."""
    channel = await connection.channel(publisher_confirms=True)
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused) as refused:
        await action(channel)
    return str(refused.value)


async def test_a_gateways_credentials_cannot_reach_signing_or_the_default_exchange(deployment: Deployment) -> None:
    ns = deployment.env.namespace
    internal = f"{ns}{request_exchange(CREDENTIALS_INTERNAL.name)}"
    issue = aio_pika.Message(json.dumps({"csr": "x", "device_name": "evil", "signing_certificate": "x",
                                         "signing_key_enc": "x", "validity_days": 1}).encode(),
                             type="issue_certificate", content_type="application/json")
    connection = await aio_pika.connect(deployment.url("http_gateway"))
    try:
        async def publish_to_signing(channel: aio_pika.abc.AbstractChannel) -> None:
            exchange = await channel.get_exchange(internal)  # passive: it exists, the gateway may look
            await exchange.publish(issue, routing_key=f"{ns}{CREDENTIALS_INTERNAL.name}")

        async def publish_to_default(channel: aio_pika.abc.AbstractChannel) -> None:
            await channel.default_exchange.publish(issue, routing_key=f"{ns}{CREDENTIALS_INTERNAL.name}")

        async def consume_signing_queue(channel: aio_pika.abc.AbstractChannel) -> None:
            queue = await channel.get_queue(f"{ns}{CREDENTIALS_INTERNAL.name}")
            async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                pass

            await queue.consume(ignore)

        async def declare_a_queue_of_its_choice(channel: aio_pika.abc.AbstractChannel) -> None:
            await channel.declare_queue(f"{ns}reply.provisioning_core.{uuid.uuid4().hex}", exclusive=True)

        async def bind_every_reply(channel: aio_pika.abc.AbstractChannel) -> None:
            queue = await channel.declare_queue(f"{ns}reply.http_gateway.{uuid.uuid4().hex}", exclusive=True)
            await queue.bind(await channel.get_exchange(f"{ns}{REPLY_EXCHANGE}"), routing_key="#")

        async def bind_every_device(channel: aio_pika.abc.AbstractChannel) -> None:
            queue = await channel.declare_queue(f"{ns}downlink.http_gateway.{uuid.uuid4().hex[:12]}", exclusive=True)
            await queue.bind(await channel.get_exchange(f"{ns}device.downlink"), routing_key="#")

        refusals = {
            "signing exchange": await _refused(connection, publish_to_signing),
            "default exchange": await _refused(connection, publish_to_default),
            "signing queue": await _refused(connection, consume_signing_queue),
            "another's reply queue": await _refused(connection, declare_a_queue_of_its_choice),
            "# on rpc.replies": await _refused(connection, bind_every_reply),
            "# on device.downlink": await _refused(connection, bind_every_device),
        }
        print(json.dumps(refusals, indent=1))
        assert internal in refusals["signing exchange"]
        assert "amq.default" in refusals["default exchange"]
        for what, refusal in refusals.items():
            assert "ACCESS_REFUSED" in refusal and "http_gateway" in refusal, (what, refusal)
        # Its own calls still work: a device login through the public credentials queue.
        settings = Settings(rabbitmq_url=deployment.url("http_gateway"), bus_namespace=ns, provision_timeout_s=10)
        bus = await Bus.connect(settings, "http_gateway")
        try:
            result = await bus.call(AUTHENTICATE, AuthenticateRequest(token=f"unknown-{uuid.uuid4().hex}"))
            assert result.authenticated is False
        finally:
            await bus.close()
    finally:
        await connection.close()


async def test_only_the_core_and_the_admin_api_may_call_the_internal_credentials(deployment: Deployment) -> None:
    internal = f"{deployment.env.namespace}{request_exchange(CREDENTIALS_INTERNAL.name)}"
    for user in ("provisioning_core", "admin_api", "http_gateway", "mqtt_gateway", "coap_gateway", "mqtt_bridge",
                 "broker_auth", "backend"):
        connection = await aio_pika.connect(deployment.url(user))
        try:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(internal)
            message = aio_pika.Message(b"{}", type="mint_tokens", correlation_id="probe")
            if user in ("provisioning_core", "admin_api"):
                await exchange.publish(message, routing_key="nowhere")  # taken (then dropped: unroutable key)
            else:
                with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                    await exchange.publish(message, routing_key="nowhere")
        finally:
            await connection.close()


async def test_the_backend_example_runs_on_the_backend_user(deployment: Deployment) -> None:
    """examples/backend_consumer.py with the ``backend`` user: its queues, bindings, its reply queue on
    rpc.replies and a downlink publish (to a device without a session: DeviceOffline, not a refusal)."""
    from tests.e2e.test_backend_consumer import example

    backend = await example.Backend.connect(deployment.url("backend"), deployment.env.namespace)
    try:
        await backend.start()
        with pytest.raises(example.DeviceOffline):
            await backend.rpc(str(uuid.uuid4()), "getState", timeout=5)
    finally:
        await backend.close()
