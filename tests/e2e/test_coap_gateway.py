"""The CoAP gateway against its real process: ThingsBoard's two CoAP example flows (aiocoap client), every
credentials type, both dialects, protobuf, block-wise transfer, CON/NON, deduplication and refusals."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiocoap
import asyncpg
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from devstack import Stack
from provisioning_common.proto import transport_pb2 as pb

from .conftest import Admin, Env, drop_core_queue, tb_request
from .test_http_provisioning import TelemetryListener, device_by_name

NOT_FOUND = b'{"errorMsg":"Provision data was not found!","status":"NOT_FOUND"}'
FAILURE = b'{"errorMsg":"Failed to provision device!","status":"FAILURE"}'
JSON_CF, OCTETS_CF = 50, 42

#: Every secret the tests hand out or receive, checked against the services' logs at the end.
SEEN_SECRETS: set[str] = set()


# --- clients ------------------------------------------------------------------------------------


class ClientLog(logging.Handler):
    """Keeps the aiocoap client's debug records: what the client really put on the wire."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
async def coap(stack: Stack) -> AsyncIterator[aiocoap.Context]:
    """An aiocoap client context (UDP only), as ThingsBoard's example clients use one."""
    context = await aiocoap.Context.create_client_context(transports=["udp6"], loggername="coap-test-client")
    try:
        yield context
    finally:
        await context.shutdown()


def _remember_secrets(payload: dict[str, Any]) -> None:
    for key in ("provisionDeviceSecret", "provision_secret", "token", "password"):
        if payload.get(key):
            SEEN_SECRETS.add(str(payload[key]))


async def coap_request(
    coap: aiocoap.Context, env: Env, path: str, payload: bytes | dict[str, Any] = b"", *,
    code: Code = Code.POST, non: bool = False, port: int | None = None,
) -> aiocoap.Message:
    if isinstance(payload, dict):
        _remember_secrets(payload)
        payload = json.dumps(payload).encode()
    message = aiocoap.Message(code=code, uri=f"coap://127.0.0.1:{port or env.coap_port}{path}", payload=payload,
                              transport_tuning=aiocoap.Unreliable if non else None)
    async with asyncio.timeout(30):
        response = await coap.request(message).response
    if response.opt.content_format == JSON_CF and response.payload:
        body = json.loads(response.payload)
        value = body.get("credentialsValue") or body.get("token")
        if isinstance(value, str) and len(value) < 100:
            SEEN_SECRETS.add(value)
    return response


class RawCoap:
    """CoAP over a plain UDP socket, to send exactly the datagrams a test needs (retransmissions, blocks)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect(("127.0.0.1", port))
        self._mid = int.from_bytes(uuid.uuid4().bytes[:2], "big")

    def message(self, path: tuple[str, ...], payload: bytes = b"", *, code: Code = Code.POST,
                token: bytes | None = None, **options: Any) -> aiocoap.Message:
        message = aiocoap.Message(code=code, uri_path=path, payload=payload, **options)
        message.mtype = aiocoap.CON
        self._mid = (self._mid + 1) & 0xFFFF
        message.mid = self._mid
        message.token = token if token is not None else uuid.uuid4().bytes[:4]
        return message

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    def recv(self, timeout: float = 10.0) -> bytes:
        self.sock.settimeout(timeout)
        return self.sock.recv(65536)

    def answer(self, timeout: float = 10.0) -> tuple[aiocoap.Message, list[bytes]]:
        """The response to the last request, and every datagram received for it (an empty ACK first when the
        server answered separately); a separate CON response is acknowledged."""
        datagrams: list[bytes] = []
        while True:
            raw = self.recv(timeout)
            datagrams.append(raw)
            message = aiocoap.Message.decode(raw)
            if message.code is Code.EMPTY and message.mtype is aiocoap.ACK:
                continue
            if message.mtype is aiocoap.CON:
                ack = aiocoap.Message(code=Code.EMPTY)
                ack.mtype, ack.mid, ack.token = aiocoap.ACK, message.mid, b""
                self.send(ack.encode())
            return message, datagrams

    def exchange(self, message: aiocoap.Message) -> aiocoap.Message:
        self.send(message.encode())
        return self.answer()[0]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(env: Env, stack: Stack) -> Iterator[RawCoap]:
    client = RawCoap(env.coap_port)
    yield client
    client.close()


def rsa_certificate_pem(common_name: str) -> str:
    """A self-signed 2048-bit RSA device certificate: its PEM alone is well over 1 KB."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def pem_body(pem: str) -> str:
    """What ThingsBoard answers for a PEM certificate: the base64 body without markers or newlines."""
    return "".join(line for line in pem.splitlines() if "CERTIFICATE" not in line)


async def device_count(db: asyncpg.Connection) -> int:
    return await db.fetchval("SELECT count(*) FROM devices")


# --- ThingsBoard's two CoAP example clients -----------------------------------------------------------


async def test_server_generated_token_then_telemetry(
    coap: aiocoap.Context, env: Env, admin: Admin, profile: dict
) -> None:
    name = f"coap-{uuid.uuid4().hex[:6]}"
    response = await coap_request(coap, env, "/api/v1/provision", tb_request(profile, deviceName=name))
    assert response.code is Code.CREATED and response.opt.content_format == JSON_CF
    body = json.loads(response.payload)
    assert list(body) == ["credentialsValue", "credentialsType", "status"]
    assert body["status"] == "SUCCESS" and body["credentialsType"] == "ACCESS_TOKEN"
    assert len(body["credentialsValue"]) == 20
    device = device_by_name(admin, name)
    assert device["provisionState"] == "provisioned"

    async with TelemetryListener(env, device["id"]) as listener:
        sent = await coap_request(coap, env, f"/api/v1/{body['credentialsValue']}/telemetry", b'{"temperature":25}')
        assert sent.code is Code.CREATED and sent.payload == b""
        assert json.loads(await listener.get()) == {"temperature": 25}


async def test_device_supplied_token(coap: aiocoap.Context, env: Env, profile: dict) -> None:
    token = f"coap-token-{uuid.uuid4().hex[:8]}"
    response = await coap_request(coap, env, "/api/v1/provision", tb_request(
        profile, deviceName=f"d-{uuid.uuid4().hex[:8]}", credentialsType="ACCESS_TOKEN", token=token))
    assert response.code is Code.CREATED
    assert response.payload == (
        b'{"credentialsValue":"' + token.encode() + b'","credentialsType":"ACCESS_TOKEN","status":"SUCCESS"}'
    )
    telemetry = await coap_request(coap, env, f"/api/v1/{token}/telemetry", b'[{"ts":1,"values":{"t":1}}]')
    assert telemetry.code is Code.CREATED


# --- credentials types, dialects, paths --------------------------------------------------------------


async def test_mqtt_basic(coap: aiocoap.Context, env: Env, profile: dict) -> None:
    client_id = f"cid-{uuid.uuid4().hex[:8]}"
    response = await coap_request(coap, env, "/api/v1/provision", tb_request(
        profile, deviceName=client_id, credentialsType="MQTT_BASIC", clientId=client_id, username="u1",
        password="coap-pa55"))
    assert response.code is Code.CREATED
    assert response.payload == (
        b'{"credentialsValue":{"clientId":"' + client_id.encode()
        + b'","userName":"u1","password":"coap-pa55"},"credentialsType":"MQTT_BASIC","status":"SUCCESS"}'
    )


async def test_x509_certificate_goes_block_wise(coap: aiocoap.Context, env: Env, profile: dict) -> None:
    pem = rsa_certificate_pem("coap-x509")
    request = tb_request(profile, deviceName=f"x509-{uuid.uuid4().hex[:6]}", credentialsType="X509_CERTIFICATE",
                         hash=pem)
    assert len(json.dumps(request)) > 1024  # more than one CoAP block
    client_log = ClientLog()
    logger = logging.getLogger("coap-test-client")
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(client_log)
    try:
        response = await coap_request(coap, env, "/api/v1/provision", request)
    finally:
        logger.removeHandler(client_log)
        logger.setLevel(previous)
    assert response.code is Code.CREATED, response.payload
    assert json.loads(response.payload) == {
        "credentialsValue": pem_body(pem), "credentialsType": "X509_CERTIFICATE", "status": "SUCCESS"}
    # The client really sent Block1 blocks and the server acknowledged each with its Block1 option.
    assert any("Response with Block1 option received, number = 0, more = 1" in m for m in client_log.messages), \
        client_log.messages
    # The same certificate for another device is refused.
    again = await coap_request(coap, env, "/api/v1/provision", {**request, "deviceName": request["deviceName"] + "-2"})
    assert (again.code, again.payload) == (Code.BAD_REQUEST, FAILURE)


def test_block_wise_on_the_wire(raw: RawCoap, profile: dict) -> None:
    """Block1 request (RFC 7959 §2.5) then Block2 answer, datagram by datagram, in 512-byte blocks."""
    pem = rsa_certificate_pem("coap-raw-x509")
    payload = json.dumps(tb_request(profile, deviceName=f"raw-{uuid.uuid4().hex[:6]}",
                                    credentialsType="X509_CERTIFICATE", hash=pem)).encode()
    _remember_secrets(json.loads(payload))
    blocks = [payload[i:i + 512] for i in range(0, len(payload), 512)]
    assert len(blocks) >= 3
    path = ("api", "v1", "provision")
    for number, block in enumerate(blocks[:-1]):
        answer = raw.exchange(raw.message(path, block, block1=BlockOption.BlockwiseTuple(number, True, 5)))
        assert answer.code is Code.CONTINUE
        assert answer.opt.block1 == BlockOption.BlockwiseTuple(number, True, 5)
    # The last block asks for the answer in 512-byte blocks too (RFC 7959 §2.4, early negotiation).
    last = raw.exchange(raw.message(path, blocks[-1], block1=BlockOption.BlockwiseTuple(len(blocks) - 1, False, 5),
                                    block2=BlockOption.BlockwiseTuple(0, False, 5)))
    assert last.code is Code.CREATED and last.opt.block1.block_number == len(blocks) - 1
    assert last.opt.block2 == BlockOption.BlockwiseTuple(0, True, 5)  # the answer is bigger than one block
    body, number = last.payload, 1
    while True:
        size_exp = last.opt.block2.size_exponent
        nxt = raw.exchange(raw.message(path, block2=BlockOption.BlockwiseTuple(number, False, size_exp)))
        assert nxt.code is Code.CREATED and nxt.opt.block2.block_number == number
        body += nxt.payload
        if not nxt.opt.block2.more:
            break
        number += 1
    assert json.loads(body) == {"credentialsValue": pem_body(pem), "credentialsType": "X509_CERTIFICATE",
                                "status": "SUCCESS"}


def test_block_out_of_order_is_4_08(raw: RawCoap) -> None:
    answer = raw.exchange(raw.message(("api", "v1", "provision"), b"x" * 512,
                                      block1=BlockOption.BlockwiseTuple(3, True, 5)))
    assert answer.code is Code.REQUEST_ENTITY_INCOMPLETE


async def test_innoway_dialect_on_its_path(coap: aiocoap.Context, env: Env, profile: dict) -> None:
    device_key = f"IMEI-{uuid.uuid4().hex[:10]}"
    request = {"provision_key": profile["provisionDeviceKey"], "provision_secret": profile["provisionDeviceSecret"],
               "device_name": f"coap {device_key}", "device_key": device_key}
    response = await coap_request(coap, env, "/api/provision", request)
    assert response.code is Code.CREATED and response.opt.content_format == JSON_CF
    body = json.loads(response.payload)
    assert list(body) == ["device_id", "status", "token"] and len(body["token"]) == 32
    wrong = await coap_request(coap, env, "/api/provision", {**request, "provision_secret": "wrong"})
    assert (wrong.code, wrong.payload) == (
        Code.BAD_REQUEST, b'{"status":"NOT_FOUND","error_msg":"Provision data was not found!"}')
    telemetry = await coap_request(coap, env, f"/api/v1/{body['token']}/telemetry", b'{"a":1}')
    assert telemetry.code is Code.CREATED


async def test_four_segment_provision_path(coap: aiocoap.Context, env: Env, profile: dict) -> None:
    response = await coap_request(coap, env, "/api/v1/anything/provision",
                                  tb_request(profile, deviceName=f"seg4-{uuid.uuid4().hex[:6]}"))
    assert response.code is Code.CREATED


async def test_not_found_and_failure_are_4_00_with_the_spec_body(
    coap: aiocoap.Context, env: Env, profile: dict
) -> None:
    unknown = await coap_request(coap, env, "/api/v1/provision",
                                 {"provisionDeviceKey": "no-such-key", "provisionDeviceSecret": "x"})
    assert (unknown.code, unknown.payload, unknown.opt.content_format) == (Code.BAD_REQUEST, NOT_FOUND, JSON_CF)
    name = f"twice-{uuid.uuid4().hex[:6]}"
    assert (await coap_request(coap, env, "/api/v1/provision", tb_request(profile, deviceName=name))).code \
        is Code.CREATED
    # Another request (its own token) for the taken name: FAILURE. (The same request again would
    # get its first answer: PROVISION_REPLAY_WINDOW_S.)
    twice = await coap_request(coap, env, "/api/v1/provision",
                               tb_request(profile, deviceName=name, credentialsType="ACCESS_TOKEN",
                                          token=f"token-of-{name}"))
    assert (twice.code, twice.payload) == (Code.BAD_REQUEST, FAILURE)


async def test_protobuf_request_gets_protobuf_answer(coap: aiocoap.Context, env: Env, profile: dict) -> None:
    name = f"proto-{uuid.uuid4().hex[:6]}"
    msg = pb.ProvisionDeviceRequestMsg(
        deviceName=name,
        provisionDeviceCredentialsMsg=pb.ProvisionDeviceCredentialsMsg(
            provisionDeviceKey=profile["provisionDeviceKey"], provisionDeviceSecret=profile["provisionDeviceSecret"]),
    )
    response = await coap_request(coap, env, "/api/v1/provision", msg.SerializeToString())
    assert response.code is Code.CREATED and response.opt.content_format == OCTETS_CF
    answer = pb.ProvisionDeviceResponseMsg.FromString(response.payload)
    assert answer.status == pb.SUCCESS and answer.credentialsType == pb.ACCESS_TOKEN
    assert len(answer.credentialsValue) == 20
    SEEN_SECRETS.add(answer.credentialsValue)
    wrong = pb.ProvisionDeviceRequestMsg(
        deviceName=name + "-w",
        provisionDeviceCredentialsMsg=pb.ProvisionDeviceCredentialsMsg(
            provisionDeviceKey=profile["provisionDeviceKey"], provisionDeviceSecret="wrong"),
    )
    refused = await coap_request(coap, env, "/api/v1/provision", wrong.SerializeToString())
    assert (refused.code, refused.payload, refused.opt.content_format) == (Code.BAD_REQUEST, b"\x08\x02", OCTETS_CF)


# --- CON / NON, retransmissions ----------------------------------------------------------------------


async def test_non_confirmable_request_is_answered(coap: aiocoap.Context, env: Env, profile: dict) -> None:
    response = await coap_request(coap, env, "/api/v1/provision",
                                  tb_request(profile, deviceName=f"non-{uuid.uuid4().hex[:6]}"), non=True)
    assert response.code is Code.CREATED and response.mtype is aiocoap.NON
    assert json.loads(response.payload)["status"] == "SUCCESS"


def test_retransmitted_request_is_provisioned_once(raw: RawCoap, admin: Admin, profile: dict) -> None:
    name = f"retx-{uuid.uuid4().hex[:6]}"
    payload = tb_request(profile, deviceName=name)
    _remember_secrets(payload)
    datagram = raw.message(("api", "v1", "provision"), json.dumps(payload).encode()).encode()
    raw.send(datagram)
    raw.send(datagram)  # a retransmission while the first is being answered: dropped by deduplication
    answer, first_datagrams = raw.answer()
    assert answer.code is Code.CREATED and json.loads(answer.payload)["status"] == "SUCCESS"
    SEEN_SECRETS.add(json.loads(answer.payload)["credentialsValue"])
    raw.send(datagram)  # a retransmission after the answer: the stored answer again, not a new provisioning
    replay = raw.recv()
    assert replay == first_datagrams[0]
    if len(first_datagrams) == 1:  # piggybacked: the replay is the whole answer, byte for byte
        assert aiocoap.Message.decode(replay).payload == answer.payload
    # Nothing else: no second answer, which a second provisioning would send. Positive signal first: a later
    # request on the same socket (refused by the core: wrong secret, no device) is answered, and only its
    # own datagrams come before that answer.
    control = raw.message(("api", "v1", "provision"), json.dumps(
        tb_request(profile, deviceName=f"{name}-control", provisionDeviceSecret="wrong")).encode())
    raw.send(control.encode())
    reply, datagrams = raw.answer()
    assert reply.token == control.token and reply.code is Code.BAD_REQUEST, reply
    for datagram in datagrams:
        message = aiocoap.Message.decode(datagram)
        assert message.token == control.token or (message.code is Code.EMPTY and message.mid == control.mid), message
    device_by_name(admin, name)  # exactly one device with that name
    page = admin.http.get("/api/devices", params={"deviceProfileId": profile["id"]}).json()
    assert [d["name"] for d in page["data"]] == [name]


# --- refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "message_part"),
    [
        (b'{"provisionDeviceKey": "k"', "neither a valid JSON object nor a valid ProvisionDeviceRequestMsg"),
        (b"[1, 2]", "neither a valid JSON object"),
        (b'{"provisionDeviceKey": "k"}', "provisionDeviceSecret"),
        (b'{"provisionDeviceKey": "k", "provisionDeviceSecret": "s", "credentialsType": "TOKEN"}', "credentialsType"),
        (b"", "Missing payload"),
    ],
)
async def test_bad_requests_are_4_00_with_a_json_body(
    coap: aiocoap.Context, env: Env, db: asyncpg.Connection, payload: bytes, message_part: str
) -> None:
    before = await device_count(db)
    response = await coap_request(coap, env, "/api/v1/provision", payload)
    assert response.code is Code.BAD_REQUEST and response.opt.content_format == JSON_CF
    body = json.loads(response.payload)
    assert list(body) == ["errorMsg", "status"] and body["status"] == "FAILURE"
    assert message_part in body["errorMsg"]
    assert await device_count(db) == before


async def test_bad_innoway_request_is_answered_in_innoway(coap: aiocoap.Context, env: Env) -> None:
    response = await coap_request(coap, env, "/api/provision", {"provision_key": "k", "device_name": "n"})
    assert (response.code, json.loads(response.payload)) == (
        Code.BAD_REQUEST, {"status": "FAILURE", "error_msg": "Failed to find the field provision_secret in JSON body!"})


async def test_wrong_method_and_unknown_path(coap: aiocoap.Context, env: Env) -> None:
    # The JSON error body comes with requests at least as large as it; smaller ones (what garbage is) get
    # the code alone, so that a forged source never draws more bytes than it sent (README "CoAP").
    padded = b"{}" + b" " * 200
    for code in (Code.GET, Code.PUT, Code.DELETE):
        response = await coap_request(coap, env, "/api/v1/provision", padded, code=code)
        assert response.code is Code.METHOD_NOT_ALLOWED and response.opt.content_format == JSON_CF
        assert json.loads(response.payload)["status"] == "FAILURE"
        bare = await coap_request(coap, env, "/api/v1/provision", code=code)
        assert (bare.code, bare.payload) == (Code.METHOD_NOT_ALLOWED, b"")
    for path in ("/api/v2/provision", "/", "/api/v1/token/nothing-here", "/.well-known/core"):
        response = await coap_request(coap, env, path, padded)
        assert response.code is Code.NOT_FOUND, path
        body = json.loads(response.payload)
        assert list(body) == ["errorMsg", "status"] and body["status"] == "FAILURE"
        bare = await coap_request(coap, env, path, b"{}")
        assert (bare.code, bare.payload) == (Code.NOT_FOUND, b""), path


async def test_oversize_body_is_4_13_and_nothing_written(
    coap: aiocoap.Context, env: Env, db: asyncpg.Connection, raw: RawCoap, profile: dict
) -> None:
    before = await device_count(db)
    big = json.dumps(tb_request(profile, deviceName="big-" + "a" * 70_000)).encode()
    # aiocoap announces the size (Size1) with its first block: refused at once.
    response = await coap_request(coap, env, "/api/v1/provision", big)
    assert response.code is Code.REQUEST_ENTITY_TOO_LARGE and response.opt.size1 == 65536
    assert json.loads(response.payload)["status"] == "FAILURE"
    # Without Size1, refused on the block that crosses MAX_BODY_BYTES, nothing assembled past it.
    path, number = ("api", "v1", "provision"), 0
    while True:
        block = big[number * 1024:(number + 1) * 1024]
        answer = raw.exchange(raw.message(path, block, block1=BlockOption.BlockwiseTuple(number, True, 6)))
        if answer.code is not Code.CONTINUE:
            break
        number += 1
    assert answer.code is Code.REQUEST_ENTITY_TOO_LARGE and number == 64  # bytes 65536.. are past the limit
    assert await device_count(db) == before


async def test_telemetry_refusals(coap: aiocoap.Context, env: Env, profile: dict) -> None:
    unknown = await coap_request(coap, env, "/api/v1/unknown-token-xyz/telemetry", b'{"t":1}')
    assert unknown.code is Code.UNAUTHORIZED
    token = json.loads((await coap_request(coap, env, "/api/v1/provision", tb_request(
        profile, deviceName=f"tj-{uuid.uuid4().hex[:6]}"))).payload)["credentialsValue"]
    not_json = await coap_request(coap, env, f"/api/v1/{token}/telemetry", b"temperature=25")
    assert not_json.code is Code.BAD_REQUEST and json.loads(not_json.payload)["status"] == "FAILURE"
    get = await coap_request(coap, env, f"/api/v1/{token}/telemetry", code=Code.GET)
    assert get.code is Code.METHOD_NOT_ALLOWED


async def test_gateway_without_core_answers_5_03_within_the_timeout(
    coap: aiocoap.Context, env: Env, stack: Stack
) -> None:
    lonely = Env(env.infra, database=env.database, namespace=f"e2e-coap-nocore-{uuid.uuid4().hex[:6]}.")
    gateway = await asyncio.to_thread(
        Stack(lonely.variables(PROVISION_TIMEOUT_S="1", BUS_REPLY_GRACE_S="0.5"), ["coap_gateway"]).start
    )
    try:
        started = time.monotonic()
        tb = await coap_request(coap, lonely, "/api/v1/provision",
                                {"provisionDeviceKey": "k", "provisionDeviceSecret": "s"})
        elapsed = time.monotonic() - started
        assert tb.code is Code.SERVICE_UNAVAILABLE and tb.opt.max_age == 1
        assert tb.payload == b'{"errorMsg":"Provisioning timed out","status":"FAILURE"}'
        assert elapsed < 3
        inno = await coap_request(coap, lonely, "/api/provision", {"provision_key": "k", "provision_secret": "s"})
        assert inno.code is Code.SERVICE_UNAVAILABLE
        assert inno.payload == b'{"status":"FAILURE","error_msg":"Provisioning timed out"}'
    finally:
        await asyncio.to_thread(gateway.stop)
        await drop_core_queue(env.infra.rabbitmq_url, lonely.namespace)
    assert gateway["coap_gateway"].proc.returncode == 0  # stopped cleanly on SIGTERM


# --- runs last in this module: nothing secret reached a log line -------------------------------------


def test_zz_no_secret_in_service_logs(stack: Stack) -> None:
    logs = stack["coap_gateway"].output
    assert "coap_gateway ready on udp" in logs
    assert "Traceback" not in logs and " ERROR " not in logs, logs[-3000:]
    all_logs = stack.output()
    assert "provisioned device" in all_logs
    leaked = sorted(s for s in SEEN_SECRETS if len(s) >= 6 and s in all_logs)
    assert not leaked, f"secrets found in logs: {leaked}"
