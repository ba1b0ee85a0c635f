"""examples/backend_consumer.py, the README's backend example, against the real stack: a device on the HTTP
gateway (ThingsBoard's HTTP device API, spoken with httpx) and the example's Backend on RabbitMQ exchange
telemetry, client attributes, a client-side RPC, a two-way and a one-way server-side RPC and a
shared-attribute push, so that the example cannot rot."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import aio_pika
import httpx
import pytest
from devstack import Stack

from .conftest import Admin, Env, tb_request

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "backend_consumer.py"
T = TypeVar("T")


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("backend_consumer", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and annotations resolve through sys.modules
    spec.loader.exec_module(module)
    return module


example = load_example()


@pytest.fixture(scope="module")
def stack(env: Env) -> Iterator[Stack]:
    services = ["credentials", "provisioning_core", "admin_api", "http_gateway"]
    running = Stack(env.variables(), services).start(timeout=60)
    try:
        yield running
    finally:
        running.stop()


class Recording(example.Backend):  # type: ignore[name-defined,misc]
    """The example's Backend, its uplink hooks recording what arrived (the defaults print it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.uplink: asyncio.Queue[tuple[str, str, Any]] = asyncio.Queue()

    async def on_telemetry(self, device_id: str, data: Any) -> None:
        self.uplink.put_nowait(("telemetry", device_id, data))

    async def on_attributes(self, device_id: str, attributes: dict[str, Any]) -> None:
        self.uplink.put_nowait(("attributes", device_id, attributes))


@pytest.fixture
async def backend(env: Env, stack: Stack) -> AsyncIterator[Recording]:
    connected = await Recording.connect(env.infra.rabbitmq_url, env.namespace)
    await connected.start()
    yield connected
    with contextlib.suppress(Exception):
        for name in (example.TELEMETRY, example.ATTRIBUTES, example.RPC_REQUESTS):
            await connected.channel.queue_delete(f"{env.namespace}backend.{name}")
    await connected.close()


@pytest.fixture
async def device(env: Env, admin: Admin, http: httpx.Client, profile: dict[str, Any]) -> AsyncIterator[
        tuple[str, httpx.AsyncClient]]:
    """A provisioned device: (its id, an HTTP client of the gateway at /api/v1/<its token>)."""
    name = f"dev-{uuid.uuid4().hex[:10]}"
    answer = http.post("/api/v1/provision", json=tb_request(profile, deviceName=name)).json()
    assert answer["status"] == "SUCCESS"
    [row] = admin.http.get("/api/devices", params={"textSearch": name}).json()["data"]
    async with httpx.AsyncClient(base_url=f"{env.http_url}/api/v1/{answer['credentialsValue']}", timeout=30) as client:
        yield row["id"], client


async def online(send: Callable[[], Awaitable[T]]) -> T:
    """``send()`` once the device's long poll has attached it (until then the example says DeviceOffline)."""
    for _ in range(200):
        try:
            return await send()
        except example.DeviceOffline:
            await asyncio.sleep(0.05)
    raise AssertionError("the device's long poll never attached it")


async def test_the_backend_gets_telemetry_and_attributes_and_answers_client_rpc(
    backend: Recording, device: tuple[str, httpx.AsyncClient]
) -> None:
    device_id, api = device
    assert (await api.post("/telemetry", json={"temperature": 21.5})).status_code == 200
    assert await asyncio.wait_for(backend.uplink.get(), 10) == ("telemetry", device_id, {"temperature": 21.5})
    assert (await api.post("/attributes", json={"firmware": "1.4"})).status_code == 200
    assert await asyncio.wait_for(backend.uplink.get(), 10) == ("attributes", device_id, {"firmware": "1.4"})

    answer = await api.post("/rpc", json={"method": "getTime", "params": {}})
    assert answer.status_code == 200 and isinstance(answer.json()["time"], int)
    unknown = await api.post("/rpc", json={"method": "launch", "params": {}})
    assert unknown.json() == {"error": "unknown method launch"}


async def test_the_backend_sends_server_rpcs_and_pushes_shared_attributes(
    backend: Recording, device: tuple[str, httpx.AsyncClient]
) -> None:
    device_id, api = device
    with pytest.raises(example.DeviceOffline):  # no poll open: the device has no session
        await backend.rpc(device_id, "getState")

    # Two-way: the device long-polls, gets {"id", "method", "params"} and answers on /rpc/{id}.
    poll = asyncio.create_task(api.get("/rpc", params={"timeout": 20_000}))
    asked = asyncio.create_task(online(lambda: backend.rpc(device_id, "getState", {"verbose": True})))
    request = (await poll).json()
    assert (request["method"], request["params"]) == ("getState", {"verbose": True})
    assert (await api.post(f"/rpc/{request['id']}", json={"state": "idle"})).status_code == 200
    assert await asyncio.wait_for(asked, 10) == {"state": "idle"}

    # One-way: handed to the poll; nothing to answer.
    poll = asyncio.create_task(api.get("/rpc", params={"timeout": 20_000}))
    await online(lambda: backend.rpc_oneway(device_id, "blink", [1, 2]))
    request = (await poll).json()
    assert (request["method"], request["params"]) == ("blink", [1, 2])

    # A shared-attribute push reaches the attribute-updates poll.
    poll = asyncio.create_task(api.get("/attributes/updates", params={"timeout": 20_000}))
    await online(lambda: backend.push_shared_attributes(device_id, {"targetTemperature": 19}))
    update = await poll
    assert update.status_code == 200 and json.loads(update.content) == {"targetTemperature": 19}


def test_the_example_runs_as_a_script(env: Env, stack: Stack) -> None:
    """``python examples/backend_consumer.py --help`` as the README shows it (argument parsing, imports)."""
    import subprocess

    result = subprocess.run([sys.executable, str(EXAMPLE), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "--namespace" in result.stdout, result.stderr


async def test_zz_queues_of_the_example_are_gone(env: Env) -> None:
    """The example's durable queues were deleted after each test (the module's namespace is dropped too)."""
    connection = await aio_pika.connect(env.infra.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(aio_pika.exceptions.ChannelClosed):
            await channel.declare_queue(f"{env.namespace}backend.{example.TELEMETRY}", passive=True)
