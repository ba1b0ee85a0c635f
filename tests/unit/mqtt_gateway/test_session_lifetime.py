"""What a provisioning session holds after its device left: nothing. The gateway and a real TCP client, with the
core behind the bus replaced by a fake that answers SUCCESS."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from mqtt_gateway.server import MqttGateway
from mqtt_gateway.session import MqttSession
from mqtt_gateway.tls import PlainConnection
from provisioning_common import mqtt_client_packets as client_codec
from provisioning_common import mqtt_packets as codec
from provisioning_common.models import ProvisionResult, ProvisionStatus
from provisioning_common.mqtt_topics import GATEWAY_REQUEST_TOPIC, GATEWAY_RESPONSE_TOPIC
from provisioning_common.settings import Settings
from provisioning_common.transport_api import TransportApi

from tests.ports import free_port


class AnsweringBus:
    """The one bus call a provision makes, answered SUCCESS at once."""

    async def call(self, method: Any, request: Any, **_: Any) -> ProvisionResult:
        return ProvisionResult(status=ProvisionStatus.SUCCESS, device_id="d-1", device_name=request.device_name,
                               credentials_type="ACCESS_TOKEN", credentials_value="token-1")


async def _provision(port: int, name: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(client_codec.encode_connect(name, username="provision", protocol_level=4))
        connack = await codec.read_packet(reader, max_packet_size=65536, protocol_level=4)
        assert isinstance(connack, codec.OtherPacket) and connack.body == b"\x00\x00"
        payload = b'{"deviceName":"%s","provisionDeviceKey":"k","provisionDeviceSecret":"s"}' % name.encode()
        writer.write(client_codec.encode_subscribe(1, [(GATEWAY_RESPONSE_TOPIC, 1)], protocol_level=4)
                     + codec.encode_publish(GATEWAY_REQUEST_TOPIC, payload, qos=1, packet_id=2, protocol_level=4))
        while True:
            packet = await codec.read_packet(reader, max_packet_size=65536, protocol_level=4)
            if isinstance(packet, codec.Publish):
                writer.write(codec.encode_puback(packet.packet_id or 0, protocol_level=4)
                             + client_codec.encode_disconnect_client())
                await writer.drain()
                return packet.payload
    finally:
        writer.close()


def _alive() -> list[object]:
    """Sessions, connections and their stream readers still in memory."""
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, MqttSession | PlainConnection | asyncio.StreamReader)]


async def test_a_provisioning_session_is_released_once_its_device_disconnects() -> None:
    """MQTT_PROVISION_CLOSE_S (60 s) closes a connection its device keeps open; a device that disconnects first
    must not leave its connection (streams, buffers, transport) alive until that timer fires: at 2,000 provisions/s
    that was 120,000 dead sessions, 30 MB more per 10,000 provisions, and ever longer garbage collections."""
    settings = Settings(mqtt_port=free_port(), mqtts_port=0, mqtt_provision_close_s=60)
    before = {id(o) for o in _alive()}  # other tests' objects in this process are theirs
    gateway = MqttGateway(TransportApi(AnsweringBus(), settings, service="mqtt_gateway"),  # type: ignore[arg-type]
                          settings)
    await gateway.start()
    try:
        answers = [await _provision(gateway.ports["mqtt"], f"device-{i}") for i in range(5)]
        assert all(b'"status":"SUCCESS"' in answer and b"token-1" in answer for answer in answers)
        # The positive signal first: the gateway saw every connection end.
        async with asyncio.timeout(10):
            while gateway.connections:
                await asyncio.sleep(0.01)
        assert [o for o in _alive() if id(o) not in before] == []
    finally:
        await gateway.stop(drain_timeout=1)
