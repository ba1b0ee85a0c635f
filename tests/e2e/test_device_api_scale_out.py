"""Two MQTT gateway instances on one bus (issue 12): downlink reaches the device whichever instance holds it.

Each gateway process binds its own downlink queue by device id while a session holds the device, so a
server-side RPC or a shared-attribute update sent through the admin API reaches the instance that has the
device, and only it. An instance killed with SIGKILL takes its queue (exclusive) with it: its sessions end,
devices on the other instance keep working, and an RPC to a device that was on the killed instance is
answered 409 (offline) at once instead of waiting in a queue nobody reads.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from devstack import Stack
from provisioning_common.bus import Bus, NoRoute
from provisioning_common.contract import DOWNLINK_ATTRIBUTES, DOWNLINK_EXCHANGE
from provisioning_common.settings import Settings

from tests.ports import free_port, free_udp_port

from . import mqtt_clients as mc
from .conftest import Admin, Env, tb_request
from .test_device_api_mqtt import SDK_FILTERS, PahoDevice, server_rpc, set_shared
from .test_http_provisioning import device_by_name

WAIT = 15.0


@pytest.fixture(scope="module")
def second(env: Env, stack: Stack) -> Iterator[tuple[Stack, int]]:
    """A second MQTT gateway in the same bus namespace."""
    port = free_port()
    variables = env.variables(MQTT_PORT=str(port), MQTTS_PORT="0", HTTP_PORT=str(free_port()),
                              ADMIN_PORT=str(free_port()), COAP_PORT=str(free_udp_port()))
    running = Stack(variables, ["mqtt_gateway"]).start(timeout=60)
    try:
        yield running, port
    finally:
        running.stop()


async def _device(env: Env, admin: Admin, profile: dict[str, Any], port: int, tag: str) -> tuple[PahoDevice, str]:
    name = f"{tag}-{uuid.uuid4().hex[:6]}"
    answer = await asyncio.to_thread(mc.provision_json, env.mqtt_port, tb_request(profile, deviceName=name))
    device = await _connect(port, answer["credentialsValue"], mc.V311)
    return device, device_by_name(admin, name)["id"]


async def _connect(port: int, token: str, protocol: int) -> PahoDevice:
    device = PahoDevice(asyncio.get_running_loop(), protocol)
    device.token = token  # type: ignore[attr-defined]
    await asyncio.to_thread(device.start, port, username=token)
    assert await device.subscribe(SDK_FILTERS) == [1, 1, 1, 1]
    return device


async def _rpc_round_trip(device: PahoDevice, admin: Admin, device_id: str, method: str) -> None:
    call = asyncio.create_task(server_rpc(admin, device_id, method, {"id": device_id}))
    topic, request = await device.receive("v1/devices/me/rpc/request/")
    assert request == {"method": method, "params": {"id": device_id}}
    assert await device.publish(topic.replace("/request/", "/response/"), {"from": device_id}) == 0
    assert await call == (200, {"from": device_id})


async def test_rpc_and_attribute_updates_reach_the_device_on_either_instance(
    env: Env, stack: Stack, second: tuple[Stack, int], admin: Admin, profile: dict[str, Any]
) -> None:
    devices = [await _device(env, admin, profile, port, tag) for port, tag in
               [(env.mqtt_port, "a1"), (second[1], "b1"), (env.mqtt_port, "a2"), (second[1], "b2")]]
    try:
        for device, device_id in devices:
            await _rpc_round_trip(device, admin, device_id, "whereAmI")
        for i, (_, device_id) in enumerate(devices):
            set_shared(admin, device_id, {"slot": i})
        for i, (device, _) in enumerate(devices):
            # Each device gets its own update and nobody else's (the next message of each is its own).
            assert await device.receive("v1/devices/me/attributes") == ("v1/devices/me/attributes", {"slot": i})
    finally:
        for device, _ in devices:
            device.stop()


async def test_a_killed_instance_ends_its_sessions_and_strands_nothing(
    env: Env, stack: Stack, second: tuple[Stack, int], admin: Admin, profile: dict[str, Any]
) -> None:
    survivor, survivor_id = await _device(env, admin, profile, env.mqtt_port, "keep")
    victim, victim_id = await _device(env, admin, profile, second[1], "lost")
    victim.client.reconnect_delay_set(60, 120)  # stay down: the killed instance's port is gone anyway
    operator = await Bus.connect(Settings(rabbitmq_url=env.infra.rabbitmq_url, bus_namespace=env.namespace),
                                 "test-operator")
    try:
        await _rpc_round_trip(victim, admin, victim_id, "beforeKill")
        gateway = second[0]["mqtt_gateway"]
        gateway.signal(signal.SIGKILL)
        assert await asyncio.to_thread(gateway.proc.wait, WAIT) == -signal.SIGKILL  # type: ignore[union-attr]
        # Its sessions ended with it.
        assert await asyncio.to_thread(victim.disconnected.wait, WAIT)
        # Positive signal that the broker dropped the dead instance's queue (and so its bindings): a
        # mandatory message for the victim becomes unroutable. Until then it would have reached that queue.
        deadline = time.monotonic() + WAIT
        while True:
            try:
                await operator.publish(DOWNLINK_EXCHANGE, victim_id, b'{"probe":1}', type=DOWNLINK_ATTRIBUTES,
                                       mandatory=True)
            except NoRoute:
                break
            assert time.monotonic() < deadline, "the killed instance's downlink queue outlived it"
            await asyncio.sleep(0.05)
        # The device of the killed instance is offline: 409 at once, although the caller would wait 30 s.
        started = time.monotonic()
        status, body = await server_rpc(admin, victim_id, "afterKill", {}, timeout_ms=30_000)
        assert status == 409, body
        assert time.monotonic() - started < 10
        # A shared attribute set meanwhile is stored and waits for the device's next request.
        set_shared(admin, victim_id, {"missed": True})
        # The other instance's devices are untouched.
        await _rpc_round_trip(survivor, admin, survivor_id, "afterKill")
        set_shared(admin, survivor_id, {"still": "here"})
        assert await survivor.receive("v1/devices/me/attributes") == ("v1/devices/me/attributes", {"still": "here"})
        # The victim comes back through the surviving instance: reachable again, and it reads what it missed.
        victim.stop()
        returned = await _connect(env.mqtt_port, victim.token, mc.V5)  # type: ignore[attr-defined]
        try:
            await _rpc_round_trip(returned, admin, victim_id, "afterReconnect")
            assert await returned.publish("v1/devices/me/attributes/request/1", {"sharedKeys": "missed"}) == 0
            assert await returned.receive("v1/devices/me/attributes/response/") == (
                "v1/devices/me/attributes/response/1", {"shared": {"missed": True}})
        finally:
            returned.stop()
    finally:
        await operator.close()
        survivor.stop()
        victim.stop()
        gateway = second[0]["mqtt_gateway"]
        if gateway.proc is not None and gateway.proc.poll() is not None:
            gateway.start()  # leave the module's second instance whole
            await asyncio.to_thread(gateway.wait_ready, 30)

