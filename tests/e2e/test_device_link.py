"""Downlink routing on a real RabbitMQ: a message for a device reaches the gateway instance whose
session holds it, whichever instance that is; a device with no session is unroutable (offline)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest
from provisioning_common.bus import Bus, NoRoute, RpcTimeout
from provisioning_common.contract import DOWNLINK_ATTRIBUTES, DOWNLINK_EXCHANGE, DOWNLINK_RPC
from provisioning_common.device_link import DeviceLinks, Downlink
from provisioning_common.settings import Settings

from tests.conftest import Infra


@pytest.fixture
async def buses(infra: Infra) -> AsyncIterator[tuple[Bus, Bus, Bus]]:
    settings = Settings(rabbitmq_url=infra.rabbitmq_url, bus_namespace=f"e2e-link-{uuid.uuid4().hex[:8]}.")
    opened = [await Bus.connect(settings, name) for name in ("gateway-a", "gateway-b", "operator")]
    yield opened[0], opened[1], opened[2]
    for bus in opened:
        await bus.close()


def collector() -> tuple[list[Downlink], asyncio.Event, object]:
    got: list[Downlink] = []
    arrived = asyncio.Event()

    def sink(message: Downlink) -> None:
        got.append(message)
        arrived.set()

    return got, arrived, sink


async def test_two_way_rpc_reaches_the_instance_holding_the_device_and_the_answer_comes_back(
    buses: tuple[Bus, Bus, Bus],
) -> None:
    bus_a, bus_b, operator = buses
    links_a, links_b = DeviceLinks(bus_a, "gw-a"), DeviceLinks(bus_b, "gw-b")
    got_a, _, sink_a = collector()
    got_b, arrived_b, sink_b = collector()
    await links_a.attach("device-a", sink_a)  # type: ignore[arg-type]
    await links_b.attach("device-b", sink_b)  # type: ignore[arg-type]

    call = json.dumps({"method": "reboot", "params": {"delay": 1}}).encode()
    asked = asyncio.create_task(operator.ask(DOWNLINK_EXCHANGE, "device-b", call, timeout=5, type=DOWNLINK_RPC))
    await asyncio.wait_for(arrived_b.wait(), 5)
    [request] = got_b
    assert request.two_way and request.body == {"method": "reboot", "params": {"delay": 1}}
    assert 0 < request.seconds_left(99) <= 5
    assert await links_b.answer(request, b'{"ok":true}')
    assert await asyncio.wait_for(asked, 5) == b'{"ok":true}'
    assert got_a == []  # the other instance never saw it


async def test_a_device_without_session_is_offline_and_detach_unbinds(buses: tuple[Bus, Bus, Bus]) -> None:
    bus_a, _, operator = buses
    links = DeviceLinks(bus_a, "gw-a")
    with pytest.raises(NoRoute):
        await operator.publish(DOWNLINK_EXCHANGE, "nobody", b'{"method":"x"}', type=DOWNLINK_RPC, mandatory=True)
    got, arrived, sink = collector()
    one = await links.attach("device-1", sink)  # type: ignore[arg-type]
    two = await links.attach("device-1", sink)  # type: ignore[arg-type]  # a second session of the same device
    await operator.publish(DOWNLINK_EXCHANGE, "device-1", b'{"shared":1}', type=DOWNLINK_ATTRIBUTES, mandatory=True)
    await asyncio.wait_for(arrived.wait(), 5)
    assert len(got) == 2 and got[0].kind == DOWNLINK_ATTRIBUTES and got[0].body == {"shared": 1}
    await links.detach(one)
    await operator.publish(DOWNLINK_EXCHANGE, "device-1", b'{"shared":2}', type=DOWNLINK_ATTRIBUTES, mandatory=True)
    await links.detach(two)
    with pytest.raises(NoRoute):
        await operator.publish(DOWNLINK_EXCHANGE, "device-1", b'{"shared":3}', type=DOWNLINK_ATTRIBUTES, mandatory=True)
    assert links.attached_devices == 0


async def test_an_unanswered_rpc_times_out_and_malformed_messages_are_dropped(buses: tuple[Bus, Bus, Bus]) -> None:
    bus_a, _, operator = buses
    links = DeviceLinks(bus_a, "gw-a")
    got, arrived, sink = collector()
    await links.attach("device-1", sink)  # type: ignore[arg-type]
    await operator.publish(DOWNLINK_EXCHANGE, "device-1", b"not json", type=DOWNLINK_RPC)
    await operator.publish(DOWNLINK_EXCHANGE, "device-1", b'{"params":1}', type=DOWNLINK_RPC)  # no method
    await operator.publish(DOWNLINK_EXCHANGE, "device-1", b'{"a":1}', type="unknown")
    with pytest.raises(RpcTimeout):
        await operator.ask(DOWNLINK_EXCHANGE, "device-1", b'{"method":"slow"}', timeout=0.5, type=DOWNLINK_RPC)
    # Messages are consumed in order: the valid one arrived after the three malformed ones were dropped.
    await asyncio.wait_for(arrived.wait(), 5)
    assert [m.body for m in got] == [{"method": "slow"}]
    assert got[0].expired()
    assert not await links.answer(got[0], b"{}")  # nobody waits any more
