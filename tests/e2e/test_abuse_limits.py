"""Rate limits that protect without locking out (issue 13), against the real processes.

Each test uses its own loopback source addresses (127.0.x.y, all reaching the stack on 127.0.0.1) and its
own profile, so the per-source and per-profile budgets of one test never touch another's. Clients: httpx
bound to a source address, paho bound to one, aiocoap's message encoder over a UDP socket bound to one
(a forged source is just a socket bound to an address that is not the sender's).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiocoap
import httpx
import paho.mqtt.client as mqtt
import pytest
from aiocoap.numbers.codes import Code
from devstack import Stack
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import Infra
from tests.ports import free_port

from . import mqtt_clients as mc
from .conftest import Admin, Env, module_env, tb_request

#: Wrong secrets per (source, key) and per source, per minute; provisions per source and per profile.
PER_KEY, PER_SOURCE = 5, 8
SUCCESS_PER_SOURCE, SUCCESS_PER_PROFILE = 3, 4
TRUSTED_PROXY = "127.0.0.2"
TOO_MANY_FAILURES = "Too many failed provisioning attempts; retry later"
TOO_MANY_PROVISIONS = "Too many provisioning requests; retry later"


@pytest.fixture(scope="module")
def env(infra: Infra, tls_files: tuple[Path, Path, Path]) -> Iterator[Env]:
    with module_env(
        infra, tls_files,
        PROVISION_FAILURES_PER_MINUTE=str(PER_KEY),
        PROVISION_SOURCE_FAILURES_PER_MINUTE=str(PER_SOURCE),
        PROVISION_RATE_LIMIT_PER_SOURCE=f"{SUCCESS_PER_SOURCE}:3600",
        PROVISION_RATE_LIMIT_PER_PROFILE=f"{SUCCESS_PER_PROFILE}:3600",
        FORWARDED_ALLOW_IPS=TRUSTED_PROXY,
    ) as environment:
        yield environment


# --- clients bound to a source address --------------------------------------------------------------


def http_from(env: Env, source: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(base_url=env.http_url, transport=transport, timeout=30) as client:
        return client.post("/api/v1/provision", json=body, headers=headers)


class Mqtt:
    """A paho provisioning session bound to ``source``; keeps responses, PUBACK reason codes and the disconnect."""

    def __init__(self, env: Env, source: str, protocol: int = mqtt.MQTTv311) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"c-{uuid.uuid4().hex[:10]}",
                                  protocol=protocol)
        self.client.username_pw_set("provision")
        self.messages: list[dict[str, Any]] = []
        self.acks: list[int] = []
        self.connected, self.subscribed, self.disconnected = threading.Event(), threading.Event(), threading.Event()
        self.got = threading.Condition()
        self.client.on_connect = lambda *a: self.connected.set()
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_disconnect = lambda *a: self.disconnected.set()
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", env.mqtt_port, keepalive=60, bind_address=source)
        self.client.loop_start()
        assert self.connected.wait(10)
        self.client.subscribe("/provision/response", qos=1)
        assert self.subscribed.wait(10)

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self.got:
            self.messages.append(json.loads(message.payload))
            self.got.notify_all()

    def _on_publish(self, _c: Any, _u: Any, _mid: int, reason_code: Any, _p: Any) -> None:
        with self.got:
            self.acks.append(int(getattr(reason_code, "value", reason_code)))
            self.got.notify_all()

    def publish(self, body: dict[str, Any]) -> None:
        self.client.publish("/provision/request", json.dumps(body), qos=1)

    def wait(self, messages: int = 0, acks: int = 0) -> None:
        with self.got:
            assert self.got.wait_for(lambda: len(self.messages) >= messages and len(self.acks) >= acks, 15), (
                self.messages, self.acks)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def mqtt_from(env: Env, source: str, body: dict[str, Any]) -> dict[str, Any]:
    session = Mqtt(env, source)
    try:
        session.publish(body)
        session.wait(messages=1)
        return session.messages[0]
    finally:
        session.close()


def coap_from(env: Env, source: str, body: dict[str, Any]) -> aiocoap.Message:
    """One confirmable POST from a UDP socket bound to ``source``; the answer decoded by aiocoap."""
    message = aiocoap.Message(code=Code.POST, uri_path=("api", "v1", "provision"), payload=json.dumps(body).encode())
    message.mtype = aiocoap.CON
    message.mid = int.from_bytes(uuid.uuid4().bytes[:2], "big")
    message.token = uuid.uuid4().bytes[:4]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(15)
        sock.sendto(message.encode(), ("127.0.0.1", env.coap_port))
        while True:
            answer = aiocoap.Message.decode(sock.recv(65536))
            if answer.token == message.token and answer.code != Code.EMPTY:
                return answer


def wrong(profile: dict[str, Any]) -> dict[str, Any]:
    return tb_request(profile, provisionDeviceSecret="guess-" + uuid.uuid4().hex[:8])


def device(profile: dict[str, Any]) -> dict[str, Any]:
    return tb_request(profile, deviceName="dev-" + uuid.uuid4().hex[:10])


# --- tests ----------------------------------------------------------------------------------------------


def test_the_right_secret_succeeds_during_a_wrong_secret_flood_on_its_key(env: Env, stack: Stack, admin: Admin) -> None:
    profile = admin.create_profile()
    # 70 wrong secrets on the key from 70 HTTP sources (the old per-key lockout took 60), and more over MQTT
    # and CoAP; one attacker address also runs into its own limit.
    for i in range(70):
        assert http_from(env, f"127.0.1.{i + 1}", wrong(profile)).json()["status"] == "NOT_FOUND"
    for i in range(3):
        assert mqtt_from(env, f"127.0.2.{i + 1}", wrong(profile))["status"] == "NOT_FOUND"
        assert coap_from(env, f"127.0.3.{i + 1}", wrong(profile)).code == Code.BAD_REQUEST
    refused = [http_from(env, "127.0.1.200", wrong(profile)) for _ in range(PER_KEY + 1)]
    assert [r.status_code for r in refused] == [200] * PER_KEY + [429]
    assert refused[-1].json() == {"errorMsg": TOO_MANY_FAILURES, "status": "FAILURE"}
    assert int(refused[-1].headers["retry-after"]) >= 1
    # Devices with the right secret, from their own addresses, over each transport.
    ok = http_from(env, "127.0.4.1", device(profile))
    assert ok.status_code == 200 and ok.json()["status"] == "SUCCESS"
    assert mqtt_from(env, "127.0.4.2", device(profile))["status"] == "SUCCESS"
    answer = coap_from(env, "127.0.4.3", device(profile))
    assert answer.code == Code.CREATED and json.loads(answer.payload)["status"] == "SUCCESS"


def test_behind_a_trusted_proxy_the_real_address_counts_and_an_untrusted_forwarded_for_is_ignored(
    env: Env, stack: Stack, admin: Admin
) -> None:
    profile = admin.create_profile()
    # Through the trusted proxy: client 198.51.100.7 uses up its budget; client 198.51.100.8 is not affected.
    answers = [http_from(env, TRUSTED_PROXY, wrong(profile), {"X-Forwarded-For": "198.51.100.7"})
               for _ in range(PER_KEY + 1)]
    assert [a.status_code for a in answers] == [200] * PER_KEY + [429]
    ok = http_from(env, TRUSTED_PROXY, device(profile), {"X-Forwarded-For": "198.51.100.8"})
    assert ok.json()["status"] == "SUCCESS"
    # From an address that is not a trusted proxy, X-Forwarded-For is ignored: a new one per request does
    # not give a new budget.
    answers = [http_from(env, "127.0.0.3", wrong(profile), {"X-Forwarded-For": f"203.0.113.{i}"})
               for i in range(PER_KEY + 1)]
    assert [a.status_code for a in answers] == [200] * PER_KEY + [429]
    refused = http_from(env, "127.0.0.3", device(profile), {"X-Forwarded-For": "203.0.113.99"})
    assert refused.status_code == 429 and refused.json()["errorMsg"] == TOO_MANY_FAILURES


def test_forged_coap_sources_cannot_lock_an_address_out_of_http_and_mqtt(env: Env, stack: Stack, admin: Admin) -> None:
    profile = admin.create_profile()
    victim = "127.0.0.61"
    # Forged datagrams "from" the victim, more than its per-source budget: CoAP's own bucket is used up ...
    codes = [coap_from(env, victim, wrong(profile)).code for _ in range(PER_SOURCE + 2)]
    assert codes[-1] == Code.TOO_MANY_REQUESTS
    refused = coap_from(env, victim, device(profile))
    assert refused.code == Code.TOO_MANY_REQUESTS and refused.opt.max_age >= 1
    # ... the victim's HTTP and MQTT are not.
    assert http_from(env, victim, device(profile)).json()["status"] == "SUCCESS"
    assert mqtt_from(env, victim, device(profile))["status"] == "SUCCESS"


def test_successful_provisions_are_limited_per_source_and_per_profile_with_retry_after(
    env: Env, stack: Stack, admin: Admin
) -> None:
    profile = admin.create_profile()
    answers = [http_from(env, "127.0.0.71", device(profile)) for _ in range(SUCCESS_PER_SOURCE + 1)]
    assert [a.json()["status"] for a in answers] == ["SUCCESS"] * SUCCESS_PER_SOURCE + ["FAILURE"]
    assert answers[-1].status_code == 429 and answers[-1].json()["errorMsg"] == TOO_MANY_PROVISIONS
    assert int(answers[-1].headers["retry-after"]) > 60  # 3 per hour: the next one in ~20 minutes
    # The profile's budget (4): one more from another address, then every address is refused.
    assert http_from(env, "127.0.0.72", device(profile)).json()["status"] == "SUCCESS"
    refused = http_from(env, "127.0.0.73", device(profile))
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    coap = coap_from(env, "127.0.0.74", device(profile))
    assert coap.code == Code.TOO_MANY_REQUESTS and coap.opt.max_age >= 1
    assert json.loads(coap.payload) == {"errorMsg": TOO_MANY_PROVISIONS, "status": "FAILURE"}
    # MQTT 5: the FAILURE answer, PUBACK 0x97 (quota exceeded), then the connection is closed.
    session = Mqtt(env, "127.0.0.75", protocol=mqtt.MQTTv5)
    try:
        session.publish(device(profile))
        session.wait(messages=1, acks=1)
        assert session.messages[0] == {"errorMsg": TOO_MANY_PROVISIONS, "status": "FAILURE"}
        assert session.acks == [0x97]
        assert session.disconnected.wait(10)
    finally:
        session.close()


def test_a_second_provision_request_on_one_mqtt_connection_is_refused(env: Env, stack: Stack, admin: Admin) -> None:
    profile = admin.create_profile()
    session = Mqtt(env, "127.0.0.81", protocol=mqtt.MQTTv5)
    try:
        session.publish(device(profile))
        session.wait(messages=1, acks=1)
        assert session.messages[0]["status"] == "SUCCESS"
        session.publish(device(profile))
        session.wait(acks=2)
        assert session.acks == [0, 0x97]
        assert session.disconnected.wait(10)
        assert len(session.messages) == 1
    finally:
        session.close()


def test_two_core_instances_enforce_one_shared_budget(env: Env, stack: Stack, admin: Admin) -> None:
    """A second provisioning-core on the same queue and database: requests alternate between the two
    consumers, and the source still gets PER_KEY wrong secrets, not twice as many."""
    second = Stack(env.variables(), ["provisioning_core"]).start(timeout=60)
    try:
        profile = admin.create_profile()
        answers = [http_from(env, "127.0.0.91", wrong(profile)).status_code for _ in range(3 * PER_KEY)]
    finally:
        second.stop()
    # A token comes back every 60 / PER_KEY = 12 s; a slow run may see one more.
    assert answers.count(200) in (PER_KEY, PER_KEY + 1), answers
    assert answers[:PER_KEY] == [200] * PER_KEY and answers[-1] == 429



class ProxyBalancer:
    """A TCP load balancer that sends a PROXY v1 header (as HAProxy's ``send-proxy``), claiming for each
    connection the client address ``claim(n)`` (the n-th connection), then relays bytes both ways."""

    def __init__(self, upstream: int, claim: Any) -> None:
        self._upstream, self._claim, self._count = upstream, claim, 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, (_, port) = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._upstream))
            claimed = self._claim(self._count)
            self._count += 1
            upstream.sendall(f"PROXY TCP4 {claimed} 127.0.0.1 {port} {self._upstream}\r\n".encode())
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._relay, args=(a, b), daemon=True).start()

    @staticmethod
    def _relay(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()


def test_mqtt_behind_a_proxy_protocol_balancer_is_limited_by_the_real_client_address(
    env: Env, stack: Stack, admin: Admin
) -> None:
    """MQTT_PROXY_PROTOCOL=true: every connection reaches the gateway from the balancer (127.0.0.1), yet the
    client whose wrong secrets used up its budget is refused and another client is not."""
    port = free_port()
    gateway = Stack(env.variables(MQTT_PORT=str(port), MQTTS_PORT="0", COAP_PORT="0", HTTP_PORT=str(free_port()),
                                  MQTT_PROXY_PROTOCOL="true"), ["mqtt_gateway"]).start(timeout=60)
    profile = admin.create_profile()
    attacker = ProxyBalancer(port, lambda n: "198.51.100.20")
    device_lb = ProxyBalancer(port, lambda n: "198.51.100.21")
    try:
        answers = [mqtt_via(attacker.port, wrong(profile)) for _ in range(PER_KEY + 1)]
        assert [a["status"] for a in answers] == ["NOT_FOUND"] * PER_KEY + ["FAILURE"]
        assert answers[-1]["errorMsg"] == TOO_MANY_FAILURES
        assert mqtt_via(device_lb.port, device(profile))["status"] == "SUCCESS"
        # A connection without a PROXY header (straight to the gateway) is closed before CONNACK.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"\x10\x12\x00\x04MQTT\x04\x02\x00\x3c\x00\x06abcdef")
            assert sock.recv(16) == b""
    finally:
        attacker.close()
        device_lb.close()
        gateway.stop()


def mqtt_via(port: int, body: dict[str, Any]) -> dict[str, Any]:
    """Provision through a balancer listening on ``port`` (paho, from 127.0.0.1)."""
    return json.loads(mc.provision(port, body).payload)
