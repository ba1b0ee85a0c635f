"""Fault-test fixtures: a private RabbitMQ and Postgres per test module, real service processes on them.

Nothing here touches the machine's shared servers: ``infra`` is overridden for this folder so even a
fixture borrowed from the e2e suite gets the private instances. Each scenario gets a fresh
:class:`Deployment` (its own database, bus namespace and service processes) on the module's private
pair, so one scenario's damage cannot leak into the next; the pair itself is healed (resumed,
restarted) before each deployment starts.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
from devstack import ServiceProcess, Stack

from tests.conftest import Infra
from tests.e2e.conftest import Admin, Env
from tests.ports import free_udp_port

from .infra import PrivatePostgres, PrivateRabbitMQ, Reaper, free_port, run_coroutine_blocking

#: Small, so that a scenario with several time-outs stays well under a minute.
PROVISION_TIMEOUT_S = 4.0

#: Every service of the pipeline the devices use (bridge mode and broker_auth need an outside broker).
SERVICES = ("credentials", "provisioning_core", "admin_api", "http_gateway", "mqtt_gateway", "coap_gateway")


@contextmanager
def private_rabbitmq() -> Iterator[PrivateRabbitMQ]:
    """A started private RabbitMQ node, stopped and removed when the block ends (however it ends)."""
    with PrivateRabbitMQ() as node:
        yield node


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A started private Postgres cluster, stopped and removed when the block ends (however it ends)."""
    with PrivatePostgres() as server:
        yield server


@pytest.fixture(scope="module")
def rabbit() -> Iterator[PrivateRabbitMQ]:
    """The module's private RabbitMQ node (one per module: a scenario may kill it; ~5-12 s to start)."""
    with private_rabbitmq() as node:
        yield node


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    """The module's private Postgres cluster (one per module: a scenario may kill or freeze it)."""
    with private_postgres() as server:
        yield server


@pytest.fixture(scope="module")
def infra(rabbit: PrivateRabbitMQ, postgres: PrivatePostgres) -> Infra:
    """Overrides the session-wide ``infra``: in this folder the servers are always the private ones."""
    return Infra(rabbitmq_url=rabbit.url, postgres_url=postgres.url)


def heal(rabbit: PrivateRabbitMQ, postgres: PrivatePostgres) -> None:
    """Undo what a previous (possibly failed) scenario left: a frozen or stopped database, a dead broker."""
    if postgres.paused:
        postgres.resume()
    if not postgres.root_pids():
        postgres.start()
    if not rabbit.root_pids() or rabbit.beam_pid is None:
        rabbit.restart()


def _create_database(infra: Infra, name: str) -> None:
    async def create() -> None:
        conn = await asyncpg.connect(infra.postgres_url, timeout=10)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    run_coroutine_blocking(create)


@dataclass
class Deployment:
    """One isolated deployment on the private servers: database, namespace, every service process,
    an admin client, and the profile the load uses (plus one for probes, so probe devices never
    count as extra devices of the load's profile)."""

    env: Env
    stack: Stack
    admin: Admin
    rabbit: PrivateRabbitMQ
    postgres: PrivatePostgres
    profile: dict[str, Any] = field(default_factory=dict)
    probe_profile: dict[str, Any] = field(default_factory=dict)
    #: PIDs of the first start of each service: "back without a restart" compares against these.
    initial_pids: dict[str, int] = field(default_factory=dict)

    @property
    def http_url(self) -> str:
        return self.env.http_url

    @property
    def database_url(self) -> str:
        return self.env.database_url

    def service(self, name: str) -> ServiceProcess:
        return self.stack[name]

    def pid(self, name: str) -> int | None:
        proc = self.stack[name].proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def pids(self) -> dict[str, int | None]:
        return {name: self.pid(name) for name in self.stack.processes}

    def kill_service(self, name: str) -> int:
        """SIGKILL one service process by its PID (no shutdown code runs); returns that PID."""
        proc = self.stack[name].proc
        assert proc is not None and proc.poll() is None, f"{name} is not running"
        pid = proc.pid
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        return pid

    def start_service(self, name: str, timeout: float = 60.0) -> int:
        """Start a killed service again with the same environment; returns once it is ready.

        ``ServiceProcess`` keeps its readiness flag set from the first start, so it is cleared here
        (devstack has no restart of one process; see the report)."""
        process = self.stack[name]
        process._ready.clear()  # noqa: SLF001 - a second start must wait for the second "ready" line
        process.start()
        process.wait_ready(timeout)
        self._track()
        return process.proc.pid  # type: ignore[union-attr]

    async def restart_service(self, name: str, down_s: float = 0.0, timeout: float = 60.0) -> tuple[int, int]:
        """kill -9 ``name``, leave it down ``down_s`` seconds, start it again (without blocking the
        caller's event loop, so a load running on it goes on). Returns (old PID, new PID)."""
        old = self.kill_service(name)
        await asyncio.sleep(down_s)
        new = await asyncio.to_thread(self.start_service, name, timeout)
        return old, new

    def outputs(self) -> dict[str, str]:
        """Everything each service process wrote (both runs of a restarted one)."""
        return {name: process.output for name, process in self.stack.processes.items()}

    def _track(self) -> None:
        Reaper.get().track(f"stack-{self.env.namespace}", [p for p in self.pids().values() if p])


def start_deployment(infra: Infra, rabbit: PrivateRabbitMQ, postgres: PrivatePostgres,
                     **variables: str) -> Deployment:
    """Create a database and namespace on the private servers, start every service, create the profiles."""
    env = Env(infra, http_port=free_port(), admin_port=free_port(), mqtt_port=free_port(),
              mqtts_port=free_port(), coap_port=free_udp_port())
    env.extra.update({"MQTTS_PORT": "0", "PROVISION_TIMEOUT_S": f"{PROVISION_TIMEOUT_S:g}", **variables})
    _create_database(infra, env.database)
    stack = Stack(env.variables())
    deployment = Deployment(env, stack, Admin(env), rabbit, postgres)
    try:
        stack.start(timeout=90)
        deployment._track()
        deployment.initial_pids = {k: v for k, v in deployment.pids().items() if v is not None}
        deployment.profile = deployment.admin.create_profile()
        deployment.probe_profile = deployment.admin.create_profile()
    except BaseException:
        stop_deployment(deployment)
        raise
    return deployment


def stop_deployment(deployment: Deployment) -> None:
    """Stop every service process (SIGTERM, SIGKILL after 15 s); the database goes with the private server."""
    try:
        deployment.admin.http.close()
    finally:
        deployment.stack.stop()
        Reaper.get().untrack(f"stack-{deployment.env.namespace}")


@pytest.fixture
def deployment(infra: Infra, rabbit: PrivateRabbitMQ, postgres: PrivatePostgres) -> Iterator[Deployment]:
    """A fresh deployment for one test, on the module's private servers (healed first)."""
    heal(rabbit, postgres)
    running = start_deployment(infra, rabbit, postgres)
    try:
        yield running
    finally:
        if postgres.paused:  # a failed stall must not leave the services' shutdown hanging on the database
            postgres.resume()
        stop_deployment(running)


# --- probes: "every service answers" -------------------------------------------------------------------


def _probe_body(profile: dict[str, Any], transport: str) -> dict[str, Any]:
    return {"deviceName": f"probe-{transport}-{uuid.uuid4().hex[:10]}",
            "provisionDeviceKey": profile["provisionDeviceKey"],
            "provisionDeviceSecret": profile["provisionDeviceSecret"]}


async def probe_http(deployment: Deployment) -> dict[str, Any]:
    """A new device over the HTTP gateway (through the bus, the core and credentials)."""
    async with httpx.AsyncClient(timeout=PROVISION_TIMEOUT_S + 5) as client:
        response = await client.post(f"{deployment.http_url}/api/v1/provision",
                                     content=json.dumps(_probe_body(deployment.probe_profile, "http")))
        return {"status_code": response.status_code, **response.json()}


async def probe_mqtt(deployment: Deployment) -> dict[str, Any]:
    """A new device over the MQTT gateway, as ThingsBoard's example client provisions."""
    from tests.e2e import mqtt_clients

    payload = json.dumps(_probe_body(deployment.probe_profile, "mqtt")).encode()
    return json.loads(await mqtt_clients.raw_provision(deployment.env.mqtt_port, payload,
                                                        timeout=PROVISION_TIMEOUT_S + 5))


async def probe_coap(deployment: Deployment) -> dict[str, Any]:
    """A new device over the CoAP gateway (aiocoap client, as ThingsBoard's example)."""
    import aiocoap

    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        message = aiocoap.Message(code=aiocoap.POST, uri=f"coap://127.0.0.1:{deployment.env.coap_port}/api/v1/provision",
                                  payload=json.dumps(_probe_body(deployment.probe_profile, "coap")).encode())
        response = await asyncio.wait_for(context.request(message).response, PROVISION_TIMEOUT_S + 10)
        return {"code": str(response.code), **json.loads(response.payload or b"{}")}
    finally:
        await context.shutdown()


async def probe_admin(deployment: Deployment) -> dict[str, Any]:
    """The admin API reads a profile from the database."""
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{deployment.env.admin_url}/api/device-profiles/{deployment.profile['id']}",
                                    headers={"Authorization": f"Bearer {deployment.env.admin_token}"})
        return {"status_code": response.status_code}


async def wait_services_back(deployment: Deployment, timeout: float = 60.0) -> dict[str, float]:
    """Poll until a new device provisions over HTTP, MQTT and CoAP and the admin API answers
    (``provisioning_core`` and ``credentials`` answer inside each provision). Returns the seconds each
    took; raises AssertionError naming what never came back and its last answer."""
    began = time.monotonic()
    probes = {"http": probe_http, "mqtt": probe_mqtt, "coap": probe_coap, "admin": probe_admin}
    back: dict[str, float] = {}
    last: dict[str, Any] = {}
    while time.monotonic() - began < timeout and len(back) < len(probes):
        for name, probe in probes.items():
            if name in back:
                continue
            try:
                answer = await probe(deployment)
            except Exception as exc:  # noqa: BLE001 - not back yet
                last[name] = f"{type(exc).__name__}: {exc}"[:200]
                continue
            last[name] = answer
            ok = answer.get("status_code") == 200 if name == "admin" else answer.get("status") == "SUCCESS"
            if ok:
                back[name] = round(time.monotonic() - began, 2)
        if len(back) < len(probes):
            await asyncio.sleep(0.5)
    missing = {name: last.get(name) for name in probes if name not in back}
    assert not missing, f"not back after {timeout:g}s: {missing}"
    return back


def assert_same_processes(deployment: Deployment, restarted: set[str]) -> None:
    """Every service that was not deliberately killed still runs with the PID it started with."""
    changed = {}
    for name, pid in deployment.initial_pids.items():
        if name in restarted:
            continue
        now = deployment.pid(name)
        if now != pid:
            proc = deployment.stack[name].proc
            changed[name] = {"started_as": pid, "now": now,
                             "exit_code": proc.returncode if proc is not None else None}
    assert not changed, f"services that died or were replaced without being killed by the test: {changed}"
