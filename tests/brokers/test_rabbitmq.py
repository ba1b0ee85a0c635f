"""Bridge mode on RabbitMQ's MQTT plugin: a private node of the installed rabbitmq-server (own node name, ports,
epmd, data and log directories; ``rabbitmq_mqtt`` and ``rabbitmq_auth_backend_http`` enabled) running the shipped
``deploy/brokers/rabbitmq/rabbitmq.conf`` (ports, URLs and the secret filled in) and ``bridge-account.sh``;
``broker_auth`` and ``mqtt_bridge`` (MQTT 3.1.1: RabbitMQ 3.10 has no MQTT 5) as real processes.

Never the machine's RabbitMQ: ``tests/faults/infra.py`` starts and stops the node by PID."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from devstack import Stack
from paho.mqtt.enums import CallbackAPIVersion

from tests.e2e.conftest import Env, tb_request
from tests.faults.infra import PrivateRabbitMQ
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "deploy" / "brokers" / "rabbitmq"
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
BRIDGE_CLIENT_ID = "provisioning-bridge-test"

pytestmark = pytest.mark.skipif(not (RABBITMQ_BIN / "rabbitmq-server").exists()
                                or shutil.which("mosquitto_pub") is None,
                                reason="rabbitmq-server or mosquitto-clients is not installed")


def shipped_config(mqtt_port: int, auth_port: int, secret: str) -> str:
    """The shipped rabbitmq.conf with our MQTT port and broker_auth's address; nothing else changes."""
    text = (SHIPPED / "rabbitmq.conf").read_text()
    for old, new in (("mqtt.listeners.tcp.default = 1883", f"mqtt.listeners.tcp.default = 127.0.0.1:{mqtt_port}"),
                     ("http://broker-auth:8090/REPLACE_WITH_BROKER_AUTH_SECRET/", f"http://127.0.0.1:{auth_port}/{secret}/")):
        assert old in text, f"{old!r} is no longer in the shipped rabbitmq.conf: update this test"
        text = text.replace(old, new)
    return "\n" + text


class Node:
    """The private node with the MQTT plugin, the bridge's account made by the shipped script."""

    def __init__(self, auth_port: int, secret: str) -> None:
        self.mqtt_port = free_port()
        # Beginning with "-" on purpose: token_urlsafe passwords do one time in 64, and rabbitmqctl took them for
        # an option until bridge-account.sh passed "--".
        self.bridge_password = "-" + secrets.token_urlsafe(16)
        config = shipped_config(self.mqtt_port, auth_port, secret)
        self.rabbit = PrivateRabbitMQ(prefix="bridgetest", extra_config=config,
                                      plugins=["rabbitmq_mqtt", "rabbitmq_auth_backend_http"])

    def start(self) -> None:
        self.rabbit.start()
        self.wait_mqtt()

    def wait_mqtt(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not mqtt_login_answers(self.mqtt_port):
            assert time.monotonic() < deadline, "the MQTT listener did not answer"
            time.sleep(0.2)

    def bridge_account(self) -> None:
        env = {**self.rabbit._environment(), "PATH": f"{RABBITMQ_BIN}:/usr/bin:/bin",  # noqa: SLF001
               "BRIDGE_PASSWORD": self.bridge_password}
        done = subprocess.run(["sh", str(SHIPPED / "bridge-account.sh")], env=env, capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    @property
    def bridge_url(self) -> str:
        return f"mqtt://provisioning-bridge:{self.bridge_password}@127.0.0.1:{self.mqtt_port}"


def mqtt_login_answers(port: int) -> bool:
    """The MQTT listener answers a CONNECT (any CONNACK, even a refusal)."""
    done = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv311", "-t", "x",
                           "-m", "x", "-u", "nobody", "-P", "x"], capture_output=True, text=True, timeout=10,
                          check=False)
    return "refused" in done.stderr.lower() or done.returncode == 0


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_secret() -> str:
    return secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def broker_auth(env: Env, stack: Stack, auth_secret: str) -> Iterator[Stack]:
    port = free_port()
    service = Stack(env.variables(BRIDGE_AUTH_PORT=str(port), BROKER_AUTH_SECRET=auth_secret),
                    ["broker_auth"]).start(timeout=30)
    service.env["PORT"] = str(port)
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def node(broker_auth: Stack, auth_secret: str) -> Iterator[Node]:
    started = Node(int(broker_auth.env["PORT"]), auth_secret)
    try:
        started.start()
        started.bridge_account()
        yield started
    finally:
        started.rabbit.stop()


class Bridge:
    def __init__(self, env: Env, node: Node) -> None:
        self.variables = env.variables(MQTT_BROKER_URL=node.bridge_url, MQTT_BRIDGE_SHARE_GROUP="",
                                       MQTT_BRIDGE_PROTOCOL="3.1.1", MQTT_BRIDGE_CLIENT_ID=BRIDGE_CLIENT_ID)
        self.stack: Stack | None = None
        self.outputs: list[str] = []

    def start(self) -> None:
        self.stack = Stack(self.variables, ["mqtt_bridge"]).start(timeout=60)

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop()
            self.outputs.append(self.stack.output())
            self.stack = None

    def output(self) -> str:
        return "\n".join(self.outputs + ([self.stack.output()] if self.stack else []))


@pytest.fixture(scope="module")
def bridge(env: Env, node: Node) -> Iterator[Bridge]:
    running = Bridge(env, node)
    running.start()
    try:
        yield running
    finally:
        running.stop()


# --- an MQTT 3.1.1 client (paho) ------------------------------------------------------------------


class Client:
    """A paho MQTT 3.1.1 client on the node; ``connected`` says whether the CONNACK accepted it."""

    def __init__(self, port: int, client_id: str, username: str | None = None, password: str | None = None,
                 clean: bool = True) -> None:
        self.client_id = client_id
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                                  clean_session=clean)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.messages: list[mqtt.MQTTMessage] = []
        self.arrived = threading.Condition()
        self.connack = threading.Event()
        self.granted: list[int] = []
        self.subacked = threading.Event()
        self.reason: Any = None
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = lambda *_a: (self.closed.set(), self.subacked.set())
        self.closed = threading.Event()
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        self.connack.wait(15)

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.reason = reason
        self.connack.set()

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: list[Any], _p: Any) -> None:
        self.granted = [int(getattr(code, "value", code)) for code in codes]
        self.subacked.set()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self.arrived:
            self.messages.append(message)
            self.arrived.notify_all()

    @property
    def connected(self) -> bool:
        return self.reason is not None and not self.reason.is_failure

    def subscribe(self, topic: str) -> list[int]:
        """The SUBACK's codes; [128] (refused) also when the broker closes the connection instead (RabbitMQ
        3.10 does that on a subscription its authorisation refuses)."""
        self.subacked.clear()
        self.client.subscribe(topic, qos=1)
        assert self.subacked.wait(10), "no SUBACK"
        return [128] if self.closed.is_set() else self.granted

    def own_response(self) -> None:
        assert self.subscribe(f"provision/response/{self.client_id}") == [1]

    def ask(self, body: dict[str, Any]) -> None:
        info = self.client.publish(f"provision/request/{self.client_id}", json.dumps(body), qos=1)
        info.wait_for_publish(10)

    def wait_for(self, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.messages) >= count, timeout), (
                f"{self.client_id}: {len(self.messages)} of {count} answers")
            return [json.loads(m.payload) for m in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _pub(port: int, *login: str, topic: str = "v1/devices/me/telemetry",
         client_id: str | None = None) -> tuple[int, str]:
    """mosquitto_pub (mosquitto-clients) as MQTT 3.1.1: exit code and message."""
    done = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv311", "-q", "1",
                           "-i", client_id or f"pub-{uuid.uuid4().hex[:8]}", "-t", topic, "-m", '{"t":1}', *login],
                          capture_output=True, text=True, timeout=20, check=False)
    return done.returncode, done.stderr.strip()


def _provision(node: Node, profile: dict[str, Any], client_id: str, **fields: Any) -> dict[str, Any]:
    """Provision through the bridge as ThingsBoard's provisioning client ("provision", any non-empty password)."""
    device = Client(node.mqtt_port, client_id, "provision", "any")
    try:
        assert device.connected, device.reason
        device.own_response()
        device.ask(tb_request(profile, deviceName=client_id, **fields))
        return device.wait_for(1)[0]
    finally:
        device.close()


# --- tests -------------------------------------------------------------------------------------------


def test_each_client_kind_logs_in_or_is_refused_as_the_readme_says(
    node: Node, bridge: Bridge, profile: dict[str, Any]
) -> None:
    run = uuid.uuid4().hex[:8]
    port = node.mqtt_port
    # A provisioning client ("provision" and a password, any) provisions through the bridge ...
    token = _provision(node, profile, f"prov-{run}")
    assert token["status"] == "SUCCESS" and token["credentialsType"] == "ACCESS_TOKEN", token
    basic_id = f"basic-{run}"
    basic = _provision(node, profile, basic_id, credentialsType="MQTT_BASIC", clientId=basic_id,
                       username=f"user-{run}", password="basic-pw")
    assert basic["status"] == "SUCCESS" and basic["credentialsType"] == "MQTT_BASIC", basic
    access_token = token["credentialsValue"]
    # ... and then connects as a device with its new credentials: the token as password (any user name), or
    # MQTT_BASIC; it may publish its telemetry.
    # RabbitMQ 3.10 passes an empty password on to the backends (3.13+ refuses it like a missing one).
    empty = f"empty-{run}"
    assert _pub(port, "-u", "provision", "-P", "", topic=f"provision/request/{empty}", client_id=empty) == (0, "")
    for login, client_id in ((("-u", "device", "-P", access_token), None),
                             (("-u", access_token, "-P", access_token), None),
                             (("-u", f"user-{run}", "-P", "basic-pw"), basic_id)):
        assert _pub(port, *login, client_id=client_id) == (0, ""), login
    # Refused, as the README says: the plugin refuses a user name without a password before asking anyone
    # (ThingsBoard's token-as-user-name, "provision" without a password), anonymous CONNECTs are off, and
    # wrong credentials (the bridge's account with a wrong password falls through to broker_auth) are denied.
    for login in (("-u", access_token), ("-u", "provision"), (), ("-u", "device", "-P", "not-a-token"),
                  ("-u", "provisioning-bridge", "-P", "wrong"), ("-u", f"user-{run}", "-P", "wrong")):
        rc, err = _pub(port, *login, client_id=basic_id if login and login[1] == f"user-{run}" else None)
        assert rc != 0 and "bad user name or password" in err.lower(), (login, rc, err)
    # A device cannot read anyone's answers: subscriptions under provision/ (or wildcards over it) are refused.
    for topic in ("provision/response/#", "#", "+/response/+", f"provision/response/prov-{run}"):
        device = Client(port, f"dev-{run}", "device", access_token)
        try:
            assert device.connected
            assert device.subscribe(topic) == [128], topic
        finally:
            device.close()


def test_a_provisioning_client_cannot_ask_for_or_read_someone_elses_answer(
    node: Node, bridge: Bridge, profile: dict[str, Any]
) -> None:
    """MQTT 3.1.1 carries no Response Topic: the hijack would be writing the victim's request topic, or reading its
    response topic. broker_auth's topic checks refuse both (RabbitMQ closes a connection that publishes where it
    may not); the victim gets exactly its own answer."""
    run = uuid.uuid4().hex[:8]
    port = node.mqtt_port
    victim = Client(port, f"victim-{run}", "provision", "x")
    try:
        victim.own_response()
        for topic in (f"provision/response/victim-{run}", "provision/response/+"):
            attacker = Client(port, f"attacker-{run}", "provision", "x")
            assert attacker.subscribe(topic) == [128], topic
            attacker.close()
        # The bridge's client id is refused to anyone but the bridge's own (internal) account: taking it over would
        # take over the bridge's session queue, and the requests in it.
        bridge_id = f"{BRIDGE_CLIENT_ID}-{socket.gethostname()}"
        rc, err = _pub(port, "-u", "provision", "-P", "x", topic=f"provision/request/{bridge_id}", client_id=bridge_id)
        assert rc != 0 and "bad user name or password" in err.lower(), (rc, err)
        # Publishing on the victim's request topic: refused (RabbitMQ closes the attacker's connection).
        _pub(port, "-u", "provision", "-P", "x", topic=f"provision/request/victim-{run}", client_id=f"attacker-{run}")
        # Positive signal: the attacker's own request, after the forged one, is answered to it.
        own = _provision(node, profile, f"attacker-{run}")
        assert own["status"] == "SUCCESS"
        victim.ask(tb_request(profile, deviceName=f"victim-{run}"))
        assert [a["status"] for a in victim.wait_for(1)] == ["SUCCESS"]
        time.sleep(0.3)
    finally:
        victim.close()
    assert len(victim.messages) == 1
    assert "ignored" not in bridge.output() and "refused_" not in bridge.output()  # nothing forged reached it


def test_a_bridge_restart_and_a_broker_restart_lose_no_request(
    node: Node, bridge: Bridge, profile: dict[str, Any]
) -> None:
    """Requests wait in the bridge's durable session queue while it is down, and there survive a RabbitMQ
    restart (kill -9 of the private node); answers wait in the devices' persistent sessions."""
    run = uuid.uuid4().hex[:8]
    port = node.mqtt_port
    ids = [f"persist-{run}-{i}" for i in range(3)]
    for client_id in ids:  # persistent sessions subscribed to their answers
        device = Client(port, client_id, "provision", "x", clean=False)
        device.own_response()
        device.close()
    bridge.stop()
    for client_id in ids:
        device = Client(port, client_id, "provision", "x", clean=False)
        device.ask(tb_request(profile, deviceName=client_id))
        device.close()
    node.rabbit.restart()
    node.wait_mqtt()
    bridge.start()
    for client_id in ids:
        device = Client(port, client_id, "provision", "x", clean=False)
        try:
            assert [a["status"] for a in device.wait_for(1, timeout=30)] == ["SUCCESS"], client_id
        finally:
            device.close()
    assert "subscribed to provision/request/#" in bridge.output()
    assert os.environ.get("RABBITMQ_NODENAME", "") != node.rabbit.node_name  # (never the machine's node)
