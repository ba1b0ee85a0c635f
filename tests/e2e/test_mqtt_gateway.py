"""The MQTT gateway with ThingsBoard's four example flows (paho-mqtt), privacy, refusals and robustness."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from devstack import Stack
from mqtt_gateway import codec
from provisioning_common import mqtt_client_packets as client_codec
from provisioning_common.proto import transport_pb2 as pb

from tests.pki import issue, pem_body, write_client_files

from . import mqtt_clients as mc
from .conftest import Admin, Env, drop_core_queue, tb_request
from .test_http_provisioning import TelemetryListener, device_by_name


def _device_cert(tmp_path: Path, cn: str = "x509-device") -> tuple[str, str, str]:
    """A self-signed device certificate as ThingsBoard's X.509 example makes it: (pem, cert file, key file)."""
    device = issue(cn)
    cert_file, key_file = write_client_files(tmp_path, device)
    return device.pem, cert_file, key_file


# --- ThingsBoard's four example clients ------------------------------------------------------


async def test_server_generated_token_then_telemetry(env: Env, stack: Stack, admin: Admin, profile: dict) -> None:
    name = f"mqtt-{uuid.uuid4().hex[:6]}"
    answer = await asyncio.to_thread(mc.provision_json, env.mqtt_port, tb_request(profile, deviceName=name))
    assert list(answer) == ["credentialsValue", "credentialsType", "status"]
    assert answer["status"] == "SUCCESS" and answer["credentialsType"] == "ACCESS_TOKEN"
    device = device_by_name(admin, name)
    async with TelemetryListener(env, device["id"]) as listener:
        client = await asyncio.to_thread(mc.connect, env.mqtt_port, username=answer["credentialsValue"])
        try:
            assert mc.accepted(client)
            info = client.client.publish("v1/devices/me/telemetry", json.dumps({"temperature": 21}), qos=1)
            await asyncio.to_thread(info.wait_for_publish, 5)
            assert info.is_published()
            assert json.loads(await listener.get()) == {"temperature": 21}
        finally:
            client.stop()


def test_device_supplied_token(env: Env, stack: Stack, profile: dict) -> None:
    token = f"mqtt-token-{uuid.uuid4().hex[:8]}"
    name = f"d-{uuid.uuid4().hex[:8]}"  # not the token: names are logged
    answer = mc.provision_json(env.mqtt_port, tb_request(profile, deviceName=name, credentialsType="ACCESS_TOKEN",
                                                        token=token))
    assert answer == {"credentialsValue": token, "credentialsType": "ACCESS_TOKEN", "status": "SUCCESS"}
    client = mc.connect(env.mqtt_port, username=token)
    try:
        assert mc.accepted(client)
    finally:
        client.stop()


def test_mqtt_basic_then_connect_with_those_credentials(env: Env, stack: Stack, profile: dict) -> None:
    client_id = f"basic-{uuid.uuid4().hex[:8]}"
    answer = mc.provision_json(env.mqtt_port, tb_request(
        profile, deviceName=client_id, credentialsType="MQTT_BASIC", clientId=client_id, username="user",
        password="secret-pw"))
    assert answer["credentialsValue"] == {"clientId": client_id, "userName": "user", "password": "secret-pw"}
    good = mc.connect(env.mqtt_port, client_id=client_id, username="user", password="secret-pw")
    try:
        assert mc.accepted(good)
    finally:
        good.stop()
    wrong_password = mc.connect(env.mqtt_port, client_id=client_id, username="user", password="nope")
    wrong_password.stop()
    assert mc.refusal_value(wrong_password) == mc.NOT_AUTHORIZED
    wrong_client = mc.connect(env.mqtt_port, client_id="someone-else", username="user", password="secret-pw")
    wrong_client.stop()
    assert mc.refusal_value(wrong_client) == mc.NOT_AUTHORIZED


def test_x509_self_signed_certificate_over_tls(env: Env, stack: Stack, profile: dict, tmp_path: Path) -> None:
    pem, cert_file, key_file = _device_cert(tmp_path)
    tls = mc.TlsOptions(str(env.ca_file), cert_file, key_file)
    # ThingsBoard's example provisions over the TLS port, presenting the certificate it registers.
    answer = mc.provision_json(env.mqtts_port, tb_request(profile, deviceName=f"x509-{uuid.uuid4().hex[:6]}",
                                                         credentialsType="X509_CERTIFICATE", hash=pem), tls=tls)
    assert answer == {"credentialsValue": pem_body(pem), "credentialsType": "X509_CERTIFICATE", "status": "SUCCESS"}
    device = mc.connect(env.mqtts_port, tls=tls)
    try:
        assert mc.accepted(device)
    finally:
        device.stop()
    _, other_cert, other_key = _device_cert(tmp_path, "stranger")
    stranger = mc.connect(env.mqtts_port, tls=mc.TlsOptions(str(env.ca_file), other_cert, other_key))
    stranger.stop()
    assert mc.refusal_value(stranger) == mc.NOT_AUTHORIZED


def test_innoway_token_as_password(env: Env, stack: Stack, profile: dict) -> None:
    answer = mc.provision_json(env.mqtt_port, {"provision_key": profile["provisionDeviceKey"],
                                              "provision_secret": profile["provisionDeviceSecret"],
                                              "device_name": f"inno-{uuid.uuid4().hex[:6]}"})
    assert list(answer) == ["device_id", "status", "token"] and len(answer["token"]) == 32
    client = mc.connect(env.mqtt_port, username="anything", password=answer["token"])
    try:
        assert mc.accepted(client)
    finally:
        client.stop()


# --- protocol versions, QoS, payload formats ----------------------------------------------------


@pytest.mark.parametrize("protocol", [mc.V31, mc.V311, mc.V5], ids=["3.1", "3.1.1", "5"])
@pytest.mark.parametrize("qos", [0, 1])
def test_every_protocol_version_and_qos(env: Env, stack: Stack, profile: dict, protocol: int, qos: int) -> None:
    message = mc.provision(env.mqtt_port, tb_request(profile), protocol=protocol, qos=qos)
    assert json.loads(message.payload)["status"] == "SUCCESS"
    assert message.topic == "/provision/response" and message.qos == 1 and not message.retain


def test_response_qos_follows_the_subscription(env: Env, stack: Stack, profile: dict) -> None:
    message = mc.provision(env.mqtt_port, tb_request(profile), subscribe_qos=0)
    assert message.qos == 0


def test_protobuf_request_gets_a_protobuf_answer(env: Env, stack: Stack, profile: dict) -> None:
    request = pb.ProvisionDeviceRequestMsg(
        deviceName=f"proto-{uuid.uuid4().hex[:6]}",
        provisionDeviceCredentialsMsg=pb.ProvisionDeviceCredentialsMsg(
            provisionDeviceKey=profile["provisionDeviceKey"], provisionDeviceSecret=profile["provisionDeviceSecret"]),
    )
    message = mc.provision(env.mqtt_port, request.SerializeToString())
    answer = pb.ProvisionDeviceResponseMsg.FromString(message.payload)
    assert answer.status == pb.SUCCESS and len(answer.credentialsValue) == 20
    wrong = pb.ProvisionDeviceRequestMsg(provisionDeviceCredentialsMsg=pb.ProvisionDeviceCredentialsMsg(
        provisionDeviceKey=profile["provisionDeviceKey"], provisionDeviceSecret="wrong"))
    assert mc.provision(env.mqtt_port, wrong.SerializeToString()).payload == b"\x08\x02"


def test_not_found_answer_is_byte_exact(env: Env, stack: Stack) -> None:
    message = mc.provision(env.mqtt_port, {"provisionDeviceKey": "nope", "provisionDeviceSecret": "nope"})
    assert message.payload == b'{"errorMsg":"Provision data was not found!","status":"NOT_FOUND"}'


# --- privacy and refusals ---------------------------------------------------------------------


def test_responses_reach_only_the_asking_connection(env: Env, stack: Stack, profile: dict) -> None:
    spy = mc.connect(env.mqtt_port, username="provision")
    try:
        spy.client.subscribe("/provision/response", qos=1)
        assert spy.subscribed.wait(5)
        for _ in range(3):
            assert mc.provision_json(env.mqtt_port, tb_request(profile))["status"] == "SUCCESS"
        # Positive signal first: the spy's own request, sent after the others were answered, is answered on
        # the same connection, so an answer leaked to it earlier would have arrived before this one.
        token, name = f"spy-{uuid.uuid4().hex}", f"s-{uuid.uuid4().hex[:8]}"
        spy.client.publish("/provision/request", json.dumps(
            tb_request(profile, deviceName=name, credentialsType="ACCESS_TOKEN", token=token)), qos=1)
        assert spy.got_message.wait(10), "the spy's own request was not answered"
        assert [json.loads(m.payload) for m in spy.messages] == [
            {"credentialsValue": token, "credentialsType": "ACCESS_TOKEN", "status": "SUCCESS"}]
    finally:
        spy.stop()


def test_provision_session_may_not_subscribe_elsewhere(env: Env, stack: Stack) -> None:
    client = mc.connect(env.mqtt_port, username="provision")
    try:
        client.client.subscribe([("#", 1), ("/provision/response", 1), ("v1/devices/me/rpc/request/+", 0)])
        assert client.subscribed.wait(5)
        assert [int(getattr(c, "value", c)) for c in client.granted] == [0x80, 1, 0x80]
    finally:
        client.stop()


def test_provision_session_publishing_elsewhere_is_disconnected(env: Env, stack: Stack) -> None:
    client = mc.connect(env.mqtt_port, username="provision")
    try:
        client.client.publish("v1/devices/me/telemetry", "{}", qos=1)
        assert client.disconnected.wait(5)
    finally:
        client.stop()


@pytest.mark.parametrize(
    ("level", "connack"),
    [(3, b"\x20\x02\x00\x05"), (4, b"\x20\x02\x00\x05"), (5, b"\x20\x03\x00\x87\x00")],
    ids=["3.1", "3.1.1", "5"],
)
def test_unknown_token_is_refused_then_closed(env: Env, stack: Stack, level: int, connack: bytes) -> None:
    """CONNACK "not authorized" as ThingsBoard sends it (5; MQTT 5: 0x87), then the server closes."""
    packet = client_codec.encode_connect(f"c-{level}", username=f"unknown-{uuid.uuid4().hex}", protocol_level=level)
    sock = mc.raw_connect(env.mqtt_port, packet)
    try:
        assert mc.read_until_closed(sock) == connack
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("level", "connack", "puback"),
    [(4, b"\x20\x02\x00\x00", b"\x40\x02\x00\x07"), (5, b"\x20\x03\x00\x00\x00", b"\x40\x03\x00\x07\x90")],
    ids=["3.1.1", "5"],
)
def test_a_topic_outside_the_device_api_gets_thingsboards_puback_and_the_session_stays(
    env: Env, stack: Stack, profile: dict, level: int, connack: bytes, puback: bytes
) -> None:
    """ThingsBoard's processDevicePublish: an unknown topic is acknowledged with "topic name invalid"
    (0x90, visible in MQTT 5 only) and nothing is stored; the session stays (the PINGRESP after it)."""
    token = mc.provision_json(env.mqtt_port, tb_request(profile))["credentialsValue"]
    packets = (client_codec.encode_connect(f"c-{level}", username=token, protocol_level=level)
               + codec.encode_publish("some/other/topic", b"{}", qos=1, packet_id=7, protocol_level=level)
               + client_codec.encode_pingreq())
    sock = mc.raw_connect(env.mqtt_port, packets)
    try:
        expected = connack + puback + b"\xd0\x00"
        sock.settimeout(5)
        data = b""
        while len(data) < len(expected):
            chunk = sock.recv(64)
            assert chunk, f"closed after {data!r}"
            data += chunk
        assert data == expected
    finally:
        sock.close()


def test_json_error_answers_puback_0x83_and_disconnects_v5(env: Env, stack: Stack) -> None:
    client = mc.connect(env.mqtt_port, username="provision", protocol=mc.V5)
    try:
        client.client.publish("/provision/request", json.dumps({"provisionDeviceKey": "only-key"}), qos=1)
        assert client.disconnected.wait(5)
    finally:
        client.stop()


# --- robustness -------------------------------------------------------------------------------


def test_malformed_packets_close_only_their_connection(env: Env, stack: Stack, profile: dict) -> None:
    bad_packets = [
        b"\x10\xff\xff\xff\xff\x7f",  # remaining length longer than 4 bytes
        b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02i",  # truncated CONNECT (declares 14, sends 13)
        b"\x30\x05\x00\x01a",  # PUBLISH before CONNECT
        client_codec.encode_connect("c", username="provision") + b"\x30\x04\x00\x02a#",  # wildcard in a topic name
        client_codec.encode_connect("c", username="provision") + b"\x32\x05\x00\x01a\x00\x00",  # QoS 1 with packet id 0
        b"\x10" + b"\xff\xff\x7f" + b"x" * 10,  # declares ~2 MB: over the packet size limit
    ]
    for packet in bad_packets:
        sock = mc.raw_connect(env.mqtt_port, packet)
        try:
            if packet.startswith(b"\x10\x0e"):
                sock.shutdown(socket.SHUT_WR)
            data = mc.read_until_closed(sock, timeout=12)
        finally:
            sock.close()
        assert b"\x30" not in data[4:] or data == b""  # never a provision response on garbage
    # The gateway still serves everyone else.
    assert mc.provision_json(env.mqtt_port, tb_request(profile))["status"] == "SUCCESS"


async def test_mqtt5_empty_client_id_without_clean_start_gets_an_assigned_id(
    env: Env, stack: Stack, profile: dict
) -> None:
    """ThingsBoard's Python SDK reconnects with MQTT 5, an empty client id and Clean Start 0. MQTT 5
    lets the server assign the id (MQTT-3.1.3-6) and say so in CONNACK (Assigned Client Identifier);
    answering with a 3.1.1-shaped refusal killed paho's network thread. Checked with paho itself."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    name = f"sdk-{uuid.uuid4().hex[:6]}"
    answer = await asyncio.to_thread(mc.provision_json, env.mqtt_port, tb_request(profile, deviceName=name))
    connected: asyncio.Future[tuple[int, object]] = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()

    def on_connect(_c: object, _u: object, _flags: object, reason: object, properties: object) -> None:
        value = getattr(reason, "value", reason)
        loop.call_soon_threadsafe(lambda: connected.done() or connected.set_result((value, properties)))

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="", protocol=mqtt.MQTTv5)
    client.username_pw_set(answer["credentialsValue"])
    client.on_connect = on_connect
    client.connect("127.0.0.1", env.mqtt_port, clean_start=False)
    client.loop_start()
    try:
        reason, properties = await asyncio.wait_for(connected, 10)
        assert reason == 0
        assigned = getattr(properties, "AssignedClientIdentifier", "")
        assert assigned.startswith("auto-")
        info = client.publish("v1/devices/me/telemetry", json.dumps({"t": 1}), qos=1)
        await asyncio.to_thread(info.wait_for_publish, 5)
        assert info.is_published() and client.is_connected()  # the session works after the CONNACK
    finally:
        client.loop_stop()
        client.disconnect()


@pytest.mark.parametrize(
    ("level", "connack"), [(3, b"\x20\x02\x00\x02"), (4, b"\x20\x02\x00\x02")], ids=["3.1", "3.1.1"]
)
def test_empty_client_id_is_refused_where_the_level_forbids_it(
    env: Env, stack: Stack, level: int, connack: bytes
) -> None:
    """3.1 never allows an empty id, 3.1.1 only with a clean session: CONNACK 2 at the client's level."""
    packet = client_codec.encode_connect("", username="provision", clean_session=level == 3, protocol_level=level)
    sock = mc.raw_connect(env.mqtt_port, packet)
    try:
        assert mc.read_until_closed(sock) == connack
    finally:
        sock.close()


def test_unsupported_protocol_level_gets_connack_1(env: Env, stack: Stack) -> None:
    packet = b"\x10\x0e\x00\x04MQTT\x07\x02\x00\x3c\x00\x02id"
    sock = mc.raw_connect(env.mqtt_port, packet)
    try:
        assert mc.read_until_closed(sock) == b"\x20\x02\x00\x01"
    finally:
        sock.close()


def test_keep_alive_is_enforced(env: Env, stack: Stack) -> None:
    sock = mc.raw_connect(env.mqtt_port, client_codec.encode_connect("idle", username="provision", keep_alive=1))
    try:
        started = time.monotonic()
        assert mc.read_until_closed(sock, timeout=10) == b"\x20\x02\x00\x00"
        assert 1.2 <= time.monotonic() - started < 5  # 1.5 x keep-alive, not forever
    finally:
        sock.close()


def test_pingreq_keeps_the_session_alive(env: Env, stack: Stack) -> None:
    sock = mc.raw_connect(env.mqtt_port, client_codec.encode_connect("pinger", username="provision", keep_alive=1))
    try:
        sock.settimeout(5)
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        for _ in range(3):
            time.sleep(0.8)
            sock.sendall(client_codec.encode_pingreq())
            assert sock.recv(2) == b"\xd0\x00"
    finally:
        sock.close()


def test_connect_timeout_closes_silent_connections(env: Env, stack: Stack) -> None:
    sock = socket.create_connection(("127.0.0.1", env.mqtt_port))
    try:
        assert mc.read_until_closed(sock, timeout=20) == b""
    finally:
        sock.close()


async def test_thousands_of_idle_connections_do_not_block_provisioning(
    env: Env, stack: Stack, profile: dict
) -> None:
    connect = client_codec.encode_connect("idle", username="provision", keep_alive=120)
    writers = []
    try:
        for _ in range(2000):
            reader, writer = await asyncio.open_connection("127.0.0.1", env.mqtt_port)
            writer.write(connect)
            writers.append((reader, writer))
        for reader, _ in writers[-10:]:
            assert await asyncio.wait_for(reader.readexactly(4), 10) == b"\x20\x02\x00\x00"
        started = time.monotonic()
        answer = json.loads(await mc.raw_provision(env.mqtt_port, json.dumps(tb_request(profile)).encode()))
        assert answer["status"] == "SUCCESS"
        assert time.monotonic() - started < 5
    finally:
        for _, writer in writers:
            writer.close()


def test_mosquitto_rr_provisions(env: Env, stack: Stack, profile: dict) -> None:
    tool = shutil.which("mosquitto_rr")
    if tool is None:
        pytest.skip("mosquitto-clients not installed")
    result = subprocess.run(
        [tool, "-h", "127.0.0.1", "-p", str(env.mqtt_port), "-u", "provision", "-V", "5", "-q", "1",
         "-t", "/provision/request", "-e", "/provision/response", "-W", "10",
         "-m", json.dumps(tb_request(profile))],
        capture_output=True, text=True, timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "SUCCESS"


def test_core_missing_gives_a_failure_answer_not_silence(env: Env, stack: Stack) -> None:
    lonely = Env(env.infra, database=env.database, namespace=f"e2e-mqtt-nocore-{uuid.uuid4().hex[:6]}.")
    variables = lonely.variables(PROVISION_TIMEOUT_S="1", BUS_REPLY_GRACE_S="0.5", MQTTS_PORT="0")
    gateway = Stack(variables, ["mqtt_gateway"]).start()
    try:
        started = time.monotonic()
        message = mc.provision(lonely.mqtt_port, {"provisionDeviceKey": "k", "provisionDeviceSecret": "s"})
        assert message.payload == b'{"errorMsg":"Provisioning timed out","status":"FAILURE"}'
        assert time.monotonic() - started < 4
    finally:
        gateway.stop()
        # The gateway declared the core's queue so that requests wait for a core: remove it.
        asyncio.run(drop_core_queue(env.infra.rabbitmq_url, lonely.namespace))


# --- MQTT_BASIC variants (spec §9) -----------------------------------------------------------


def test_mqtt_basic_client_id_only(env: Env, stack: Stack, profile: dict) -> None:
    client_id = f"only-cid-{uuid.uuid4().hex[:8]}"
    answer = mc.provision_json(env.mqtt_port, tb_request(profile, deviceName=client_id,
                                                        credentialsType="MQTT_BASIC", clientId=client_id))
    assert answer["credentialsValue"] == {"clientId": client_id, "userName": "", "password": ""}
    good = mc.connect(env.mqtt_port, client_id=client_id)
    try:
        assert mc.accepted(good)
    finally:
        good.stop()
    other = mc.connect(env.mqtt_port, client_id=f"x{client_id}")
    other.stop()
    assert mc.refusal_value(other) == mc.NOT_AUTHORIZED


def test_mqtt_basic_username_and_password_with_any_client_id(env: Env, stack: Stack, profile: dict) -> None:
    username = f"user-{uuid.uuid4().hex[:8]}"
    answer = mc.provision_json(env.mqtt_port, tb_request(profile, deviceName=username, credentialsType="MQTT_BASIC",
                                                        username=username, password="pw-1"))
    assert answer["status"] == "SUCCESS"
    good = mc.connect(env.mqtt_port, client_id="whatever", username=username, password="pw-1")
    try:
        assert mc.accepted(good)
    finally:
        good.stop()
    no_password = mc.connect(env.mqtt_port, client_id="whatever", username=username)
    no_password.stop()
    assert mc.refusal_value(no_password) == mc.NOT_AUTHORIZED


def test_qos2_publish_is_refused_without_a_puback(env: Env, stack: Stack) -> None:
    connect = client_codec.encode_connect("q2", username="provision", protocol_level=5)
    publish = codec.encode_publish("/provision/request", b"{}", qos=2, packet_id=7, protocol_level=5)
    sock = mc.raw_connect(env.mqtt_port, connect + publish)
    try:
        data = mc.read_until_closed(sock)
    finally:
        sock.close()
    connack, rest = data[:5], data[5:]
    assert connack == b"\x20\x03\x00\x00\x00"
    assert rest == codec.encode_disconnect(0x9B, protocol_level=5)  # no PUBACK (0x40) before it


def test_zz_no_secret_in_service_logs(stack: Stack, admin: Admin) -> None:
    """Runs last in this module: no provision secret of any profile, and no password or device-chosen
    token used above, reached a log line of any service."""
    profiles = admin.http.get("/api/device-profiles", params={"pageSize": 1000}).json()["data"]
    secrets = {p["provisionDeviceSecret"] for p in profiles if p["provisionDeviceSecret"]}
    assert len(secrets) >= 5  # the module really made profiles
    logs = stack.output()
    assert "mqtt_gateway ready" in logs
    leaked = sorted(s for s in secrets | {"secret-pw", "pw-1", "mqtt-token-"} if s in logs)
    assert not leaked
