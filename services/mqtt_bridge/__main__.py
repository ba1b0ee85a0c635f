"""``python -m mqtt_bridge``: answer provision requests arriving on MQTT_BROKER_URL until SIGTERM.

Without MQTT_BROKER_URL it says so, reports ready and idles: a stack without an external broker
(``make up`` on a laptop) runs unchanged. ``HEALTH_PORT`` (when set) answers ``/live``, and ``/health``
while the bus and the broker are connected and the subscription was granted.
"""

from __future__ import annotations

import logging

from provisioning_common import runtime
from provisioning_common.transport_api import TransportApi

from .bridge import MqttBridge, parse_broker_url

log = logging.getLogger("mqtt_bridge")

#: How often the counters are logged (when they changed).
SUMMARY_INTERVAL_S = 60.0


async def start(context: runtime.Context) -> runtime.Running:
    settings = context.settings
    if settings.mqtt_broker_url is None or not settings.mqtt_broker_url.get_secret_value():
        log.info("mqtt_bridge disabled: MQTT_BROKER_URL unset")
        return runtime.Running(ready="(disabled)")
    broker = parse_broker_url(settings.mqtt_broker_url.get_secret_value())
    bridge = MqttBridge(TransportApi(await context.bus(), settings), settings, broker)
    await bridge.start()

    async def broker_check() -> bool:
        return bridge.connected

    return runtime.Running(
        checks=(broker_check,),
        background=[bridge.log_summary_every(SUMMARY_INTERVAL_S)],
        stop=[lambda: bridge.stop(drain_timeout=settings.provision_timeout_s)],
        # "mqtt_bridge ready" is logged once the subscription is granted; until then paho keeps retrying
        # (broker down, wrong password, ACL refusing the subscription: each is logged).
        ready=None,
    )


if __name__ == "__main__":
    runtime.run_service("mqtt_bridge", start)
