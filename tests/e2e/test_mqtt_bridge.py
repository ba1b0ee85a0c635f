"""Bridge mode against a private Mosquitto running the shipped configuration (deploy/brokers/mosquitto, ports and
paths aside): MQTT 5 and 3.1.1 paho devices provision through two bridge instances, answers stay private, a
Response Topic naming another client gets that client nothing (issue 14), every client kind logs in or is
refused as the README says (mosquitto_rr/mosquitto_sub, tb-mqtt-client), every request is answered once, the
bridge rides out a broker restart; and the broker authentication endpoint in the shapes EMQX and RabbitMQ send,
answering only the broker (BROKER_AUTH_SECRET)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import paho.mqtt.client as mqtt
import pytest
from devstack import Stack
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.ports import free_port

from .conftest import Admin, Env, tb_request
from .mosquitto import Mosquitto, mosquitto_binary

BRIDGE_IDS = ("bridge-a", "bridge-b")
#: What the broker sends broker_auth (BROKER_AUTH_SECRET): EMQX as a header, RabbitMQ in its URLs' user info.
AUTH_SECRET = "broker-secret-" + uuid.uuid4().hex
AUTH_HEADERS = {"Authorization": f"Bearer {AUTH_SECRET}"}
ERROR_BODY_KEYS = {"errorMsg", "status"}


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, tls_files: tuple[Path, Path, Path]) -> Iterator[Mosquitto]:
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto is not installed")
    broker = Mosquitto(binary, tmp_path_factory.mktemp("mosquitto"), tls=(tls_files[0], tls_files[1]))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


class Bridges:
    """Two bridge instances (distinct client ids, one share group) as real processes."""

    def __init__(self, env: Env, broker: Mosquitto) -> None:
        self.health_ports = [free_port() for _ in BRIDGE_IDS]
        self.variables = [
            env.variables(MQTT_BROKER_URL=broker.bridge_url, MQTT_BRIDGE_CLIENT_ID=client_id, HEALTH_PORT=str(port))
            for client_id, port in zip(BRIDGE_IDS, self.health_ports, strict=True)
        ]
        self.stacks: list[Stack] = []

    def start(self) -> None:
        self.stacks = [Stack(variables, ["mqtt_bridge"]) for variables in self.variables]
        for stack in self.stacks:
            stack.start(timeout=30)

    def kill(self, index: int) -> None:
        """SIGKILL one instance: no drain, no DISCONNECT; what it held unacknowledged stays with the broker."""
        process = self.stacks[index]["mqtt_bridge"]
        assert process.proc is not None
        process.proc.kill()
        process.proc.wait()

    def restart(self, index: int) -> None:
        self.stacks[index] = Stack(self.variables[index], ["mqtt_bridge"]).start(timeout=30)

    def stop(self) -> None:
        for stack in self.stacks:
            stack.stop()

    def output(self) -> str:
        return "\n".join(stack.output() for stack in self.stacks)


@pytest.fixture(scope="module")
def bridges(env: Env, stack: Stack, broker: Mosquitto) -> Iterator[Bridges]:
    running = Bridges(env, broker)
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def broker_auth(env: Env, stack: Stack) -> Iterator[Stack]:
    port = free_port()
    service = Stack(env.variables(BRIDGE_AUTH_PORT=str(port), BROKER_AUTH_SECRET=AUTH_SECRET),
                    ["broker_auth"]).start(timeout=30)
    service.env["URL"] = f"http://127.0.0.1:{port}"
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def auth_url(broker_auth: Stack) -> str:
    return broker_auth.env["URL"]


# --- devices ------------------------------------------------------------------------------------


class Device:
    """A paho device on the private broker: anonymous, subscribed to its own response topic."""

    def __init__(self, broker: Mosquitto, protocol: int = mqtt.MQTTv5, client_id: str | None = None,
                 subscribe: str | None = "own") -> None:
        self.client_id = client_id or f"dev-{uuid.uuid4().hex[:10]}"
        self.response_topic = f"provision/response/{self.client_id}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=protocol)
        self.messages: list[mqtt.MQTTMessage] = []
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: subscribed.set()
        connected = threading.Event()
        self.client.on_connect = lambda *_a: connected.set()
        self.client.connect("127.0.0.1", broker.port, keepalive=30)
        self.client.loop_start()
        assert connected.wait(10), "no CONNACK"
        if subscribe is not None:
            self.client.subscribe(self.response_topic if subscribe == "own" else subscribe, qos=1)
            assert subscribed.wait(10), "no SUBACK"

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self.arrived:
            self.messages.append(message)
            self.arrived.notify_all()

    def publish(self, topic: str, body: dict[str, Any] | bytes, *, correlation: bytes | None = None,
                response_topic: str | None = None) -> None:
        props = None
        if correlation is not None or response_topic is not None:
            props = Properties(PacketTypes.PUBLISH)
            if response_topic is not None:
                props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
        payload = body if isinstance(body, bytes) else json.dumps(body)
        self.client.publish(topic, payload, qos=1, properties=props)

    def provision_v5(self, body: dict[str, Any] | bytes, correlation: bytes) -> None:
        self.publish(f"provision/request/{self.client_id}", body, correlation=correlation,
                     response_topic=self.response_topic)

    def wait_for(self, count: int, timeout: float = 15.0) -> list[mqtt.MQTTMessage]:
        with self.arrived:
            if not self.arrived.wait_for(lambda: len(self.messages) >= count, timeout):
                raise AssertionError(f"{self.client_id}: {len(self.messages)} of {count} answers")
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def answer(message: mqtt.MQTTMessage) -> dict[str, Any]:
    return json.loads(message.payload)


def correlation_of(message: mqtt.MQTTMessage) -> bytes | None:
    return getattr(message.properties, "CorrelationData", None)


_SENT_TO_BRIDGE = re.compile(r"Sending PUBLISH to (bridge-\S+) \(d\d, q1, r\d, m(\d+), 'provision/request")
_BRIDGE_PUBACK = re.compile(r"Received PUBACK from (bridge-\S+) \(Mid: (\d+)")


def bridge_deliveries(log: str) -> tuple[int, int]:
    """(requests the broker delivered to bridges, how many of them no bridge has acknowledged yet) in a part of
    the broker's log. A bridge acknowledges a request once it is done with it: ignored, or answered and the
    broker took the answer. A redelivery after a reconnect keeps its packet id and counts again."""
    delivered, unacknowledged = 0, set()
    for line in log.splitlines():
        if sent := _SENT_TO_BRIDGE.search(line):
            delivered += 1
            unacknowledged.add(sent.groups())
        elif acked := _BRIDGE_PUBACK.search(line):
            unacknowledged.discard(acked.groups())
    return delivered, len(unacknowledged)


def wait_bridges_done(broker: Mosquitto, mark: int, count: int, timeout: float = 30.0) -> int:
    """Until the bridges have been delivered at least ``count`` requests since ``mark`` (a length of the broker's
    log) and acknowledged every one of them; returns how many were delivered."""
    deadline = time.monotonic() + timeout
    while True:
        delivered, unacknowledged = bridge_deliveries(broker.log()[mark:])
        if delivered >= count and not unacknowledged:
            return delivered
        if time.monotonic() > deadline:
            raise AssertionError(f"bridges: {delivered} of {count} requests delivered, {unacknowledged} not done")
        time.sleep(0.05)


def round_trip(devices: list[Device], profile: dict[str, Any], prefix: str, timeout: float = 30.0) -> None:
    """Each device asks once more (Correlation Data b"control") and gets that answer: whatever the broker had
    routed to a device before has reached it by then (one connection, in order)."""
    expected = [len(device.messages) + 1 for device in devices]
    for d, device in enumerate(devices):
        device.provision_v5(tb_request(profile, deviceName=f"{prefix}-{d}"), b"control")
    for device, count in zip(devices, expected, strict=True):
        device.wait_for(count, timeout)


# --- provisioning through the bridge -------------------------------------------------------------


def test_mqtt5_device_gets_its_answer_on_its_response_topic_with_its_correlation_data(
    broker: Mosquitto, bridges: Bridges, profile: dict[str, Any]
) -> None:
    device = Device(broker, mqtt.MQTTv5)
    try:
        device.provision_v5(tb_request(profile, deviceName=f"b5-{uuid.uuid4().hex[:8]}"), b"\x00corr-1")
        [message] = device.wait_for(1)
    finally:
        device.close()
    body = answer(message)
    assert list(body) == ["credentialsValue", "credentialsType", "status"]
    assert body["status"] == "SUCCESS" and body["credentialsType"] == "ACCESS_TOKEN"
    assert message.topic == device.response_topic
    assert correlation_of(message) == b"\x00corr-1"
    assert message.properties.ContentType == "application/json"


def test_a_subscribed_bridge_is_ready_on_its_health_port(bridges: Bridges) -> None:
    # What the compose health check and the Kubernetes probes ask (HEALTH_PORT): bus, broker, subscription.
    for port in bridges.health_ports:
        for path in ("/health", "/live"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                assert (response.status, json.loads(response.read())) == (200, {"status": "UP"}), path


def test_mqtt311_device_asks_on_its_client_id_topic_in_either_dialect(
    broker: Mosquitto, bridges: Bridges, profile: dict[str, Any]
) -> None:
    device = Device(broker, mqtt.MQTTv311)
    try:
        device.publish(
            f"provision/request/{device.client_id}", tb_request(profile, deviceName=f"b3-{uuid.uuid4().hex[:8]}")
        )
        [tb] = device.wait_for(1)
        device.publish(f"provision/request/{device.client_id}", {
            "provision_key": profile["provisionDeviceKey"], "provision_secret": profile["provisionDeviceSecret"],
            "device_name": f"inno-{uuid.uuid4().hex[:8]}"})
        innoway = device.wait_for(2)[1]
        # Same statuses and bodies as the MQTT gateway: a request without key/secret is refused in words.
        device.publish(f"provision/request/{device.client_id}", {"deviceName": "no-key"})
        refused = device.wait_for(3)[2]
        device.publish(f"provision/request/{device.client_id}", tb_request(profile, provisionDeviceSecret="wrong"))
        not_found = device.wait_for(4)[3]
    finally:
        device.close()
    assert answer(tb)["status"] == "SUCCESS" and tb.topic == device.response_topic
    inno = answer(innoway)
    assert set(inno) == {"device_id", "status", "token"} and len(inno["token"]) == 32
    assert set(answer(refused)) == ERROR_BODY_KEYS and answer(refused)["status"] == "FAILURE"
    assert answer(not_found) == {"errorMsg": "Provision data was not found!", "status": "NOT_FOUND"}


def test_answers_stay_private_and_a_response_topic_hijack_gets_the_victim_nothing(
    broker: Mosquitto, bridges: Bridges, profile: dict[str, Any]
) -> None:
    """Issue 14's hijack: an attacker asks with the victim's Response Topic (a good request, and wrong secrets
    to exhaust the victim's rate limit). The victim, subscribed to its own response topic, gets nothing of it,
    and its own request afterwards is answered SUCCESS; a spy subscribed to everything sees only its own."""
    mark = len(broker.log())
    spy = Device(broker, mqtt.MQTTv5, subscribe="provision/response/#")
    spy.client.subscribe([("provision/request/#", 1), ("#", 1)])
    victim = Device(broker, mqtt.MQTTv311)
    try:
        # Someone else's request topic and the bare provision/request are not writable (the broker's ACL);
        spy.publish(f"provision/request/{victim.client_id}", tb_request(profile, deviceName="forged"))
        spy.publish("provision/request", tb_request(profile, deviceName="bare"),
                    response_topic=victim.response_topic, correlation=b"1")
        # on its own request topic, a Response Topic naming the victim is refused by the bridge (and counted).
        spy.publish(f"provision/request/{spy.client_id}", tb_request(profile, deviceName=f"hj-{uuid.uuid4().hex[:8]}"),
                    response_topic=victim.response_topic, correlation=b"hijack")
        for i in range(5):
            spy.publish(f"provision/request/{spy.client_id}", tb_request(profile, provisionDeviceSecret=f"wrong{i}"),
                        response_topic=victim.response_topic, correlation=b"w%d" % i)
        # Positive signals first: the bridges are done with the six requests that reached them (the broker
        # handles one client's publications in order, so the refused ones came before), and the spy's own
        # legitimate request is answered to it, so anything the broker routed before has arrived.
        wait_bridges_done(broker, mark, 6)
        round_trip([spy], profile, f"spy-{uuid.uuid4().hex[:8]}")
        victim.publish(
            f"provision/request/{victim.client_id}", tb_request(profile, deviceName=f"pv-{uuid.uuid4().hex[:8]}")
        )
        victim.wait_for(1)
        delivered, _ = bridge_deliveries(broker.log()[mark:])
    finally:
        spy.close()
        victim.close()
    assert {(m.topic, correlation_of(m)) for m in spy.messages} == {(spy.response_topic, b"control")}
    assert answer(spy.messages[0])["status"] == "SUCCESS"
    assert len(victim.messages) == 1 and answer(victim.messages[0])["status"] == "SUCCESS"
    assert delivered == 8  # the six refused by the bridge, the spy's own and the victim's
    log = broker.log()[mark:]
    assert f"Denied PUBLISH from {spy.client_id} (d0, q1, r0, m" in log
    # The forged request on the victim's topic reached no bridge: only the victim's own did.
    assert sum(1 for line in log.splitlines() if _SENT_TO_BRIDGE.search(line)
               and f"'provision/request/{victim.client_id}'" in line) == 1
    output = bridges.output()
    assert "refused_foreign_response_topic" in output and "is not its own" in output
    assert profile["provisionDeviceSecret"] not in output


async def test_two_bridges_answer_500_concurrent_requests_exactly_once(
    broker: Mosquitto, bridges: Bridges, profile: dict[str, Any], db: asyncpg.Connection
) -> None:
    run = uuid.uuid4().hex[:6]
    mark = len(broker.log())
    devices = [Device(broker, mqtt.MQTTv5) for _ in range(20)]
    try:
        started = time.monotonic()
        for d, device in enumerate(devices):
            for i in range(25):
                device.provision_v5(tb_request(profile, deviceName=f"bulk-{run}-{d}-{i}"), f"{d}-{i}".encode())
        for device in devices:
            await asyncio.to_thread(device.wait_for, 25, 45)
        elapsed = time.monotonic() - started
        # Positive signal first: the bridges are done with every request delivered to them, and then each
        # device's next request is answered, so a duplicate answer would have reached its device by now.
        await asyncio.to_thread(wait_bridges_done, broker, mark, 500)
        await asyncio.to_thread(round_trip, devices, profile, f"ctl-{run}")
    finally:
        for device in devices:
            device.close()
    per_request = Counter((device.client_id, correlation_of(m)) for device in devices for m in device.messages
                          if correlation_of(m) != b"control")
    assert len(per_request) == 500 and set(per_request.values()) == {1}
    assert {answer(m)["status"] for device in devices for m in device.messages} == {"SUCCESS"}
    rows = await db.fetch("SELECT name, count(*) AS n FROM devices WHERE name LIKE $1 GROUP BY name", f"bulk-{run}-%")
    assert len(rows) == 500 and {row["n"] for row in rows} == {1}
    # The broker split the requests between the two instances of the share group.
    delivered = Counter(line.split("Sending PUBLISH to ", 1)[1].split(" ", 1)[0]
                        for line in broker.log().splitlines()
                        if "Sending PUBLISH to bridge-" in line and "'provision/request" in line)
    assert len(delivered) == 2 and all(n > 0 for n in delivered.values()), delivered
    print(f"\n500 requests through 2 bridges in {elapsed:.2f}s; split {dict(delivered)}")


async def test_a_repeated_request_is_answered_again_without_a_second_device(
    broker: Mosquitto, bridges: Bridges, profile: dict[str, Any], db: asyncpg.Connection
) -> None:
    """The same message again (a redelivery, or a device retransmitting) has the same request id: the core
    replays the first answer. New Correlation Data with the same content is the same device repeating
    its request: it gets that answer too (PROVISION_REPLAY_WINDOW_S), never a second device."""
    name = f"dup-{uuid.uuid4().hex[:8]}"
    v3 = Device(broker, mqtt.MQTTv311)
    v5 = Device(broker, mqtt.MQTTv5)
    try:
        # One after the other: two copies in flight at once are answered once (the second waits for the first).
        for count in (1, 2):
            v3.publish(f"provision/request/{v3.client_id}", tb_request(profile, deviceName=name))
            await asyncio.to_thread(v3.wait_for, count)
        first, second = v3.messages
        for count, correlation in ((1, b"same"), (2, b"same"), (3, b"new")):
            v5.provision_v5(tb_request(profile, deviceName=name + "-5"), correlation)
            await asyncio.to_thread(v5.wait_for, count)
        answers: dict[bytes | None, list[dict[str, Any]]] = {correlation_of(m): [] for m in v5.messages}
        for m in v5.messages:
            answers[correlation_of(m)].append(answer(m))
    finally:
        v3.close()
        v5.close()
    assert answer(first) == answer(second) and answer(first)["status"] == "SUCCESS"
    assert answers[b"same"][0] == answers[b"same"][1] and answers[b"same"][0]["status"] == "SUCCESS"
    assert answers[b"new"] == [answers[b"same"][0]]
    rows = await db.fetch("SELECT name FROM devices WHERE name = $1 OR name = $2", name, name + "-5")
    assert sorted(row["name"] for row in rows) == [name, name + "-5"]


async def test_a_bridge_killed_mid_flight_loses_no_request_and_duplicates_no_device(
    broker: Mosquitto, bridges: Bridges, stack: Stack, profile: dict[str, Any], db: asyncpg.Connection
) -> None:
    """bridge-a dies holding requests it passed to the core but never answered nor acknowledged. The core
    still provisions them; the broker delivers them again to the restarted bridge-a, and because the request
    id comes from the message, the core replays those answers instead of refusing the now-taken names."""
    run = uuid.uuid4().hex[:6]
    core = stack["provisioning_core"]
    start_mark = len(broker.log())
    devices = [Device(broker, mqtt.MQTTv5) for _ in range(8)]
    try:
        core.signal(signal.SIGSTOP)  # hold every request at the core for a moment
        try:
            for d, device in enumerate(devices):
                for i in range(25):
                    device.provision_v5(tb_request(profile, deviceName=f"kill-{run}-{d}-{i}"), f"{i}".encode())
            await asyncio.sleep(0.7)
            bridges.kill(0)
        finally:
            core.signal(signal.SIGCONT)
        await asyncio.sleep(1.0)  # the core provisions what the dead bridge had asked for
        log_mark = len(broker.log())
        await asyncio.to_thread(bridges.restart, 0)
        for device in devices:
            await asyncio.to_thread(device.wait_for, 25, 30)
        # Positive signal first: the bridges are done with every request delivered to them (redeliveries to
        # the restarted bridge-a included), and then each device's next request is answered, so any further
        # answer to an earlier request would have reached its device by now.
        await asyncio.to_thread(wait_bridges_done, broker, start_mark, 200)
        await asyncio.to_thread(round_trip, devices, profile, f"ctl-{run}")
    finally:
        for device in devices:
            device.close()
    by_request: dict[tuple[str, bytes | None], list[dict[str, Any]]] = {}
    for device in devices:
        for m in device.messages:
            if correlation_of(m) == b"control":
                continue
            by_request.setdefault((device.client_id, correlation_of(m)), []).append(answer(m))
    assert len(by_request) == 200
    for bodies in by_request.values():
        assert bodies[0]["status"] == "SUCCESS" and all(b == bodies[0] for b in bodies)
    rows = await db.fetch("SELECT name, count(*) AS n FROM devices WHERE name LIKE $1 GROUP BY name", f"kill-{run}-%")
    assert len(rows) == 200 and {row["n"] for row in rows} == {1}
    # The broker redelivered (DUP flag) what bridge-a held unacknowledged when it died.
    redelivered = sum(1 for line in broker.log()[log_mark:].splitlines()
                      if "Sending PUBLISH to bridge-a" in line and "(d1," in line)
    assert redelivered > 0
    print(f"\nbridge-a killed holding {redelivered} unacknowledged requests: all 200 answered SUCCESS once each")


def test_a_bridge_over_tls_joins_the_group_and_leaves_it_without_stranding_requests(
    env: Env, broker: Mosquitto, bridges: Bridges, profile: dict[str, Any], tls_files: tuple[Path, Path, Path]
) -> None:
    variables = env.variables(MQTT_BROKER_URL=broker.bridge_tls_url, MQTT_BROKER_CA_FILE=str(tls_files[2]),
                              MQTT_BRIDGE_CLIENT_ID="bridge-tls")
    tls_bridge = Stack(variables, ["mqtt_bridge"]).start(timeout=30)
    mark = len(broker.log())
    device = Device(broker, mqtt.MQTTv5)
    try:
        for i in range(6):
            device.provision_v5(tb_request(profile, deviceName=f"tls-{uuid.uuid4().hex[:8]}"), b"%d" % i)
        assert {answer(m)["status"] for m in device.wait_for(6)} == {"SUCCESS"}
    finally:
        tls_bridge.stop()
    assert "Sending PUBLISH to bridge-tls" in broker.log()[mark:]  # it took its share, over TLS
    assert f"connected to mqtts://localhost:{broker.tls_port}" in tls_bridge.output()
    # A graceful stop left the share group: no request goes on waiting in its (still existing) session.
    try:
        for i in range(6, 12):
            device.provision_v5(tb_request(profile, deviceName=f"tls-{uuid.uuid4().hex[:8]}"), b"%d" % i)
        assert len(device.wait_for(12, timeout=10)) == 12
    finally:
        device.close()


def test_bridge_rides_out_a_broker_restart_and_loses_no_queued_request(
    broker: Mosquitto, bridges: Bridges, profile: dict[str, Any]
) -> None:
    # 1. The broker restarts under running bridges: they reconnect (back-off from 1 s), subscribe again
    # and keep answering. (Mosquitto 2.0 does not restore *shared* subscriptions from its persistence
    # file, so a request published before the bridges are back finds no subscriber; see the README.)
    broker.restart()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not all("subscribed again" in s.output() for s in bridges.stacks):
        time.sleep(0.1)
    assert all("subscribed again" in s.output() for s in bridges.stacks), bridges.output()[-3000:]
    device = Device(broker, mqtt.MQTTv5)
    try:
        device.provision_v5(tb_request(profile, deviceName=f"rs-{uuid.uuid4().hex[:8]}"), b"after-restart")
        [message] = device.wait_for(1)
        assert answer(message)["status"] == "SUCCESS"
    finally:
        device.close()

    # 2. Requests the broker keeps for crashed bridges (persistent sessions, still subscribed) survive a
    # broker restart and are answered when the bridges come back.
    bridges.kill(0)
    bridges.kill(1)
    names = [f"queued-{uuid.uuid4().hex[:8]}" for _ in range(4)]
    sender = Device(broker, mqtt.MQTTv311, subscribe=None)
    for name in names:
        sender.publish(f"provision/request/{sender.client_id}", tb_request(profile, deviceName=name))
    time.sleep(0.5)
    sender.close()
    broker.restart()
    device = Device(broker, mqtt.MQTTv311, client_id=sender.client_id)
    try:
        bridges.start()
        answers = device.wait_for(4, timeout=30)
    finally:
        device.close()
    assert sorted(answer(m)["status"] for m in answers) == ["SUCCESS"] * 4


# --- the broker authentication endpoint -------------------------------------------------------------


def _token_device(http: httpx.Client, profile: dict[str, Any]) -> str:
    response = http.post("/api/v1/provision", json=tb_request(profile, deviceName=f"auth-{uuid.uuid4().hex[:8]}"))
    return response.json()["credentialsValue"]


def test_emqx_http_authenticator_shape(auth_url: str, http: httpx.Client, profile: dict[str, Any]) -> None:
    token = _token_device(http, profile)
    basic_id = f"basic-{uuid.uuid4().hex[:8]}"
    basic = http.post("/api/v1/provision", json=tb_request(
        profile, deviceName=basic_id, credentialsType="MQTT_BASIC", clientId=basic_id, username="u", password="pw"))
    assert basic.json()["status"] == "SUCCESS"
    with httpx.Client(base_url=auth_url, timeout=10, headers=AUTH_HEADERS) as client:
        def ask(**body: str) -> dict[str, Any]:
            response = client.post("/emqx/auth", json=body)
            assert response.status_code == 200 and response.headers["content-type"] == "application/json"
            return response.json()

        provisioning = ask(clientid="dev-42", username="provision", password="anything")
        assert provisioning["result"] == "allow" and provisioning["is_superuser"] is False
        subscribe_own = {"permission": "allow", "action": "subscribe", "topic": "eq provision/response/dev-42"}
        assert subscribe_own in provisioning["acl"]
        assert provisioning["acl"][-1] == {"permission": "deny", "action": "all", "topic": "#"}
        for bad_id in ("a/b", "#", "a+", "star*", ""):
            assert ask(clientid=bad_id, username="provision", password="x")["result"] == "deny"
        assert ask(clientid="c1", username=token, password="")["result"] == "allow"          # ThingsBoard
        assert ask(clientid="c1", username="whatever", password=token)["result"] == "allow"  # Innoway
        assert ask(clientid=basic_id, username="u", password="pw")["result"] == "allow"     # MQTT_BASIC §9
        assert ask(clientid=basic_id, username="u", password="wrong")["result"] == "deny"
        assert ask(clientid="other", username="u", password="pw")["result"] == "deny"
        assert ask(clientid="c1", username="nobody", password="nothing")["result"] == "deny"
        assert ask(clientid="c1", username="", password="")["result"] == "ignore"
        # EMQX may also be configured to send a form body.
        form = client.post("/emqx/auth", data={"clientid": "c1", "username": token, "password": ""})
        assert form.json()["result"] == "allow"
        not_an_object = client.post("/emqx/auth", content=b"[1]", headers={"content-type": "application/json"})
        assert not_an_object.status_code == 400


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_rabbitmq_auth_backend_http_shape(
    auth_url: str, http: httpx.Client, profile: dict[str, Any], method: str
) -> None:
    token = _token_device(http, profile)
    with httpx.Client(base_url=auth_url, timeout=10, headers=AUTH_HEADERS) as client:
        def ask(path: str, **params: str) -> str:
            # POST sends application/x-www-form-urlencoded.
            response = client.get(path, params=params) if method == "GET" else client.post(path, data=params)
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
            return response.text

        # /auth/user: RabbitMQ 3.13+/4.x send username, password, vhost, client_id (MQTT) and ssl.
        assert ask(
            "/auth/user", username="provision", password="x", vhost="/", client_id="dev-7", ssl="false"
        ) == "allow"
        assert ask("/auth/user", username="provision", password="x", vhost="/", client_id="dev*") == "deny"
        assert ask("/auth/user", username=token, password="", vhost="/", client_id="c2") == "allow"
        assert ask("/auth/user", username="any", password=token, vhost="/", client_id="c2") == "allow"
        assert ask("/auth/user", username="any", password="wrong", vhost="/", client_id="c2") == "deny"
        assert ask("/auth/vhost", username="provision", vhost="/", ip="10.0.0.7", tags="", client_id="dev-7") == "allow"

        # /auth/resource: the MQTT plugin's own session queue and its topic exchange.
        def resource(kind: str, name: str, permission: str, client_id: str | None = "dev-7") -> str:
            extra = {"client_id": client_id} if client_id else {}
            return ask("/auth/resource", username="provision", vhost="/", resource=kind, name=name,
                       permission=permission, tags="", **extra)

        assert resource("queue", "mqtt-subscription-dev-7qos1", "configure") == "allow"
        assert resource("queue", "mqtt-subscription-provisioning-bridge-hostqos1", "read") == "deny"
        assert resource("queue", "mqtt-subscription-dev-7qos1", "read", client_id=None) == "deny"
        assert resource("exchange", "amq.topic", "write") == "allow"
        assert resource("exchange", "amq.topic", "configure") == "deny"

        # /auth/topic: the MQTT topic arrives as an AMQP routing key ('/' -> '.', '+' -> '*').
        def topic(username: str, permission: str, key: str, client_id: str = "dev-7") -> str:
            return ask("/auth/topic", username=username, vhost="/", resource="topic", name="amq.topic",
                       permission=permission, routing_key=key, tags="", **{
                           "variable_map.username": username, "variable_map.vhost": "/",
                           "variable_map.client_id": client_id})

        assert topic("provision", "write", "provision.request") == "deny"
        assert topic("provision", "write", "provision.request.dev-7") == "allow"
        assert topic("provision", "write", "provision.request.dev-8") == "deny"
        assert topic("provision", "read", "provision.response.dev-7") == "allow"
        assert topic("provision", "read", "provision.response.*") == "deny"
        assert topic("provision", "read", "provision.response.dev-8") == "deny"
        assert topic("provision", "write", "v1.devices.me.telemetry") == "deny"
        for key in ("#", "*.response.dev-7", "provision.response.#", "provision.request.dev-7"):
            assert topic(token, "read", key, client_id="c2") == "deny", key
        assert topic(token, "write", "provision.response.dev-7", client_id="c2") == "deny"
        assert topic(token, "write", "v1.devices.me.telemetry", client_id="c2") == "allow"
        assert topic(token, "read", "v1.devices.me.attributes", client_id="c2") == "allow"


def test_no_secret_reaches_a_log_line(broker: Mosquitto, bridges: Bridges, broker_auth: Stack, auth_url: str,
                                      admin: Admin) -> None:
    """Provision secrets, issued tokens and the bridge's broker password never appear in the logs."""
    profile = admin.create_profile()
    device = Device(broker, mqtt.MQTTv5)
    try:
        device.provision_v5(tb_request(profile, deviceName=f"sec-{uuid.uuid4().hex[:8]}"), b"s")
        token = answer(device.wait_for(1)[0])["credentialsValue"]
    finally:
        device.close()
    with httpx.Client(base_url=auth_url, timeout=10, headers=AUTH_HEADERS) as client:
        assert client.get("/auth/user", params={"username": "x", "password": token}).text == "allow"
        # Anyone but the broker (no secret, or a wrong one) is refused before anything is looked at.
        for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
            refused = client.get("/auth/user", params={"username": "x", "password": token}, headers=headers)
            assert refused.status_code == 401
        basic = httpx.BasicAuth("rabbitmq", AUTH_SECRET)
        assert client.get("/auth/user", params={"username": "x", "password": token}, auth=basic).text == "allow"
    logs = bridges.output() + broker_auth.output()
    assert "without the broker's secret" in logs
    for secret in (profile["provisionDeviceSecret"], token, broker.bridge_password, AUTH_SECRET):
        assert secret not in logs
        assert secret not in broker.log()  # (Mosquitto logs topics and sizes, never payloads)
    assert "mqtt_bridge ready: subscribed to $share/provisioning/provision/request/#" in logs


# --- every client kind on the shipped Mosquitto configuration, with clients we did not write (issue 14) ----


def _cli(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)


def _rr(port: int, client_id: str, body: dict[str, Any], *login: str, version: str = "5") -> tuple[int, str]:
    """mosquitto_rr (mosquitto-clients): one request on the client's own topic, its answer or the error."""
    done = _cli("mosquitto_rr", "-h", "127.0.0.1", "-p", str(port), "-i", client_id, *login, "-V", version,
                "-q", "1", "-t", f"provision/request/{client_id}", "-e", f"provision/response/{client_id}",
                "-m", json.dumps(body), "-W", "15")
    return done.returncode, (done.stdout + done.stderr).strip()


@pytest.mark.skipif(shutil.which("mosquitto_rr") is None, reason="mosquitto-clients is not installed")
def test_each_client_kind_logs_in_or_is_refused_as_the_readme_says_on_mosquitto(
    broker: Mosquitto, bridges: Bridges, profile: dict[str, Any]
) -> None:
    """README "Broker configuration" > Mosquitto, row by row, with mosquitto_rr/mosquitto_sub and tb-mqtt-client."""
    run = uuid.uuid4().hex[:8]
    accounts, provisioning = broker.port, broker.provisioning_port
    # The shipped files load without a warning (a pattern without %c warns: "does not contain '%c' or '%u'").
    assert "Warning" not in broker.log() and "Error" not in broker.log()
    ok: dict[str, dict[str, Any]] = {}
    # Provisioning clients: anonymous on the accounts listener; user name "provision", with or without a
    # password (ThingsBoard's provisioning CONNECT), on the provisioning listener; MQTT 3.1.1 or 5.
    for kind, port, login, version in (
        ("anonymous-v5", accounts, (), "5"),
        ("anonymous-v311", accounts, (), "311"),
        ("provision-no-password", provisioning, ("-u", "provision"), "5"),
        ("provision-password", provisioning, ("-u", "provision", "-P", "anything"), "311"),
        ("any-user", provisioning, ("-u", "whoever", "-P", "x"), "5"),
    ):
        rc, out = _rr(port, f"{kind}-{run}", tb_request(profile, deviceName=f"{kind}-{run}"), *login, version=version)
        assert rc == 0, (kind, out)
        ok[kind] = json.loads(out)
        assert ok[kind]["status"] == "SUCCESS" and ok[kind]["credentialsType"] == "ACCESS_TOKEN", (kind, out)
    # Refused: a user name the password_file does not know, on the accounts listener (even "provision", and
    # a freshly provisioned token as ThingsBoard's user name: Mosquitto cannot ask broker_auth without a plugin).
    token = ok["anonymous-v5"]["credentialsValue"]
    for login in (("-u", "provision"), ("-u", "provision", "-P", "x"), ("-u", token),
                  ("-u", "provisioning-bridge", "-P", "wrong")):
        rc, out = _rr(accounts, f"refused-{run}", tb_request(profile, deviceName=f"refused-{run}"), *login)
        assert rc != 0 and "not authori" in out.lower(), (login, out)
    # ThingsBoard's own device SDK with its new token as user name: refused on Mosquitto, as the README says.
    from tb_device_mqtt import TBDeviceMqttClient

    refused = threading.Event()
    results: list[int] = []

    def on_connect(_client: Any, _userdata: Any, _flags: Any, code: Any, *_rest: Any) -> None:
        results.append(int(getattr(code, "value", code)))
        refused.set()

    tb = TBDeviceMqttClient("127.0.0.1", accounts, username=token, client_id=f"tb-{run}")
    tb.connect(callback=on_connect, timeout=1)
    try:
        assert refused.wait(10) and results[0] == 135, results  # MQTT 5 "Not authorized"
    finally:
        tb.disconnect()
    # On the provisioning listener even a client calling itself provisioning-bridge gets no request.
    spy = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(provisioning), "-u", "provisioning-bridge",
                            "-i", f"fake-bridge-{run}", "-t", "provision/request/#", "-t", "provision/response/#",
                            "-q", "1", "-v"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(0.3)
        rc, out = _rr(provisioning, f"late-{run}", tb_request(profile, deviceName=f"late-{run}"), "-u", "provision")
        assert rc == 0 and json.loads(out)["status"] == "SUCCESS", out  # positive signal: answered meanwhile
    finally:
        spy.terminate()
        seen = spy.communicate(timeout=5)[0]
    assert "provision/" not in seen, seen


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto-clients is not installed")
def test_hijack_with_mosquitto_pub_gets_the_victim_nothing(
    broker: Mosquitto, bridges: Bridges, profile: dict[str, Any]
) -> None:
    """Issue 14's reproduction as a user would run it: mosquitto_pub asks with the victim's Response Topic."""
    run = uuid.uuid4().hex[:8]
    victim, attacker = f"victim-{run}", f"attacker-{run}"
    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-i", victim, "-V", "5",
                            "-t", f"provision/response/{victim}", "-q", "1", "-v"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(0.3)
        for i in range(3):
            done = _cli("mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-i", attacker, "-V", "5",
                        "-q", "1", "-t", f"provision/request/{attacker}",
                        "-D", "publish", "response-topic", f"provision/response/{victim}",
                        "-m", json.dumps(tb_request(profile, deviceName=f"hj{i}-{run}")))
            assert done.returncode == 0, done.stderr
        # Positive signal: the attacker's own legitimate request, sent after them, is answered to it.
        rc, out = _rr(broker.port, attacker, tb_request(profile, deviceName=f"own-{run}"))
        assert rc == 0 and json.loads(out)["status"] == "SUCCESS", out
    finally:
        sub.terminate()
        seen = sub.communicate(timeout=5)[0]
    assert seen == "", seen
    assert "refused_foreign_response_topic" in bridges.output()
