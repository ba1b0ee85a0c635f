"""``python -m mqtt_bridge``: answer provision requests arriving on MQTT_BROKER_URL until SIGTERM.

Without MQTT_BROKER_URL it says so, reports ready and idles: a stack without an external broker
(``make up`` on a laptop) runs unchanged. ``HEALTH_PORT`` (when set) answers ``/live``, and ``/health``
while the bus and the broker are connected and the subscription was granted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from provisioning_common import runtime
from provisioning_common.bus import Bus
from provisioning_common.health import bus_check, start_if_configured
from provisioning_common.settings import Settings
from provisioning_common.transport_api import TransportApi

from .bridge import MqttBridge, parse_broker_url

log = logging.getLogger("mqtt_bridge")

#: How often the counters are logged (when they changed).
SUMMARY_INTERVAL_S = 60.0


async def main(settings: Settings, stop: asyncio.Event) -> None:
    if settings.mqtt_broker_url is None or not settings.mqtt_broker_url.get_secret_value():
        log.info("mqtt_bridge disabled: MQTT_BROKER_URL unset")
        runtime.announce_ready("mqtt_bridge", "(disabled)")
        health = await start_if_configured(settings)
        await stop.wait()
        if health is not None:
            health.close()
        return
    broker = parse_broker_url(settings.mqtt_broker_url.get_secret_value())
    bus = await Bus.connect(settings)
    bridge = MqttBridge(TransportApi(bus, settings), settings, broker)
    await bridge.start()

    async def broker_check() -> bool:
        return bridge.connected

    health = await start_if_configured(settings, bus_check(bus), broker_check)
    # "mqtt_bridge ready" is logged once the subscription is granted; until then paho keeps retrying
    # (broker down, wrong password, ACL refusing the subscription: each is logged).
    summary = asyncio.create_task(bridge.log_summary_every(SUMMARY_INTERVAL_S))
    await stop.wait()
    if health is not None:
        health.close()
    summary.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await summary
    await bridge.stop(drain_timeout=settings.provision_timeout_s)
    await bus.close()


if __name__ == "__main__":
    runtime.run("mqtt_bridge", main)
