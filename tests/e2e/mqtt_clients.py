"""MQTT clients for the e2e tests: paho-mqtt used exactly as ThingsBoard's example scripts use it."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

V31, V311, V5 = mqtt.MQTTv31, mqtt.MQTTv311, mqtt.MQTTv5


@dataclass
class TlsOptions:
    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None


@dataclass
class Client:
    """A paho client with its connection result and received messages collected."""

    client: mqtt.Client
    connected: threading.Event = field(default_factory=threading.Event)
    disconnected: threading.Event = field(default_factory=threading.Event)
    reason_code: Any = None
    messages: list[mqtt.MQTTMessage] = field(default_factory=list)
    got_message: threading.Event = field(default_factory=threading.Event)
    subscribed: threading.Event = field(default_factory=threading.Event)
    granted: list[Any] = field(default_factory=list)

    def stop(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def connect(
    port: int,
    *,
    username: str | None = None,
    password: str | None = None,
    client_id: str | None = None,
    protocol: int = V311,
    tls: TlsOptions | None = None,
    timeout: float = 10.0,
) -> Client:
    """Connect and wait for CONNACK; ``reason_code`` holds the server's answer (0 / Success = accepted)."""
    paho = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id if client_id is not None else f"c-{uuid.uuid4().hex[:10]}",
        protocol=protocol,
    )
    wrapper = Client(paho)
    if username is not None:
        paho.username_pw_set(username, password)
    if tls is not None:
        paho.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file,
                     tls_version=ssl.PROTOCOL_TLS_CLIENT)

    def on_connect(_c: Any, _u: Any, _flags: Any, reason_code: Any, _p: Any = None) -> None:
        wrapper.reason_code = reason_code
        wrapper.connected.set()

    def on_message(_c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        wrapper.messages.append(message)
        wrapper.got_message.set()

    def on_subscribe(_c: Any, _u: Any, _mid: Any, reason_codes: Any, _p: Any = None) -> None:
        wrapper.granted = list(reason_codes)
        wrapper.subscribed.set()

    def on_disconnect(*_args: Any) -> None:
        wrapper.disconnected.set()
        wrapper.connected.set()

    paho.on_connect, paho.on_message, paho.on_subscribe = on_connect, on_message, on_subscribe
    paho.on_disconnect = on_disconnect
    paho.connect("127.0.0.1" if tls is None else "localhost", port, keepalive=60)
    paho.loop_start()
    if not wrapper.connected.wait(timeout):
        wrapper.stop()
        raise AssertionError("no CONNACK")
    return wrapper


def accepted(client: Client) -> bool:
    code = client.reason_code
    return code is not None and not getattr(code, "is_failure", bool(code)) and not client.disconnected.is_set()


#: paho 2 reports a 3.1.1 CONNACK "not authorized" (5) as the MQTT 5 reason code 0x87.
NOT_AUTHORIZED = 0x87


def refusal_value(client: Client) -> int:
    code = client.reason_code
    return int(getattr(code, "value", code))


def provision(
    port: int,
    request: dict[str, Any] | bytes,
    *,
    protocol: int = V311,
    qos: int = 1,
    subscribe_qos: int | None = 1,
    tls: TlsOptions | None = None,
    timeout: float = 10.0,
) -> mqtt.MQTTMessage:
    """ThingsBoard's example: connect as "provision", subscribe, publish the request, wait for the answer."""
    client = connect(port, username="provision", protocol=protocol, tls=tls)
    try:
        assert accepted(client), client.reason_code
        if subscribe_qos is not None:
            client.client.subscribe("/provision/response", qos=subscribe_qos)
            assert client.subscribed.wait(timeout)
        payload = request if isinstance(request, bytes) else json.dumps(request)
        client.client.publish("/provision/request", payload, qos=qos)
        if not client.got_message.wait(timeout):
            raise AssertionError("no provision response")
        return client.messages[0]
    finally:
        client.stop()


def provision_json(port: int, request: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return json.loads(provision(port, request, **kwargs).payload)


def raw_connect(port: int, packet: bytes, *, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(packet)
    return sock


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection (raises on timeout)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


async def raw_provision(port: int, payload: bytes, *, timeout: float = 10.0) -> bytes:
    """Provision over plain asyncio streams with our packet encoders (no paho: paho's select() loop cannot
    handle file descriptors above 1024, which a test holding thousands of sockets has)."""
    import asyncio

    from provisioning_common import mqtt_client_packets as client_codec
    from provisioning_common import mqtt_packets as codec

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(client_codec.encode_connect(f"raw-{uuid.uuid4().hex[:8]}", username="provision"))
        writer.write(client_codec.encode_subscribe(1, [("/provision/response", 1)]))
        writer.write(codec.encode_publish("/provision/request", payload, qos=1, packet_id=2))
        async with asyncio.timeout(timeout):
            while True:
                packet = await codec.read_packet(reader, max_packet_size=1 << 20, protocol_level=4)
                if isinstance(packet, codec.Publish):
                    return packet.payload
    finally:
        writer.close()
