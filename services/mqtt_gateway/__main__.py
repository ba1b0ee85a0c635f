"""``python -m mqtt_gateway``: listen on MQTT_PORT and MQTTS_PORT until SIGTERM."""

from __future__ import annotations

import asyncio

from provisioning_common import runtime
from provisioning_common.bus import Bus
from provisioning_common.health import bus_check, start_if_configured
from provisioning_common.settings import Settings
from provisioning_common.transport_api import TransportApi

from .server import MqttGateway


async def main(settings: Settings, stop: asyncio.Event) -> None:
    bus = await Bus.connect(settings)
    gateway = MqttGateway(TransportApi(bus, settings), settings)
    await gateway.start()
    health = await start_if_configured(settings, bus_check(bus))
    await stop.wait()
    if health is not None:
        health.close()
    await gateway.stop(drain_timeout=settings.provision_timeout_s)
    await bus.close()


if __name__ == "__main__":
    runtime.run("mqtt_gateway", main)
