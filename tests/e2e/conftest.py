"""End-to-end fixtures: a private database and bus namespace per test module, real service processes."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import httpx
import pytest
from devstack import Stack
from provisioning_common.secretbox import generate_key

from tests.conftest import Infra
from tests.ports import free_port, free_udp_port


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def _drop_namespace(rabbitmq_url: str, names: list[str]) -> None:
    conn = await aio_pika.connect(rabbitmq_url)
    async with conn:
        for name in names:
            channel = await conn.channel()
            with contextlib.suppress(Exception):  # not declared in this module: the channel closes
                await channel.queue_delete(name)
            channel = await conn.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(name)


async def drop_core_queue(rabbitmq_url: str, namespace: str) -> None:
    """Remove the core queue a lone gateway declared in its own namespace (no core ever consumed it)."""
    await _drop_namespace(rabbitmq_url, [f"{namespace}provisioning_core", f"{namespace}rpc.provisioning_core",
                                         f"{namespace}rpc.replies"])


@dataclass
class Env:
    """One isolated deployment: its database, bus namespace, ports and secrets."""

    infra: Infra
    database: str = field(default_factory=lambda: f"prov_e2e_{uuid.uuid4().hex[:12]}")
    namespace: str = field(default_factory=lambda: f"e2e-{uuid.uuid4().hex[:8]}.")
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    encryption_key: str = field(default_factory=generate_key)
    http_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    mqtt_port: int = field(default_factory=free_port)
    mqtts_port: int = field(default_factory=free_port)
    coap_port: int = field(default_factory=free_udp_port)
    extra: dict[str, str] = field(default_factory=dict)
    ca_file: Path | None = None

    @property
    def database_url(self) -> str:
        return _with_database(self.infra.postgres_url, self.database)

    def variables(self, **overrides: str) -> dict[str, str]:
        return {
            "RABBITMQ_URL": self.infra.rabbitmq_url,
            "DATABASE_URL": self.database_url,
            "BUS_NAMESPACE": self.namespace,
            "BIND_HOST": "127.0.0.1",
            "HTTP_PORT": str(self.http_port),
            "ADMIN_PORT": str(self.admin_port),
            "MQTT_PORT": str(self.mqtt_port),
            "MQTTS_PORT": str(self.mqtts_port),
            "COAP_PORT": str(self.coap_port),
            # Tests reconnect and check refusals quickly; ThingsBoard's 60 s would only slow them.
            "MQTT_PROVISION_CLOSE_S": "5",
            "ADMIN_API_TOKEN": self.admin_token,
            "DATA_ENCRYPTION_KEY": self.encryption_key,
            "PROVISION_TIMEOUT_S": "5",
            # Every test client is on loopback: the provisions limits' defaults (per source, per profile) would
            # refuse modules that provision hundreds of devices; tests/e2e/test_abuse_limits.py sets its own.
            "PROVISION_RATE_LIMIT_PER_SOURCE": "",
            "PROVISION_RATE_LIMIT_PER_PROFILE": "",
            "LOG_LEVEL": "INFO",
            **self.extra,
            **overrides,
        }

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


def _create_database(env: Env) -> None:
    async def create() -> None:
        conn = await asyncpg.connect(env.infra.postgres_url)
        try:
            await conn.execute(f'CREATE DATABASE "{env.database}"')
        finally:
            await conn.close()

    asyncio.run(create())


def _drop_database(env: Env) -> None:
    async def drop() -> None:
        conn = await asyncpg.connect(env.infra.postgres_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{env.database}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(drop())
    asyncio.run(
        _drop_namespace(
            env.infra.rabbitmq_url,
            [f"{env.namespace}{n}" for n in ("provisioning_core", "credentials", "device_api", "device.telemetry",
                                                    "device.attributes", "device.rpc", "device.downlink",
                                                    "credentials.internal", "rpc.provisioning_core", "rpc.credentials",
                                                    "rpc.credentials.internal", "rpc.device_api", "rpc.replies")],
        )
    )


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(server certificate, server key, CA certificate devices trust) for the MQTT TLS listener."""
    from provisioning_common.devcerts import generate_dev_certificate

    return generate_dev_certificate(tmp_path_factory.mktemp("mqtt-tls"))


@contextlib.contextmanager
def module_env(infra: Infra, tls_files: tuple[Path, Path, Path], **settings: str) -> Iterator[Env]:
    """A private database and bus namespace for one test module, the MQTT TLS listener's files, and the
    module's own ``settings`` (environment variables) on top. A module that needs some overrides ``env``:
    ``with module_env(infra, tls_files, NAME="value") as environment: yield environment``."""
    environment = Env(infra)
    environment.extra.update(MQTT_TLS_CERT_FILE=str(tls_files[0]), MQTT_TLS_KEY_FILE=str(tls_files[1]), **settings)
    environment.ca_file = tls_files[2]
    _create_database(environment)
    try:
        yield environment
    finally:
        _drop_database(environment)


@pytest.fixture(scope="module")
def env(infra: Infra, tls_files: tuple[Path, Path, Path]) -> Iterator[Env]:
    """A private database and bus namespace for one test module."""
    with module_env(infra, tls_files) as environment:
        yield environment


@pytest.fixture(scope="module")
def stack(env: Env) -> Iterator[Stack]:
    """Every service of the pipeline as a real process, for one test module."""
    running = Stack(env.variables()).start(timeout=60)
    try:
        yield running
    finally:
        running.stop()


class Admin:
    """A small client of the admin API's documented contract."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.http = httpx.Client(
            base_url=env.admin_url, headers={"Authorization": f"Bearer {env.admin_token}"}, timeout=10
        )

    def create_profile(self, strategy: str = "ALLOW_CREATE_NEW_DEVICES", **fields: Any) -> dict[str, Any]:
        body = {"name": f"profile-{uuid.uuid4().hex[:10]}", "provisionStrategy": strategy, **fields}
        response = self.http.post("/api/device-profiles", json=body)
        assert response.status_code == 201, response.text
        return response.json()

    def create_device(self, profile_id: str, name: str | None = None, **fields: Any) -> dict[str, Any]:
        body = {"name": name or f"dev-{uuid.uuid4().hex[:10]}", "deviceProfileId": profile_id, **fields}
        response = self.http.post("/api/devices", json=body)
        assert response.status_code == 201, response.text
        return response.json()


@pytest.fixture(scope="module")
def admin(env: Env, stack: Stack) -> Iterator[Admin]:
    client = Admin(env)
    yield client
    client.http.close()


@pytest.fixture(scope="module")
def http(env: Env, stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=env.http_url, timeout=15) as client:
        yield client


@pytest.fixture
def profile(admin: Admin) -> dict[str, Any]:
    """A fresh ALLOW_CREATE_NEW_DEVICES profile for one test."""
    return admin.create_profile()


@pytest.fixture
async def db(env: Env, stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the module's database, to check what was (not) written."""
    conn = await asyncpg.connect(env.database_url)
    try:
        yield conn
    finally:
        await conn.close()


def window_left_at_least(seconds: float) -> float:
    """Wait, when needed, for a fresh fixed one-minute window of the (system-wide) monotonic clock, the
    clock the gateways count failures in, so that a test that fills a window's budget does so inside one
    window (a minute ending mid-test resets the counts). Returns how long it waited."""
    left = 60 - time.monotonic() % 60
    if left >= seconds:
        return 0.0
    time.sleep(left + 0.5)
    return left + 0.5


def tb_request(profile: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "provisionDeviceKey": profile["provisionDeviceKey"],
        "provisionDeviceSecret": profile["provisionDeviceSecret"],
        **fields,
    }


ProfileFactory = Callable[..., dict[str, Any]]
