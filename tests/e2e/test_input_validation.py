"""Input validation at the edge, against the real services: every bad string is a 400 in the caller's dialect
(4.00 over CoAP, PUBACK 0x83 over MQTT), nothing reaches the database, no service logs a traceback, and
a source that keeps sending malformed requests is refused like one that keeps guessing secrets.

Each test sends from its own loopback address (127.x.y.z), so the per-source limit of one test never
spills into another.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import string
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiocoap
import asyncpg
import httpx
import pytest
from aiocoap.numbers.codes import Code
from devstack import Stack
from provisioning_common.dialects.limits import FIELD_LIMITS, MSG_TOO_MANY_FAILURES

from . import mqtt_clients as mc
from .conftest import Admin, Env, window_left_at_least

#: Put in every rejected value: must never come back in an answer or reach a log.
MARK = "Rej3cted-" + secrets.token_hex(4)
_used_addresses: set[str] = set()


def fresh_address() -> str:
    """A loopback source address no other test of this module used."""
    while True:
        address = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
        if address not in _used_addresses:
            _used_addresses.add(address)
            return address


def incompressible(length: int) -> str:
    """Random text (no run Postgres could compress into an index row): what broke the btree before."""
    alphabet = string.ascii_letters + string.digits + "äöüßéèñçøåæ漢字かなカナ😀"
    return "".join(secrets.choice(alphabet) for _ in range(length))


@pytest.fixture
async def device_http(env: Env, stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the gateway bound to a fresh source address."""
    transport = httpx.AsyncHTTPTransport(local_address=fresh_address())
    async with httpx.AsyncClient(base_url=env.http_url, transport=transport, timeout=15) as client:
        yield client


def bad_values(field: str) -> list[tuple[str, str]]:
    """(case id, value) that the field must refuse: NUL, a control character (where refused), too long."""
    limit = FIELD_LIMITS[field]
    values = [("nul", f"{MARK}\x00{MARK}")]
    if limit.controls.name != "NUL":
        values.append(("ctrl", f"{MARK}\x01{MARK}" if limit.controls.name == "PEM" else f"{MARK}\n"))
    values.append(("long", MARK + incompressible(limit.max_chars + 1 - len(MARK))))
    if field in ("device_name", "device_key", "username"):
        values.append(("9k", MARK + incompressible(9000)))
    return values


TB_FIELDS = {
    "provisionDeviceKey": "provision_key", "provisionDeviceSecret": "provision_secret", "deviceName": "device_name",
    "token": "token", "clientId": "client_id", "username": "username", "password": "password",
    "hash": "certificate", "csr": "csr",
}
INNO_FIELDS = {
    "provision_key": "provision_key", "provision_secret": "provision_secret", "device_name": "device_name",
    "device_key": "device_key",
}
#: Credentials types that make each ThingsBoard credential field matter.
TB_TYPES = {"token": "ACCESS_TOKEN", "clientId": "MQTT_BASIC", "username": "MQTT_BASIC", "password": "MQTT_BASIC",
            "hash": "X509_CERTIFICATE", "csr": "X509_CSR"}

CASES = (
    [("thingsboard", wire, case, value) for wire, key in TB_FIELDS.items() for case, value in bad_values(key)]
    + [("innoway", wire, case, value) for wire, key in INNO_FIELDS.items() for case, value in bad_values(key)]
)


async def written(db: asyncpg.Connection, profile: dict[str, Any]) -> tuple[int, int]:
    devices = await db.fetchval("SELECT count(*) FROM devices WHERE profile_id = $1", uuid.UUID(profile["id"]))
    requests = await db.fetchval("SELECT count(*) FROM provision_requests")
    return devices, requests


@pytest.mark.parametrize(("dialect", "wire", "case", "value"), CASES,
                         ids=[f"{d}-{w}-{c}" for d, w, c, _ in CASES])
async def test_bad_string_is_a_400_in_the_callers_dialect_and_writes_nothing(
    device_http: httpx.AsyncClient, db: asyncpg.Connection, profile: dict[str, Any],
    dialect: str, wire: str, case: str, value: str,
) -> None:
    if dialect == "thingsboard":
        body: dict[str, Any] = {"provisionDeviceKey": profile["provisionDeviceKey"],
                                "provisionDeviceSecret": profile["provisionDeviceSecret"],
                                "deviceName": f"ok-{uuid.uuid4().hex[:8]}"}
        if wire in TB_TYPES:
            body["credentialsType"] = TB_TYPES[wire]
        path = "/api/v1/provision"
    else:
        body = {"provision_key": profile["provisionDeviceKey"], "provision_secret": profile["provisionDeviceSecret"],
                "device_name": f"ok-{uuid.uuid4().hex[:8]}"}
        path = "/api/provision"
    body[wire] = value
    before = await written(db, profile)
    response = await device_http.post(path, content=json.dumps(body).encode())
    assert response.status_code == 400, response.text
    assert MARK not in response.text
    answer = response.json()
    if dialect == "thingsboard":
        assert list(answer) == ["errorMsg", "status"] and answer["status"] == "FAILURE"
        message = answer["errorMsg"]
    else:
        assert list(answer) == ["status", "error_msg"] and answer["status"] == "FAILURE"
        message = answer["error_msg"]
    assert message.startswith(f"Field {wire} "), message
    assert ("longer than" in message) == (case in ("long", "9k")), message
    # Positive signal first: a valid request from the same client, sent after it, is answered and written, so a
    # refused request that slipped through would have been written by now... and is not: only the control is.
    control_name = f"control-{uuid.uuid4().hex[:8]}"
    control = ({"provisionDeviceKey": profile["provisionDeviceKey"],
                "provisionDeviceSecret": profile["provisionDeviceSecret"], "deviceName": control_name}
               if dialect == "thingsboard" else
               {"provision_key": profile["provisionDeviceKey"], "provision_secret": profile["provisionDeviceSecret"],
                "device_name": control_name})
    answered = await device_http.post(path, content=json.dumps(control).encode())
    assert answered.status_code == 200 and answered.json()["status"] == "SUCCESS", answered.text
    assert await written(db, profile) == (before[0] + 1, before[1] + 1)


async def test_values_at_the_limits_provision_normally(
    device_http: httpx.AsyncClient, db: asyncpg.Connection, profile: dict[str, Any]
) -> None:
    """The limits refuse only what they document: 255-character names and tokens, tabs inside a name."""
    name = incompressible(250) + "\tx\x01y"
    token = "".join(secrets.choice(string.ascii_letters) for _ in range(FIELD_LIMITS["token"].max_chars))
    response = await device_http.post("/api/v1/provision", content=json.dumps({
        "provisionDeviceKey": profile["provisionDeviceKey"], "provisionDeviceSecret": profile["provisionDeviceSecret"],
        "deviceName": f"  {name}\x00 ", "credentialsType": "ACCESS_TOKEN", "token": token}).encode())
    assert response.status_code == 200
    # ThingsBoard's exact bytes (spec §2).
    assert response.content == (
        b'{"credentialsValue":"' + token.encode() + b'","credentialsType":"ACCESS_TOKEN","status":"SUCCESS"}')
    stored = await db.fetchval("SELECT name FROM devices WHERE profile_id = $1", uuid.UUID(profile["id"]))
    assert stored == name  # trimmed like Java's trim(), the trailing NUL included


async def test_malformed_requests_count_against_the_failure_limit(
    env: Env, stack: Stack, profile: dict[str, Any]
) -> None:
    limit = int(env.variables().get("PROVISION_FAILURES_PER_MINUTE", "60"))
    # The gateway counts in fixed one-minute windows: reach the limit inside one.
    await asyncio.to_thread(window_left_at_least, 20)
    malformed = json.dumps({"provisionDeviceKey": profile["provisionDeviceKey"],
                            "provisionDeviceSecret": profile["provisionDeviceSecret"],
                            "deviceName": f"bad\x00{MARK}"}).encode()
    source = fresh_address()
    async with httpx.AsyncClient(base_url=env.http_url, timeout=15,
                                 transport=httpx.AsyncHTTPTransport(local_address=source)) as client:
        for i in range(limit):
            response = await client.post("/api/v1/provision", content=malformed)
            assert response.status_code == 400, (i, response.text)
        blocked = await client.post("/api/v1/provision", content=malformed)
        assert blocked.status_code == 200
        assert blocked.content == b'{"errorMsg":"' + MSG_TOO_MANY_FAILURES.encode() + b'","status":"FAILURE"}'
        innoway = await client.post("/api/provision", content=b'{"provision_key":"k"}')
        assert innoway.status_code == 200
        assert innoway.json() == {"status": "FAILURE", "error_msg": MSG_TOO_MANY_FAILURES}
        garbage = await client.post("/api/v1/provision", content=b"\xff{not json")
        assert garbage.status_code == 200 and garbage.json()["errorMsg"] == MSG_TOO_MANY_FAILURES
        # Well-formed requests still reach the core, whose own limiter judges secrets.
        good = await client.post("/api/v1/provision", content=json.dumps({
            "provisionDeviceKey": profile["provisionDeviceKey"],
            "provisionDeviceSecret": profile["provisionDeviceSecret"]}).encode())
        assert good.status_code == 200 and good.json()["status"] == "SUCCESS"
    async with httpx.AsyncClient(base_url=env.http_url, timeout=15,
                                 transport=httpx.AsyncHTTPTransport(local_address=fresh_address())) as other:
        assert (await other.post("/api/v1/provision", content=malformed)).status_code == 400


# --- the other transports map the same DialectError ---------------------------------------------


async def test_coap_bad_string_is_4_00_with_the_reason(env: Env, stack: Stack, profile: dict[str, Any]) -> None:
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        payload = json.dumps({"provisionDeviceKey": profile["provisionDeviceKey"],
                              "provisionDeviceSecret": profile["provisionDeviceSecret"],
                              "deviceName": f"a\x00{MARK}"}).encode()
        request = aiocoap.Message(code=Code.POST, uri=f"coap://127.0.0.1:{env.coap_port}/api/v1/provision",
                                  payload=payload)
        response = await asyncio.wait_for(context.request(request).response, 15)
    finally:
        await context.shutdown()
    assert response.code is Code.BAD_REQUEST
    assert json.loads(response.payload) == {"errorMsg": "Field deviceName contains a NUL character",
                                            "status": "FAILURE"}


def test_mqtt_bad_string_is_puback_0x83_then_disconnect(env: Env, stack: Stack, profile: dict[str, Any]) -> None:
    client = mc.connect(env.mqtt_port, username="provision", protocol=mc.V5)
    acked = threading.Event()
    reasons: list[int] = []

    def on_publish(_c: Any, _u: Any, _mid: Any, reason_code: Any, _p: Any = None) -> None:
        reasons.append(int(getattr(reason_code, "value", reason_code)))
        acked.set()

    client.client.on_publish = on_publish
    try:
        assert mc.accepted(client)
        client.client.subscribe("/provision/response", qos=1)
        assert client.subscribed.wait(5)
        client.client.publish("/provision/request", json.dumps({
            "provisionDeviceKey": profile["provisionDeviceKey"],
            "provisionDeviceSecret": profile["provisionDeviceSecret"],
            "clientId": f"c\x00{MARK}", "credentialsType": "MQTT_BASIC"}), qos=1)
        assert acked.wait(10) and reasons == [0x83]
        assert client.disconnected.wait(10)
        assert client.messages == []
    finally:
        client.stop()


# --- admin API -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def admin_http(admin: Admin) -> Iterator[httpx.Client]:
    yield admin.http


@pytest.mark.parametrize(("params", "where"), [
    ({"textSearch": "\x00"}, "textSearch"),
    ({"textSearch": "a\x1fb"}, "textSearch"),
    ({"textSearch": "x" * 256}, "textSearch"),
    ({"page": "99999999999999999999"}, "page"),
    ({"page": "10000001"}, "page"),
    ({"page": "-1"}, "page"),
    ({"pageSize": "0"}, "pageSize"),
    ({"pageSize": "1001"}, "pageSize"),
    ({"pageSize": "1e3"}, "pageSize"),
])
def test_admin_list_parameters_are_bounded(admin_http: httpx.Client, params: dict[str, str], where: str) -> None:
    for path in ("/api/devices", "/api/device-profiles"):
        if where == "textSearch" and path == "/api/device-profiles":
            continue
        response = admin_http.get(path, params=params)
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["status"] == 400 and f"query.{where}:" in body["message"], body
    if where == "textSearch" and "\x00" in params["textSearch"]:
        assert "must not contain control characters" in body["message"]


def test_admin_largest_page_is_an_empty_page(admin_http: httpx.Client) -> None:
    response = admin_http.get("/api/devices", params={"page": "10000000", "pageSize": "1000"})
    assert response.status_code == 200 and response.json()["data"] == []


@pytest.mark.parametrize(("field", "value"), [
    ("name", f"n\x00{MARK}"), ("name", f"n\x07{MARK}"), ("name", "n" * 256),
    ("provisionDeviceKey", f"k\x00{MARK}"), ("provisionDeviceKey", f"k\t{MARK}"), ("provisionDeviceKey", "k" * 256),
    ("provisionDeviceSecret", f"s\x00{MARK}"), ("provisionDeviceSecret", "s" * 256),
    ("certificateRegExPattern", "(a\x00)"),
    ("signingCertificatePem", f"-----BEGIN\x00{MARK}"),
], ids=lambda v: v.replace(MARK, "MARK")[:40].encode("unicode_escape").decode())  # the same on every xdist worker
def test_admin_profile_strings_are_checked(admin_http: httpx.Client, field: str, value: str) -> None:
    body: dict[str, Any] = {"name": f"p-{uuid.uuid4().hex[:8]}", "provisionStrategy": "ALLOW_CREATE_NEW_DEVICES",
                            field: value}
    response = admin_http.post("/api/device-profiles", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["status"] == 400 and MARK not in response.text


def test_admin_regex_too_large_is_a_400(admin_http: httpx.Client) -> None:
    from tests.pki import issue

    ca = issue(f"Limits CA {uuid.uuid4().hex[:6]}", ca=True).pem
    for pattern in ("(" * 500 + ")" * 500, "(a{99999999999})"):
        response = admin_http.post("/api/device-profiles", json={
            "name": f"p-{uuid.uuid4().hex[:8]}", "provisionStrategy": "X509_CERTIFICATE_CHAIN", "certificatePem": ca,
            "certificateRegExPattern": pattern})
        assert response.status_code == 400, response.text
        assert "certificateRegExPattern" in response.json()["message"]


@pytest.mark.parametrize(("fields", "where"), [
    ({"name": f"d\x00{MARK}"}, "name"),
    ({"name": "d" * 256}, "name"),
    ({"deviceKey": f"k\x00{MARK}"}, "deviceKey"),
    ({"deviceKey": "k" * 256}, "deviceKey"),
    ({"credentials": {"credentialsType": "ACCESS_TOKEN", "credentialsValue": f"t\x00{MARK}"}}, "credentialsValue"),
    ({"credentials": {"credentialsType": "ACCESS_TOKEN", "credentialsValue": "t" * 256}}, "credentialsValue"),
    ({"credentials": {"credentialsType": "MQTT_BASIC",
                      "credentialsValue": {"clientId": f"c\x00{MARK}"}}}, "credentialsValue"),
    ({"credentials": {"credentialsType": "MQTT_BASIC",
                      "credentialsValue": {"userName": "u" * 256}}}, "credentialsValue"),
    ({"credentials": {"credentialsType": "X509_CERTIFICATE", "credentialsValue": "c" * 16385}}, "credentialsValue"),
])
def test_admin_device_strings_are_checked(
    admin: Admin, admin_http: httpx.Client, fields: dict[str, Any], where: str
) -> None:
    profile = admin.create_profile("CHECK_PRE_PROVISIONED_DEVICES")
    body = {"name": f"d-{uuid.uuid4().hex[:8]}", "deviceProfileId": profile["id"], **fields}
    response = admin_http.post("/api/devices", json=body)
    assert response.status_code == 400, response.text
    answer = response.json()
    assert answer["status"] == 400 and where in answer["message"] and MARK not in response.text
    listed = admin_http.get("/api/devices", params={"deviceProfileId": profile["id"]}).json()
    assert listed["totalElements"] == 0


def test_admin_lone_surrogate_is_a_400(admin_http: httpx.Client) -> None:
    raw = b'{"name":"x\\ud800","provisionStrategy":"DISABLED"}'
    response = admin_http.post("/api/device-profiles", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["status"] == 400


def test_zz_no_traceback_and_no_rejected_value_in_any_service_output(stack: Stack) -> None:
    logs = stack.output()
    assert "Traceback" not in logs, logs[-4000:]
    assert MARK not in logs
