"""ThingsBoard's documented HTTP provisioning flows, and every answer the HTTP gateway gives."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import uuid
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest

from tests.pki import pem_body, self_signed_pem

from .conftest import Admin, Env, tb_request

NOT_FOUND = b'{"errorMsg":"Provision data was not found!","status":"NOT_FOUND"}'
FAILURE = b'{"errorMsg":"Failed to provision device!","status":"FAILURE"}'
TOKEN_RE = re.compile(r"^[A-Za-z0-9]{20}$")

#: Every secret the tests hand out or receive, checked against the services' logs at the end.
SEEN_SECRETS: set[str] = set()


def provision(http: httpx.Client, body: dict[str, Any], path: str = "/api/v1/provision") -> httpx.Response:
    for key in ("provisionDeviceSecret", "provision_secret", "token", "password"):
        if body.get(key):
            SEEN_SECRETS.add(str(body[key]))
    response = http.post(path, content=json.dumps(body))
    if response.headers.get("content-type", "").startswith("application/json"):
        data = response.json()
        value = data.get("credentialsValue") or data.get("token")
        if isinstance(value, str) and len(value) < 100:
            SEEN_SECRETS.add(value)
    return response


async def device_count(db: asyncpg.Connection) -> int:
    return await db.fetchval("SELECT count(*) FROM devices")


class TelemetryListener:
    """A private queue bound to ``device.telemetry`` for one device id."""

    def __init__(self, env: Env, device_id: str) -> None:
        self.env, self.device_id = env, device_id

    async def __aenter__(self) -> TelemetryListener:
        self.conn = await aio_pika.connect(self.env.infra.rabbitmq_url)
        channel = await self.conn.channel()
        exchange = await channel.declare_exchange(
            f"{self.env.namespace}device.telemetry", aio_pika.ExchangeType.TOPIC, durable=True
        )
        self.queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await self.queue.bind(exchange, routing_key=self.device_id)
        return self

    async def get(self, timeout: float = 5.0) -> bytes:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            message = await self.queue.get(no_ack=True, fail=False)
            if message is not None:
                return message.body
            await asyncio.sleep(0.05)
        raise AssertionError("no telemetry arrived")

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()


def device_by_name(admin: Admin, name: str) -> dict[str, Any]:
    page = admin.http.get("/api/devices", params={"textSearch": name}).json()
    matches = [d for d in page["data"] if d["name"] == name]
    assert len(matches) == 1, page
    return matches[0]


# --- ThingsBoard's documented flows ----------------------------------------------------------


async def test_server_generated_token_then_telemetry_without_content_type(
    http: httpx.Client, admin: Admin, env: Env, profile: dict
) -> None:
    name = f"tb-dev-{uuid.uuid4().hex[:6]}"
    response = provision(http, tb_request(profile, deviceName=name))
    assert response.status_code == 200
    body = response.json()
    assert list(body) == ["credentialsValue", "credentialsType", "status"]
    assert body["status"] == "SUCCESS" and body["credentialsType"] == "ACCESS_TOKEN"
    assert TOKEN_RE.match(body["credentialsValue"])
    device = device_by_name(admin, name)
    assert device["provisionState"] == "provisioned"
    assert device["credentialsType"] == "ACCESS_TOKEN"

    async with TelemetryListener(env, device["id"]) as listener:
        # ThingsBoard's example client posts JSON with no Content-Type header.
        raw = httpx.Request("POST", f"{env.http_url}/api/v1/{body['credentialsValue']}/telemetry",
                            content=b'{"temperature":25}')
        assert "content-type" not in raw.headers
        sent = http.send(raw)
        assert sent.status_code == 200
        assert json.loads(await listener.get()) == {"temperature": 25}


def test_device_supplied_access_token(http: httpx.Client, env: Env, profile: dict) -> None:
    token, name = f"my-own-token-{uuid.uuid4().hex[:8]}", f"d-{uuid.uuid4().hex[:8]}"  # a name is logged
    response = provision(http, tb_request(profile, deviceName=name, credentialsType="ACCESS_TOKEN", token=token))
    assert response.content == (
        b'{"credentialsValue":"' + token.encode() + b'","credentialsType":"ACCESS_TOKEN","status":"SUCCESS"}'
    )
    assert http.post(f"/api/v1/{token}/telemetry", json={"t": 1}).status_code == 200


def test_generated_device_name_when_absent(http: httpx.Client, admin: Admin, profile: dict) -> None:
    first = provision(http, tb_request(profile)).json()
    second = provision(http, tb_request(profile)).json()
    assert first["status"] == second["status"] == "SUCCESS"
    page = admin.http.get("/api/devices", params={"deviceProfileId": profile["id"]}).json()
    names = [d["name"] for d in page["data"]]
    assert len(names) == 2 and all(re.match(r"^[A-Za-z0-9]{20}$", n) for n in names)


async def test_mqtt_basic_is_answered_as_object_and_stored_hashed(
    http: httpx.Client, profile: dict, db: asyncpg.Connection
) -> None:
    client_id = f"cid-{uuid.uuid4().hex[:8]}"
    response = provision(http, tb_request(profile, deviceName=client_id, credentialsType="MQTT_BASIC",
                                          clientId=client_id, username="user1", password="pa55word"))
    assert response.content == (
        b'{"credentialsValue":{"clientId":"' + client_id.encode()
        + b'","userName":"user1","password":"pa55word"},"credentialsType":"MQTT_BASIC","status":"SUCCESS"}'
    )
    row = await db.fetchrow(
        "SELECT c.* FROM device_credentials c JOIN devices d ON d.id = c.device_id WHERE d.name = $1", client_id
    )
    assert row["credentials_id"] == hashlib.sha3_256(f"{client_id}|user1".encode()).hexdigest()
    assert "pa55word" not in (row["secret_hash"] or "") and row["secret_hash"].startswith("scrypt$")
    assert "pa55word" not in json.dumps(json.loads(row["public_value"]))


def test_mqtt_basic_rules_from_thingsboard(http: httpx.Client, profile: dict) -> None:
    both_empty = provision(http, tb_request(profile, deviceName="x1", credentialsType="MQTT_BASIC", password="p"))
    assert both_empty.content == FAILURE
    with_client_and_password = provision(
        http, tb_request(profile, deviceName="x2", credentialsType="MQTT_BASIC", clientId="c", password="p")
    )
    assert with_client_and_password.content == FAILURE


async def test_x509_certificate(http: httpx.Client, profile: dict, db: asyncpg.Connection) -> None:
    pem = self_signed_pem("x509-device")
    name = f"x509-{uuid.uuid4().hex[:6]}"
    response = provision(http, tb_request(profile, deviceName=name, credentialsType="X509_CERTIFICATE", hash=pem))
    body = response.json()
    assert body == {"credentialsValue": pem_body(pem), "credentialsType": "X509_CERTIFICATE", "status": "SUCCESS"}
    stored = await db.fetchval(
        "SELECT credentials_id FROM device_credentials c JOIN devices d ON d.id = c.device_id WHERE d.name = $1",
        name,
    )
    assert stored == hashlib.sha3_256(pem_body(pem).encode()).hexdigest()
    # The same certificate for another device is refused.
    again = provision(http, tb_request(profile, deviceName=name + "-2", credentialsType="X509_CERTIFICATE", hash=pem))
    assert again.content == FAILURE


async def test_x509_that_does_not_parse_is_refused_and_nothing_written(
    http: httpx.Client, profile: dict, db: asyncpg.Connection
) -> None:
    before = await device_count(db)
    response = provision(http, tb_request(profile, deviceName="bad-cert", credentialsType="X509_CERTIFICATE",
                                          hash="testHash"))
    assert response.status_code == 200
    assert response.json()["status"] == "FAILURE"
    assert "X.509" in response.json()["errorMsg"]
    assert await device_count(db) == before


# --- statuses ----------------------------------------------------------------------------------


def test_wrong_secret_and_unknown_key_are_not_found(http: httpx.Client, profile: dict) -> None:
    wrong = provision(http, tb_request(profile, provisionDeviceSecret="nope", deviceName="w"))
    assert (wrong.status_code, wrong.content) == (200, NOT_FOUND)
    unknown = provision(http, {"provisionDeviceKey": "no-such-key", "provisionDeviceSecret": "x"})
    assert unknown.content == NOT_FOUND
    empty = provision(http, {"provisionDeviceKey": "", "provisionDeviceSecret": ""})
    assert empty.content == NOT_FOUND


def test_blank_name_fails_before_key_check(http: httpx.Client) -> None:
    response = provision(http, {"provisionDeviceKey": "no-such-key", "provisionDeviceSecret": "x",
                                "deviceName": " \t "})
    assert response.content == FAILURE


def test_same_name_twice_fails_the_second_time(http: httpx.Client, profile: dict) -> None:
    """ThingsBoard: a second, different request for a name that exists fails (here: other credentials)."""
    name = f"twice-{uuid.uuid4().hex[:6]}"
    assert provision(http, tb_request(profile, deviceName=name)).json()["status"] == "SUCCESS"
    other = tb_request(profile, deviceName=f"  {name}  ", credentialsType="ACCESS_TOKEN", token=uuid.uuid4().hex)
    assert provision(http, other).content == FAILURE


def test_the_same_request_repeated_gets_the_first_answer(http: httpx.Client, profile: dict) -> None:
    """A device that repeats its request (its answer was lost, it timed out) is never stuck on
    "name taken": within PROVISION_REPLAY_WINDOW_S it gets the same credentials again."""
    name = f"again-{uuid.uuid4().hex[:6]}"
    first = provision(http, tb_request(profile, deviceName=name))
    assert first.json()["status"] == "SUCCESS"
    assert provision(http, tb_request(profile, deviceName=f" {name}\t")).content == first.content


def test_disabled_profile_is_not_found(http: httpx.Client, admin: Admin) -> None:
    disabled = admin.create_profile("DISABLED", provisionDeviceKey=f"k-{uuid.uuid4().hex[:8]}",
                                    provisionDeviceSecret="s3cret-disabled")
    response = provision(http, tb_request(disabled, deviceName="d"))
    assert response.content == NOT_FOUND


def test_token_used_by_another_device_is_refused(http: httpx.Client, profile: dict) -> None:
    token = f"shared-token-{uuid.uuid4().hex[:8]}"  # >= 16 characters: a device-chosen token's minimum
    first, second = (f"{n}-{uuid.uuid4().hex[:8]}" for n in "ab")
    assert provision(http, tb_request(profile, deviceName=first, token=token)).json()["status"] == "SUCCESS"
    assert provision(http, tb_request(profile, deviceName=second, token=token)).content == FAILURE


async def test_concurrent_requests_for_one_name_yield_one_success(
    env: Env, profile: dict, db: asyncpg.Connection
) -> None:
    """20 different requests (each its own token) race for one name: exactly one wins."""
    name = f"race-{uuid.uuid4().hex[:6]}"
    bodies = [json.dumps(tb_request(profile, deviceName=name, credentialsType="ACCESS_TOKEN", token=f"tk{i:02}-{name}"))
              for i in range(20)]
    async with httpx.AsyncClient(base_url=env.http_url, timeout=15) as client:
        responses = await asyncio.gather(*(client.post("/api/v1/provision", content=body) for body in bodies))
    statuses = sorted(r.json()["status"] for r in responses)
    assert statuses.count("SUCCESS") == 1 and statuses.count("FAILURE") == 19
    assert await db.fetchval("SELECT count(*) FROM devices WHERE name = $1", name) == 1


async def test_concurrent_copies_of_one_request_create_one_device_and_share_its_answer(
    env: Env, profile: dict, db: asyncpg.Connection
) -> None:
    name = f"copies-{uuid.uuid4().hex[:6]}"
    body = json.dumps(tb_request(profile, deviceName=name))
    async with httpx.AsyncClient(base_url=env.http_url, timeout=15) as client:
        responses = await asyncio.gather(*(client.post("/api/v1/provision", content=body) for _ in range(20)))
    assert {r.json()["status"] for r in responses} == {"SUCCESS"}
    assert len({r.json()["credentialsValue"] for r in responses}) == 1
    assert await db.fetchval("SELECT count(*) FROM devices WHERE name = $1", name) == 1


async def test_tokens_are_not_in_the_database_in_clear(
    http: httpx.Client, profile: dict, db: asyncpg.Connection
) -> None:
    token = provision(http, tb_request(profile, deviceName=f"dump-{uuid.uuid4().hex[:6]}")).json()["credentialsValue"]
    for table in ("devices", "device_credentials", "provision_requests"):
        dump = json.dumps([dict(r) for r in await db.fetch(f"SELECT * FROM {table}")], default=str)
        assert token not in dump, table
    assert await db.fetchval("SELECT count(*) FROM device_credentials WHERE credentials_id = $1",
                             hashlib.sha256(token.encode()).hexdigest()) == 1


# --- Innoway's dialect ------------------------------------------------------------------------------


async def test_innoway_dialect(http: httpx.Client, profile: dict, db: asyncpg.Connection) -> None:
    device_key = f"IMEI-{uuid.uuid4().hex[:10]}"
    request = {"provision_key": profile["provisionDeviceKey"], "provision_secret": profile["provisionDeviceSecret"],
               "device_name": f"test {device_key}", "device_key": device_key}
    response = provision(http, request, path="/api/provision")
    assert response.status_code == 200
    body = response.json()
    assert list(body) == ["device_id", "status", "token"]
    assert body["status"] == "SUCCESS" and re.match(r"^[A-Za-z0-9]{32}$", body["token"])
    assert str(uuid.UUID(body["device_id"])) == body["device_id"]
    assert await db.fetchval("SELECT device_key FROM devices WHERE id = $1", uuid.UUID(body["device_id"])) == device_key
    # The same device_key again in this profile is a FAILURE, in Innoway's words.
    again = provision(http, {**request, "device_name": f"other {device_key}"}, path="/api/v1/provision")
    assert again.content == b'{"status":"FAILURE","error_msg":"Failed to provision device!"}'
    wrong = provision(http, {**request, "provision_secret": "wrong"}, path="/api/provision")
    assert wrong.content == b'{"status":"NOT_FOUND","error_msg":"Provision data was not found!"}'
    assert http.post(f"/api/v1/{body['token']}/telemetry", json={"a": 1}).status_code == 200


# --- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "message_part"),
    [
        (b'{"provisionDeviceKey": "k"', "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"provisionDeviceKey": "k"}', "provisionDeviceSecret"),
        (b'{"provisionDeviceSecret": "s"}', "provisionDeviceKey"),
        (b'{"provisionDeviceKey": "k", "provisionDeviceSecret": "s", "credentialsType": "TOKEN"}', "credentialsType"),
        (b'{"provisionDeviceKey": "k", "provisionDeviceSecret": {"a": 1}}', "provisionDeviceSecret"),
        (b'{"provisionDeviceKey": null, "provisionDeviceSecret": "s"}', "provisionDeviceKey"),
        (b"\xff\xfe", "not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
async def test_bad_thingsboard_requests_get_400_in_its_dialect(
    http: httpx.Client, db: asyncpg.Connection, payload: bytes, message_part: str
) -> None:
    before = await device_count(db)
    response = http.post("/api/v1/provision", content=payload)
    assert response.status_code == 400
    body = response.json()
    assert list(body) == ["errorMsg", "status"] and body["status"] == "FAILURE"
    assert message_part in body["errorMsg"]
    assert await device_count(db) == before


def test_bad_innoway_request_gets_400_in_its_dialect(http: httpx.Client) -> None:
    response = http.post("/api/provision", json={"provision_key": "k", "device_name": "n"})
    assert response.status_code == 400
    assert response.json() == {
        "status": "FAILURE", "error_msg": "Failed to find the field provision_secret in JSON body!"
    }


def test_oversize_body_is_refused(http: httpx.Client) -> None:
    response = http.post("/api/v1/provision", content=b'{"deviceName":"' + b"a" * 70_000 + b'"}')
    assert response.status_code == 413
    assert response.json()["status"] == "FAILURE"


def test_secret_is_not_echoed_in_errors(http: httpx.Client) -> None:
    response = http.post("/api/v1/provision", content=b'{"provisionDeviceSecret": "TopSecretValue42"')
    assert response.status_code == 400 and b"TopSecretValue42" not in response.content


def test_telemetry_with_unknown_token_is_401(http: httpx.Client) -> None:
    assert http.post("/api/v1/unknown-token-xyz/telemetry", json={"t": 1}).status_code == 401


def test_telemetry_that_is_not_json_is_400(http: httpx.Client, profile: dict) -> None:
    token = provision(http, tb_request(profile, deviceName=f"tj-{uuid.uuid4().hex[:6]}")).json()["credentialsValue"]
    assert http.post(f"/api/v1/{token}/telemetry", content=b"temperature=25").status_code == 400


def test_health(http: httpx.Client) -> None:
    response = http.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "UP"}


# --- pre-provisioned devices (spec §6) --------------------------------------------------------


def test_pre_provisioned_device_gets_the_credentials_made_by_the_admin(http: httpx.Client, admin: Admin) -> None:
    pre = admin.create_profile("CHECK_PRE_PROVISIONED_DEVICES")
    created = admin.create_device(pre["id"])
    assert created["provisionState"] is None
    token = created["credentials"]["credentialsValue"]
    SEEN_SECRETS.add(token)
    response = provision(http, tb_request(pre, deviceName=created["name"], token="ignored-by-tb"))
    assert response.content == (
        b'{"credentialsValue":"' + token.encode() + b'","credentialsType":"ACCESS_TOKEN","status":"SUCCESS"}'
    )
    assert admin.http.get(f"/api/devices/{created['id']}").json()["provisionState"] == "provisioned"
    # Provisioning it again fails, as in ThingsBoard.
    assert provision(http, tb_request(pre, deviceName=created["name"])).content == FAILURE


def test_pre_provisioned_mqtt_basic_keeps_its_stored_object(http: httpx.Client, admin: Admin) -> None:
    pre = admin.create_profile("CHECK_PRE_PROVISIONED_DEVICES")
    value = {"clientId": f"c-{uuid.uuid4().hex[:6]}", "userName": "u", "password": "pw-pre"}
    created = admin.create_device(pre["id"], credentials={"credentialsType": "MQTT_BASIC", "credentialsValue": value})
    response = provision(http, tb_request(pre, deviceName=created["name"]))
    assert response.json() == {"credentialsValue": value, "credentialsType": "MQTT_BASIC", "status": "SUCCESS"}


def test_pre_provisioned_refusals(http: httpx.Client, admin: Admin) -> None:
    pre = admin.create_profile("CHECK_PRE_PROVISIONED_DEVICES")
    other = admin.create_profile("CHECK_PRE_PROVISIONED_DEVICES")
    foreign = admin.create_device(other["id"])
    assert provision(http, tb_request(pre, deviceName=foreign["name"])).content == FAILURE
    assert provision(http, tb_request(pre, deviceName="never-created")).content == FAILURE
    assert provision(http, tb_request(pre)).content == FAILURE
    bad_secret = tb_request(pre, deviceName=foreign["name"], provisionDeviceSecret="bad")
    assert provision(http, bad_secret).content == NOT_FOUND
    # The foreign device is still unprovisioned.
    assert admin.http.get(f"/api/devices/{foreign['id']}").json()["provisionState"] is None


def test_oversize_telemetry_is_refused(http: httpx.Client, profile: dict) -> None:
    token = provision(http, tb_request(profile, deviceName=f"big-{uuid.uuid4().hex[:6]}")).json()["credentialsValue"]
    response = http.post(f"/api/v1/{token}/telemetry", content=b'{"v":"' + b"a" * 70_000 + b'"}')
    assert response.status_code == 413 and response.json()["status"] == "FAILURE"


# --- runs last in this module: nothing secret reached a log line -------------------------------


def test_zz_no_secret_in_service_logs(stack: Any) -> None:
    logs = stack.output()
    assert "provisioned device" in logs  # the logs are really being read
    leaked = sorted(s for s in SEEN_SECRETS if len(s) >= 6 and s in logs)
    assert not leaked, f"secrets found in logs: {leaked}"

