"""ThingsBoard's MQTT device API after provisioning (issue 12), with ThingsBoard's own Python SDK and raw paho.

The device is real firmware code: ``tb_device_mqtt.TBDeviceMqttClient`` (PyPI ``tb-mqtt-client``) provisions
itself, connects exactly as its README shows, and keeps its session: telemetry and client attributes reach
RabbitMQ (``device.telemetry`` / ``device.attributes``) and the admin API, attribute requests are answered,
shared attributes set through the admin API arrive at once, a server-side RPC sent through the admin API is
answered by the SDK's handler, and a client-side RPC is answered by a backend consumer on ``device.rpc``
(aio-pika, as an operator's backend would be) - over plain MQTT and TLS, then the same flows with paho at
MQTT 3.1.1 and 5 and with MQTT_BASIC and X.509 credentials. Bad input gets ThingsBoard's answers, stores
nothing and leaves every other session alone.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import paho.mqtt.client as mqtt
import pytest
from devstack import Stack
from mqtt_gateway import codec
from paho.mqtt.enums import CallbackAPIVersion
from provisioning_common import mqtt_client_packets as client_codec
from tb_device_mqtt import TBDeviceMqttClient, TBPublishInfo

from tests.pki import issue, write_client_files

from . import mqtt_clients as mc
from .conftest import Admin, Env, tb_request
from .test_http_provisioning import device_by_name

#: What ThingsBoard's SDK subscribes to right after CONNACK.
SDK_FILTERS = ["v1/devices/me/attributes", "v1/devices/me/attributes/response/+", "v1/devices/me/rpc/request/+",
               "v1/devices/me/rpc/response/+"]
WAIT = 15.0
#: Every token and password this module's devices used: none may appear in a log line.
SECRETS: set[str] = set()


# --- the operator's backend on RabbitMQ ------------------------------------------------------------------


class Tap:
    """A private queue bound to one of the device-data exchanges for one device id."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()

    async def put(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.messages.put_nowait(message)

    async def next(self, timeout: float = WAIT) -> Any:
        message = await asyncio.wait_for(self.messages.get(), timeout)
        return json.loads(message.body)

    def empty(self) -> bool:
        return self.messages.empty()


class Backend:
    """What an operator's backend does with aio-pika: read device data, answer client-side RPCs."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.rpc_calls: list[tuple[str, dict[str, Any]]] = []

    def exchange_name(self, name: str) -> str:
        return f"{self.env.namespace}{name}"

    async def start(self) -> None:
        self.connection = await aio_pika.connect(self.env.infra.rabbitmq_url)
        self.channel = await self.connection.channel()
        rpc = await self.channel.declare_exchange(self.exchange_name("device.rpc"), aio_pika.ExchangeType.TOPIC,
                                                  durable=True)
        queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(rpc, routing_key="#")
        await queue.consume(self._answer)

    async def _answer(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with message.process():
            call = json.loads(message.body)
            self.rpc_calls.append((message.routing_key or "", call))
            answer = {"answeredBy": "backend", "method": call["method"], "params": call["params"],
                      "device": message.routing_key}
            await self.channel.default_exchange.publish(
                aio_pika.Message(json.dumps(answer).encode(), correlation_id=message.correlation_id),
                routing_key=message.reply_to or "")

    async def tap(self, exchange: str, device_id: str) -> Tap:
        tap = Tap()
        declared = await self.channel.declare_exchange(self.exchange_name(exchange), aio_pika.ExchangeType.TOPIC,
                                                       durable=True)
        queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(declared, routing_key=device_id)
        await queue.consume(tap.put, no_ack=True)
        return tap

    async def close(self) -> None:
        await self.connection.close()


@pytest.fixture(scope="module")
async def backend(env: Env, stack: Stack) -> AsyncIterator[Backend]:
    running = Backend(env)
    await running.start()
    yield running
    await running.close()


def client_attributes(admin: Admin, device_id: str) -> dict[str, Any]:
    response = admin.http.get(f"/api/devices/{device_id}/attributes/client")
    assert response.status_code == 200, response.text
    return {item["key"]: item["value"] for item in response.json()}


def set_shared(admin: Admin, device_id: str, values: dict[str, Any]) -> None:
    response = admin.http.post(f"/api/devices/{device_id}/attributes/shared", json=values)
    assert response.status_code == 200, response.text


async def server_rpc(admin: Admin, device_id: str, method: str, params: Any, *, oneway: bool = False,
                     timeout_ms: int = 10_000) -> tuple[int, Any]:
    """POST /api/devices/{id}/rpc from a thread (it waits for the device): (status, JSON body)."""
    response = await asyncio.to_thread(admin.http.post, f"/api/devices/{device_id}/rpc", json={
        "method": method, "params": params, "timeout": timeout_ms, "oneway": oneway}, timeout=timeout_ms / 1000 + 5)
    return response.status_code, response.json()


# --- ThingsBoard's SDK as the device --------------------------------------------------------------------


class SdkDevice:
    """``TBDeviceMqttClient`` used as its README shows, with its callbacks forwarded to the test's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int, token: str) -> None:
        self.loop = loop
        self.client = TBDeviceMqttClient(host, port=port, username=token)
        self.connects = 0
        self.disconnects = 0
        self.rpc_requests: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.updates: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        paho = self.client._client
        on_connect, on_disconnect = paho.on_connect, paho.on_disconnect

        def counting_connect(*args: Any) -> None:
            self.connects += 1
            on_connect(*args)

        def counting_disconnect(*args: Any) -> None:
            self.disconnects += 1
            on_disconnect(*args)

        paho.on_connect, paho.on_disconnect = counting_connect, counting_disconnect
        self.client.set_server_side_rpc_request_handler(self._on_rpc)
        self.client.subscribe_to_all_attributes(self._on_update)

    def _on_rpc(self, request_id: str, body: Any) -> None:
        # The firmware's handler: answer every call with what it was asked.
        self.client.send_rpc_reply(request_id, {"handledBy": "sdk", "method": body["method"],
                                                "params": body["params"]})
        self.loop.call_soon_threadsafe(self.rpc_requests.put_nowait, (request_id, body))

    def _on_update(self, content: dict[str, Any], exception: Any) -> None:
        self.loop.call_soon_threadsafe(self.updates.put_nowait, content)

    def callback(self) -> tuple[asyncio.Future[Any], Callable[..., None]]:
        """A future and an SDK callback that resolves it with the callback's ``content`` argument."""
        future: asyncio.Future[Any] = self.loop.create_future()

        def done(*args: Any) -> None:
            content, exception = (args[1], args[2]) if len(args) == 3 else (args[0], args[1])
            result = exception if exception is not None else content
            self.loop.call_soon_threadsafe(lambda: future.done() or future.set_result(result))

        return future, done

    async def wait_configured(self) -> None:
        """Connected, and its own getSessionLimits answered: it subscribed before asking, and the gateway
        handles a session's packets in order, so its subscriptions are in place."""
        deadline = time.monotonic() + WAIT
        while not (self.client.is_connected() and self.client.rate_limits_received):
            assert time.monotonic() < deadline, "the SDK did not get its session limits"
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        self.client.stop()
        self.client.disconnect()


def sdk_provision(env: Env, profile: dict[str, Any], name: str) -> dict[str, Any]:
    credentials = TBDeviceMqttClient.provision("127.0.0.1", profile["provisionDeviceKey"],
                                               profile["provisionDeviceSecret"], port=env.mqtt_port,
                                               device_name=name)
    assert credentials is not None and credentials["status"] == "SUCCESS", credentials
    SECRETS.add(credentials["credentialsValue"])
    return credentials


async def sdk_flows(device: SdkDevice, device_id: str, admin: Admin, backend: Backend) -> None:
    """Everything the issue asks of the SDK, on one session (the README's calls)."""
    client = device.client
    telemetry, attributes = await backend.tap("device.telemetry", device_id), await backend.tap(
        "device.attributes", device_id)

    # getSessionLimits, asked by the SDK itself on connect, and once more here: the limits we enforce.
    limits_future, limits_callback = device.callback()
    client.request_service_configuration(limits_callback)
    limits = await asyncio.wait_for(limits_future, WAIT)
    assert limits["maxPayloadSize"] == 65536 - 74 and limits["maxInflightMessages"] == 100
    assert limits["rateLimits"]["messages"] == "100:1,3000:60"

    # Telemetry and client attributes, as the README sends them.
    result = client.send_telemetry({"temperature": 41.9, "enabled": False})
    assert await asyncio.to_thread(result.get) == TBPublishInfo.TB_ERR_SUCCESS
    assert await telemetry.next() == [{"temperature": 41.9, "enabled": False}]
    result = client.send_attributes({"firmwareVersion": "v1.2.2", "model": "sdk"})
    assert await asyncio.to_thread(result.get) == TBPublishInfo.TB_ERR_SUCCESS
    assert await attributes.next() == {"firmwareVersion": "v1.2.2", "model": "sdk"}
    assert client_attributes(admin, device_id) == {"firmwareVersion": "v1.2.2", "model": "sdk"}

    # A shared attribute set through the admin API arrives at once, and reads back with the client ones.
    set_shared(admin, device_id, {"targetTemperature": 22.5})
    assert await asyncio.wait_for(device.updates.get(), WAIT) == {"targetTemperature": 22.5}
    answer_future, answer_callback = device.callback()
    client.request_attributes(client_keys=["firmwareVersion"], shared_keys=["targetTemperature"],
                              callback=answer_callback)
    assert await asyncio.wait_for(answer_future, WAIT) == {"client": {"firmwareVersion": "v1.2.2"},
                                                           "shared": {"targetTemperature": 22.5}}

    # A server-side RPC through the admin API: the SDK's handler answers, the caller gets that answer.
    status, body = await server_rpc(admin, device_id, "setGpio", {"pin": 4, "value": 1})
    assert (status, body) == (200, {"handledBy": "sdk", "method": "setGpio", "params": {"pin": 4, "value": 1}})
    await asyncio.wait_for(device.rpc_requests.get(), WAIT)
    status, body = await server_rpc(admin, device_id, "blink", None, oneway=True)
    assert (status, body) == (200, {})
    _, oneway = await asyncio.wait_for(device.rpc_requests.get(), WAIT)
    assert oneway == {"method": "blink", "params": None}

    # A client-side RPC answered by the backend's consumer on device.rpc.
    rpc_future, rpc_callback = device.callback()
    client.send_rpc_call("getCurrentTime", {"zone": "UTC"}, rpc_callback)
    assert await asyncio.wait_for(rpc_future, WAIT) == {
        "answeredBy": "backend", "method": "getCurrentTime", "params": {"zone": "UTC"}, "device": device_id}


async def test_the_sdk_provisions_connects_and_keeps_its_session_for_a_minute(
    env: Env, stack: Stack, admin: Admin, backend: Backend, profile: dict[str, Any]
) -> None:
    """The issue's report, repaired: the README's default code, one session for a minute, every flow."""
    name = f"sdk-{uuid.uuid4().hex[:6]}"
    credentials = await asyncio.to_thread(sdk_provision, env, profile, name)
    device_id = device_by_name(admin, name)["id"]
    device = SdkDevice(asyncio.get_running_loop(), "127.0.0.1", env.mqtt_port, credentials["credentialsValue"])
    connected_at = time.monotonic()
    device.client.connect()
    try:
        await device.wait_configured()
        await sdk_flows(device, device_id, admin, backend)
        # Stay connected for a minute (SDK keep-alive pings meanwhile), then prove it is the same session.
        await asyncio.sleep(max(0.0, 60 - (time.monotonic() - connected_at)))
        status, body = await server_rpc(admin, device_id, "stillThere", {})
        assert status == 200 and body["method"] == "stillThere"
        assert device.client.is_connected()
        assert (device.connects, device.disconnects) == (1, 0)
    finally:
        device.stop()


async def test_the_sdk_over_tls(env: Env, stack: Stack, admin: Admin, backend: Backend,
                                profile: dict[str, Any]) -> None:
    name = f"sdk-tls-{uuid.uuid4().hex[:6]}"
    credentials = await asyncio.to_thread(sdk_provision, env, profile, name)
    device_id = device_by_name(admin, name)["id"]
    device = SdkDevice(asyncio.get_running_loop(), "localhost", env.mqtts_port, credentials["credentialsValue"])
    device.client.connect(tls=True, ca_certs=str(env.ca_file))  # the README's TLS call
    try:
        await device.wait_configured()
        await sdk_flows(device, device_id, admin, backend)
        assert (device.connects, device.disconnects) == (1, 0)
    finally:
        device.stop()


# --- raw paho, MQTT 3.1.1 and 5, each kind of credentials -----------------------------------------------


class PahoDevice:
    """paho-mqtt with what it receives forwarded to the test's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: int, *, client_id: str | None = None) -> None:
        self.loop = loop
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"paho-{uuid.uuid4().hex[:8]}",
                                  protocol=protocol)
        self.messages: asyncio.Queue[mqtt.MQTTMessage] = asyncio.Queue()
        self.acks: dict[int, int] = {}
        self.acked = threading.Condition()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.granted: asyncio.Queue[list[int]] = asyncio.Queue()
        self.client.on_message = lambda _c, _u, m: loop.call_soon_threadsafe(self.messages.put_nowait, m)
        self.client.on_subscribe = lambda _c, _u, _m, codes, _p: loop.call_soon_threadsafe(
            self.granted.put_nowait, [int(getattr(c, "value", c)) for c in codes])
        self.client.on_connect = lambda *_a: self.connected.set()
        self.client.on_disconnect = lambda *_a: self.disconnected.set()

        def on_publish(_c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
            with self.acked:
                self.acks[mid] = int(getattr(reason, "value", reason))
                self.acked.notify_all()

        self.client.on_publish = on_publish

    def start(self, port: int, *, username: str | None = None, password: str | None = None,
              tls: mc.TlsOptions | None = None) -> None:
        if username is not None:
            self.client.username_pw_set(username, password)
            SECRETS.update(s for s in (username, password) if s and len(s) >= 8)
        if tls is not None:
            self.client.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file,
                                tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.connect("localhost" if tls else "127.0.0.1", port, keepalive=60)
        self.client.loop_start()
        assert self.connected.wait(WAIT) and not self.disconnected.is_set()

    async def subscribe(self, filters: list[str], qos: int = 1) -> list[int]:
        self.client.subscribe([(f, qos) for f in filters])
        return await asyncio.wait_for(self.granted.get(), WAIT)

    async def publish(self, topic: str, payload: Any, qos: int = 1) -> int:
        """Publish and wait for the PUBACK: its reason code (0 at MQTT 3.1.1)."""
        data = payload if isinstance(payload, bytes) else json.dumps(payload)
        info = self.client.publish(topic, data, qos=qos)

        def wait() -> int:
            with self.acked:
                assert self.acked.wait_for(lambda: info.mid in self.acks, WAIT), f"no PUBACK for {topic}"
                return self.acks[info.mid]

        return await asyncio.to_thread(wait)

    async def receive(self, topic_prefix: str) -> tuple[str, Any]:
        while True:
            message = await asyncio.wait_for(self.messages.get(), WAIT)
            if message.topic.startswith(topic_prefix):
                return message.topic, json.loads(message.payload)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def paho_flows(device: PahoDevice, device_id: str, admin: Admin, backend: Backend) -> None:
    assert await device.subscribe(SDK_FILTERS) == [1, 1, 1, 1]
    telemetry = await backend.tap("device.telemetry", device_id)
    attributes = await backend.tap("device.attributes", device_id)
    assert await device.publish("v1/devices/me/telemetry", {"ts": 1700000000000, "values": {"rssi": -61}}) == 0
    assert await telemetry.next() == {"ts": 1700000000000, "values": {"rssi": -61}}
    assert await device.publish("v1/devices/me/attributes", {"fw": "2.0", "serial": 7}) == 0
    assert await attributes.next() == {"fw": "2.0", "serial": 7}
    assert client_attributes(admin, device_id) == {"fw": "2.0", "serial": 7}

    set_shared(admin, device_id, {"interval": 30})
    assert await device.receive("v1/devices/me/attributes") == ("v1/devices/me/attributes", {"interval": 30})
    assert await device.publish("v1/devices/me/attributes/request/41",
                                {"clientKeys": "fw,missing", "sharedKeys": "interval"}) == 0
    assert await device.receive("v1/devices/me/attributes/response/") == (
        "v1/devices/me/attributes/response/41", {"client": {"fw": "2.0"}, "shared": {"interval": 30}})

    call = asyncio.create_task(server_rpc(admin, device_id, "reboot", {"delay": 3}))
    topic, request = await device.receive("v1/devices/me/rpc/request/")
    assert request == {"method": "reboot", "params": {"delay": 3}}
    request_id = topic.rsplit("/", 1)[1]
    assert await device.publish(f"v1/devices/me/rpc/response/{request_id}", {"rebooting": True}) == 0
    assert await call == (200, {"rebooting": True})

    assert await device.publish("v1/devices/me/rpc/request/5", {"method": "getTime", "params": {"f": "iso"}}) == 0
    assert await device.receive("v1/devices/me/rpc/response/") == ("v1/devices/me/rpc/response/5", {
        "answeredBy": "backend", "method": "getTime", "params": {"f": "iso"}, "device": device_id})
    assert await device.publish("v1/devices/me/rpc/request/6", {"method": "getSessionLimits"}) == 0
    topic, limits = await device.receive("v1/devices/me/rpc/response/")
    assert topic == "v1/devices/me/rpc/response/6" and limits["maxPayloadSize"] == 65536 - 74


@pytest.mark.parametrize(("credentials", "protocol"), [
    ("token", mc.V311), ("token", mc.V5), ("mqtt_basic", mc.V5), ("x509", mc.V311),
], ids=["token-3.1.1", "token-5", "mqtt_basic-5", "x509-3.1.1"])
async def test_paho_device_api_flows(env: Env, stack: Stack, admin: Admin, backend: Backend,
                                     profile: dict[str, Any], tmp_path: Path, credentials: str,
                                     protocol: int) -> None:
    name = f"paho-{credentials}-{uuid.uuid4().hex[:6]}"
    loop = asyncio.get_running_loop()
    device = PahoDevice(loop, protocol, client_id=name if credentials == "mqtt_basic" else None)
    if credentials == "token":
        answer = await asyncio.to_thread(mc.provision_json, env.mqtt_port, tb_request(profile, deviceName=name))
        await asyncio.to_thread(device.start, env.mqtt_port, username=answer["credentialsValue"])
    elif credentials == "mqtt_basic":
        request = tb_request(profile, deviceName=name, credentialsType="MQTT_BASIC", clientId=name,
                             username=f"u-{name}", password="pw-secret")
        assert (await asyncio.to_thread(mc.provision_json, env.mqtt_port, request))["status"] == "SUCCESS"
        await asyncio.to_thread(device.start, env.mqtt_port, username=f"u-{name}", password="pw-secret")
    else:
        leaf = issue(name)
        cert_file, key_file = write_client_files(tmp_path, leaf)
        tls = mc.TlsOptions(str(env.ca_file), cert_file, key_file)
        request = tb_request(profile, deviceName=name, credentialsType="X509_CERTIFICATE", hash=leaf.pem)
        assert (await asyncio.to_thread(mc.provision_json, env.mqtts_port, request, tls=tls))["status"] == "SUCCESS"
        await asyncio.to_thread(device.start, env.mqtts_port, tls=tls)
    try:
        await paho_flows(device, device_by_name(admin, name)["id"], admin, backend)
        assert not device.disconnected.is_set()
    finally:
        device.stop()


# --- bad input ---------------------------------------------------------------------------------------------


async def _paho_device(env: Env, admin: Admin, profile: dict[str, Any], protocol: int,
                       ) -> tuple[PahoDevice, str]:
    name = f"bad-{uuid.uuid4().hex[:6]}"
    answer = await asyncio.to_thread(mc.provision_json, env.mqtt_port, tb_request(profile, deviceName=name))
    device = PahoDevice(asyncio.get_running_loop(), protocol)
    await asyncio.to_thread(device.start, env.mqtt_port, username=answer["credentialsValue"])
    assert await device.subscribe(SDK_FILTERS) == [1, 1, 1, 1]
    return device, device_by_name(admin, name)["id"]


async def _still_served(device: PahoDevice, admin: Admin, device_id: str) -> None:
    """The positive signal: this session still answers a server-side RPC through the admin API."""
    call = asyncio.create_task(server_rpc(admin, device_id, "ping", {}))
    topic, _ = await device.receive("v1/devices/me/rpc/request/")
    assert await device.publish(topic.replace("/request/", "/response/"), {"pong": True}) == 0
    assert await call == (200, {"pong": True})
    assert not device.disconnected.is_set()


async def test_mqtt5_bad_payloads_get_puback_0x99_store_nothing_and_keep_the_session(
    env: Env, stack: Stack, admin: Admin, backend: Backend, profile: dict[str, Any]
) -> None:
    device, device_id = await _paho_device(env, admin, profile, mc.V5)
    bystander, bystander_id = await _paho_device(env, admin, profile, mc.V311)
    try:
        attributes = await backend.tap("device.attributes", device_id)
        for topic, payload in [
            ("v1/devices/me/attributes", b"not json"),
            ("v1/devices/me/attributes", b"[1, 2, 3]"),
            ("v1/devices/me/attributes", json.dumps({"k" * 300: 1}).encode()),  # key longer than 255
            ("v1/devices/me/telemetry", b"{truncated"),
            ("v1/devices/me/attributes/request/1", b"[]"),
            ("v1/devices/me/attributes/request/not-a-number", b"{}"),
            ("v1/devices/me/rpc/request/1", b'{"params": {}}'),  # no method
            ("v1/devices/me/rpc/request/1", b"\xc3\x28"),  # not UTF-8
            ("v1/devices/me/rpc/response/1", b"<xml/>"),
        ]:
            assert await device.publish(topic, payload) == 0x99, (topic, payload)
        # The session stays, nothing was stored, and the next good message is the first one announced.
        assert await device.publish("v1/devices/me/attributes", {"good": True}) == 0
        assert await attributes.next() == {"good": True}
        assert client_attributes(admin, device_id) == {"good": True}
        await _still_served(device, admin, device_id)
        await _still_served(bystander, admin, bystander_id)
    finally:
        device.stop()
        bystander.stop()


async def test_mqtt311_bad_payload_closes_only_that_session(
    env: Env, stack: Stack, admin: Admin, profile: dict[str, Any]
) -> None:
    device, device_id = await _paho_device(env, admin, profile, mc.V311)
    bystander, bystander_id = await _paho_device(env, admin, profile, mc.V5)
    try:
        device.client.publish("v1/devices/me/attributes", b"not json", qos=1)
        assert await asyncio.to_thread(device.disconnected.wait, WAIT)
        assert client_attributes(admin, device_id) == {}
        await _still_served(bystander, admin, bystander_id)
    finally:
        device.stop()
        bystander.stop()


async def test_oversize_payload_closes_the_session_with_0x95_and_stores_nothing(
    env: Env, stack: Stack, admin: Admin, profile: dict[str, Any]
) -> None:
    name = f"big-{uuid.uuid4().hex[:6]}"
    answer = await asyncio.to_thread(mc.provision_json, env.mqtt_port, tb_request(profile, deviceName=name))
    device_id = device_by_name(admin, name)["id"]
    bystander, bystander_id = await _paho_device(env, admin, profile, mc.V311)
    big = json.dumps({"blob": "x" * 70_000}).encode()  # over MQTT_MAX_PACKET_BYTES (65536)
    packets = (client_codec.encode_connect("big", username=answer["credentialsValue"], protocol_level=5)
               + codec.encode_publish("v1/devices/me/attributes", big, qos=1, packet_id=1, protocol_level=5))
    try:
        sock = mc.raw_connect(env.mqtt_port, packets)
        try:
            received = await asyncio.to_thread(mc.read_until_closed, sock, WAIT)
        finally:
            sock.close()
        assert received == b"\x20\x03\x00\x00\x00" + b"\xe0\x01\x95"  # CONNACK, then DISCONNECT "packet too large"
        assert client_attributes(admin, device_id) == {}
        await _still_served(bystander, admin, bystander_id)
    finally:
        bystander.stop()


async def test_rpc_answers_for_unknown_or_someone_elses_requests_are_dropped(
    env: Env, stack: Stack, admin: Admin, profile: dict[str, Any]
) -> None:
    """Request ids are per session: device B answering device A's pending request id does not answer A's
    caller; neither does an id nobody sent. Both are acknowledged and dropped, and both sessions stay."""
    a, a_id = await _paho_device(env, admin, profile, mc.V5)
    b, b_id = await _paho_device(env, admin, profile, mc.V5)
    try:
        call = asyncio.create_task(server_rpc(admin, a_id, "whoAmI", {}))
        topic, _ = await a.receive("v1/devices/me/rpc/request/")
        request_id = topic.rsplit("/", 1)[1]
        assert await b.publish(f"v1/devices/me/rpc/response/{request_id}", {"i am": "b"}) == 0
        assert await b.publish("v1/devices/me/rpc/response/99999", {"nobody": "asked"}) == 0
        assert await a.publish("v1/devices/me/rpc/response/99999", {"nobody": "asked"}) == 0
        # Publishing to device A's id in a topic is no device-API topic at all: 0x90, nothing reaches A.
        assert await b.publish(f"v1/devices/{a_id}/rpc/response/{request_id}", {"i am": "b"}) == 0x90
        assert await b.publish(f"v1/devices/{a_id}/telemetry", {"forged": 1}) == 0x90
        assert await a.publish(f"v1/devices/me/rpc/response/{request_id}", {"i am": "a"}) == 0
        assert await call == (200, {"i am": "a"})
        await _still_served(b, admin, b_id)
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize(("protocol", "refused"), [(mc.V311, 0x80), (mc.V5, 0x8F)], ids=["3.1.1", "5"])
async def test_subscriptions_thingsboard_does_not_define_are_refused(
    env: Env, stack: Stack, admin: Admin, profile: dict[str, Any], protocol: int, refused: int
) -> None:
    device, device_id = await _paho_device(env, admin, profile, protocol)
    try:
        filters = ["#", "v1/devices/me/#", f"v1/devices/{uuid.uuid4()}/attributes", "v1/devices/me/telemetry",
                   "v2/r/req/+", "v1/devices/me/rpc/request/+"]
        assert await device.subscribe(filters, qos=2) == [refused] * 4 + [1, 1]
        await _still_served(device, admin, device_id)
    finally:
        device.stop()


async def test_exceeding_the_message_rate_limit_closes_the_session_as_thingsboard_does(
    env: Env, stack: Stack, admin: Admin, backend: Backend, profile: dict[str, Any]
) -> None:
    """DEVICE_MESSAGES_RATE_LIMIT (100:1,3000:60): the message over it is not forwarded and the session is
    closed (MQTT 5: DISCONNECT 0x83, ThingsBoard's getPubAckCallback error); every acknowledged message was
    forwarded."""
    name = f"rate-{uuid.uuid4().hex[:6]}"
    answer = await asyncio.to_thread(mc.provision_json, env.mqtt_port, tb_request(profile, deviceName=name))
    telemetry = await backend.tap("device.telemetry", device_by_name(admin, name)["id"])
    burst = b"".join(codec.encode_publish("v1/devices/me/telemetry", json.dumps({"i": i}).encode(), qos=1,
                                          packet_id=i + 1, protocol_level=5) for i in range(400))
    sock = mc.raw_connect(env.mqtt_port, client_codec.encode_connect("rate", username=answer["credentialsValue"],
                                                                     protocol_level=5) + burst)
    try:
        received = await asyncio.to_thread(mc.read_until_closed, sock, WAIT)
    finally:
        sock.close()
    packets = split_packets(received)
    assert packets[0] == b"\x20\x03\x00\x00\x00" and packets[-1] == b"\xe0\x01\x83"
    acks = packets[1:-1]
    assert acks == [b"\x40\x02" + (i + 1).to_bytes(2, "big") for i in range(len(acks))]  # in order, all success
    acknowledged = len(acks)
    assert 100 <= acknowledged < 400
    forwarded = [await telemetry.next() for _ in range(acknowledged)]
    assert forwarded == [{"i": i} for i in range(acknowledged)]


def split_packets(data: bytes) -> list[bytes]:
    packets = []
    while data:
        length = codec.decode_remaining_length(data)
        assert length is not None, data
        end = 1 + length[1] + length[0]
        packets.append(data[:end])
        data = data[end:]
    return packets


@pytest.mark.parametrize(("level", "connack"), [
    (4, b"\x20\x02\x00\x05"), (5, b"\x20\x03\x00\x87\x00"),
], ids=["3.1.1", "5"])
def test_the_sdk_reconnect_with_a_wrong_token_gets_a_connack_of_its_version(
    env: Env, stack: Stack, level: int, connack: bytes
) -> None:
    """The SDK's reconnect: MQTT 5, empty client id, Clean Start 0; a refusal is a complete MQTT 5 CONNACK
    (reason code and property length), 3.1.1 gets its 4 bytes."""
    packet = client_codec.encode_connect("" if level == 5 else "c", username=f"wrong-{uuid.uuid4().hex}",
                                         clean_session=level != 5, protocol_level=level)
    sock = mc.raw_connect(env.mqtt_port, packet)
    try:
        assert mc.read_until_closed(sock) == connack
    finally:
        sock.close()


def test_zz_no_traceback_and_no_secret_in_the_logs(stack: Stack) -> None:
    output = stack.output()
    assert "Traceback" not in output
    assert SECRETS and not [secret for secret in SECRETS if secret in output]
