"""``python -m mqtt_gateway``: listen on MQTT_PORT and MQTTS_PORT until SIGTERM."""

from __future__ import annotations

from provisioning_common import metrics, runtime
from provisioning_common.transport_api import TransportApi

from .server import MqttGateway


async def start(context: runtime.Context) -> runtime.Running:
    settings = context.settings
    gateway = MqttGateway(TransportApi(await context.bus(), settings, service="mqtt_gateway"), settings)
    await gateway.start()  # logs "mqtt_gateway ready: <ports>"
    metrics.MQTT_CONNECTIONS.set_function(lambda: gateway.connections)
    return runtime.Running(stop=[lambda: gateway.stop(drain_timeout=settings.provision_timeout_s)], ready=None)


if __name__ == "__main__":
    runtime.run_service("mqtt_gateway", start)
