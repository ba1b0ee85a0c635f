"""Secrets at rest (issue 13), against the real services: a ``pg_dump`` of the module's database, made after
profiles were created and devices provisioned, holds none of the secrets the test used in clear - provision
secrets, generated and device-chosen tokens, MQTT passwords, a pre-provisioned device's token and a signing CA's
private key - while the admin API still shows the provision secrets to the operator, provisioning with them
still works, and a secret stored in clear before migration 0008 is sealed. Also: device-chosen tokens under the
minimum refused in the caller's dialect unless the profile allows them, and no API schema on the device port."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import uuid
from typing import Any

import asyncpg
import httpx
import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from devstack import Stack
from paho.mqtt.enums import CallbackAPIVersion
from provisioning_common.db import repository
from provisioning_common.secretbox import SecretBox

from tests.pki import csr_for, issue

from . import mqtt_clients as mc
from .conftest import Admin, Env, tb_request, window_left_at_least

#: A small wrong-credentials budget for this module's stack (AUTH_FAILURES_PER_MINUTE; default 120).
AUTH_BUDGET = 5


@pytest.fixture(scope="module")
def env(env: Env) -> Env:
    env.extra["AUTH_FAILURES_PER_MINUTE"] = str(AUTH_BUDGET)
    return env


async def pg_dump(env: Env) -> str:
    """The whole database as ``pg_dump`` writes it (plain SQL: schema and every row)."""
    assert shutil.which("pg_dump"), "pg_dump (postgresql-client) is needed for this test"
    proc = await asyncio.create_subprocess_exec(
        "pg_dump", "--no-owner", "--dbname", env.database_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


def provisioned(http: httpx.Client, request: dict[str, Any], path: str = "/api/v1/provision") -> dict[str, Any]:
    response = http.post(path, json=request)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["status"] == "SUCCESS", body
    return body


async def test_no_secret_in_clear_in_a_database_dump(
    env: Env, stack: Stack, admin: Admin, http: httpx.Client, db: asyncpg.Connection
) -> None:
    secrets: dict[str, str] = {}
    run = uuid.uuid4().hex[:8]
    # Profiles: generated secrets, one chosen by the operator, a pre-provisioned one, a CSR-signing CA.
    created = admin.create_profile()
    chosen = admin.create_profile(provisionDeviceKey=f"key-{run}", provisionDeviceSecret=f"operator-secret-{run}")
    pre = admin.create_profile("CHECK_PRE_PROVISIONED_DEVICES")
    ca = issue(f"Issuing CA {run}", ca=True, days=3650)
    signing = admin.create_profile(signingCertificatePem=ca.pem, signingKeyPem=ca.key_pem)
    for name, profile in (("created", created), ("chosen", chosen), ("pre", pre), ("signing", signing)):
        secrets[f"provision secret ({name})"] = profile["provisionDeviceSecret"]
    ca_key_body = "".join(line for line in ca.key_pem.splitlines() if "PRIVATE KEY" not in line)
    secrets["signing CA private key (first line)"] = ca_key_body[:64]
    # The admin API still shows each secret to the operator (as ThingsBoard does).
    assert admin.http.get(f"/api/device-profiles/{chosen['id']}").json()["provisionDeviceSecret"] == (
        f"operator-secret-{run}")
    listed = admin.http.get("/api/device-profiles", params={"pageSize": 1000}).json()["data"]
    assert {p["id"]: p["provisionDeviceSecret"] for p in listed}[created["id"]] == created["provisionDeviceSecret"]

    # Devices: a generated token (HTTP), a device-chosen token (HTTP, Innoway), MQTT_BASIC with a password
    # (MQTT), a certificate from a CSR, and a pre-provisioned device - one claimed, one not yet.
    secrets["generated token"] = provisioned(http, tb_request(created, deviceName=f"gen-{run}"))["credentialsValue"]
    secrets["device-chosen token"] = f"device-chosen-token-{run}"
    provisioned(http, tb_request(chosen, deviceName=f"own-{run}", credentialsType="ACCESS_TOKEN",
                                 token=secrets["device-chosen token"]))
    secrets["innoway token"] = provisioned(http, {"provision_key": created["provisionDeviceKey"],
                                                  "provision_secret": created["provisionDeviceSecret"],
                                                  "device_name": f"inno-{run}"}, "/api/provision")["token"]
    secrets["mqtt password"] = f"mqtt-password-{run}"
    answer = mc.provision_json(env.mqtt_port, tb_request(
        created, deviceName=f"basic-{run}", credentialsType="MQTT_BASIC", clientId=f"client-{run}",
        username=f"user-{run}", password=secrets["mqtt password"]))
    assert answer["status"] == "SUCCESS", answer
    login = mc.connect(env.mqtt_port, client_id=f"client-{run}", username=f"user-{run}",
                       password=secrets["mqtt password"])
    try:
        assert mc.accepted(login)
    finally:
        login.stop()
    issued = provisioned(http, tb_request(signing, deviceName=f"csr-{run}", credentialsType="X509_CSR",
                                          csr=csr_for(ec.generate_private_key(ec.SECP256R1()))))
    assert issued["credentialsType"] == "X509_CERTIFICATE"
    for state in ("claimed", "waiting"):
        token = secrets[f"pre-provisioned token ({state})"] = f"pre-provisioned-{state}-{run}"
        admin.create_device(pre["id"], name=f"pre-{state}-{run}",
                            credentials={"credentialsType": "ACCESS_TOKEN", "credentialsValue": token})
    claimed = provisioned(http, tb_request(pre, deviceName=f"pre-claimed-{run}"))
    assert claimed["credentialsValue"] == secrets["pre-provisioned token (claimed)"]
    # The tokens work (what the dump holds is enough to authenticate them, not to recover them).
    for name in ("generated token", "device-chosen token", "innoway token", "pre-provisioned token (claimed)"):
        assert http.post(f"/api/v1/{secrets[name]}/telemetry", json={"t": 1}).status_code == 200, name

    # A secret stored in clear before migration 0008: still usable, then sealed by the start-up step.
    secrets["legacy clear secret"] = f"legacy-clear-secret-{run}"
    await db.execute("UPDATE device_profiles SET provision_secret = $2, provision_secret_enc = NULL WHERE id = $1",
                     uuid.UUID(created["id"]), secrets["legacy clear secret"])
    legacy = {**created, "provisionDeviceSecret": secrets["legacy clear secret"]}
    for _ in range(50):  # the core's profile cache holds the old row for PROFILE_CACHE_TTL_S
        body = http.post("/api/v1/provision", json=tb_request(legacy, deviceName=f"legacy-{uuid.uuid4().hex[:6]}"))
        if body.json()["status"] == "SUCCESS":
            break
        await asyncio.sleep(0.1)
    assert body.json()["status"] == "SUCCESS", body.text
    pool = await asyncpg.create_pool(env.database_url, min_size=1, max_size=1)
    try:
        assert await repository.seal_profile_secrets(pool, SecretBox(env.encryption_key).encrypt_json) == 1
        assert await repository.seal_profile_secrets(pool, SecretBox(env.encryption_key).encrypt_json) == 0
    finally:
        await pool.close()
    assert admin.http.get(f"/api/device-profiles/{created['id']}").json()["provisionDeviceSecret"] == (
        secrets["legacy clear secret"])
    provisioned(http, tb_request(legacy, deviceName=f"sealed-{run}"))

    dump = await pg_dump(env)
    assert "device_profiles" in dump and created["provisionDeviceKey"] in dump  # the dump has the rows
    leaked = [name for name, value in secrets.items() if value in dump]
    assert not leaked, f"in clear in the database dump: {leaked}"
    for name, value in (("ADMIN_API_TOKEN", env.admin_token), ("DATA_ENCRYPTION_KEY", env.encryption_key)):
        assert value not in dump, name


def test_device_chosen_weak_token_refused_unless_the_profile_allows_it(
    env: Env, admin: Admin, http: httpx.Client
) -> None:
    strict = admin.create_profile()
    weak_ok = admin.create_profile(allowWeakTokens=True)
    assert strict["allowWeakTokens"] is False and weak_ok["allowWeakTokens"] is True
    reason = "Access token is too weak: at least 16 characters of A-Z a-z 0-9 . _ ~ - are required"

    def ask(profile: dict[str, Any], token: str) -> dict[str, Any]:
        request = tb_request(profile, deviceName=f"weak-{uuid.uuid4().hex[:8]}", credentialsType="ACCESS_TOKEN",
                             token=token)
        body: dict[str, Any] = http.post("/api/v1/provision", json=request).json()
        return body

    for token in ("x", "short-15-chars!", "sixteen chars ok?"):
        assert ask(strict, token) == {"status": "FAILURE", "errorMsg": reason}, token
    # The same refusal over MQTT (ThingsBoard's JSON on /provision/response).
    over_mqtt = mc.provision_json(env.mqtt_port, tb_request(strict, deviceName=f"weak-{uuid.uuid4().hex[:8]}",
                                                             credentialsType="ACCESS_TOKEN", token="x"))
    assert over_mqtt == {"status": "FAILURE", "errorMsg": reason}
    assert ask(weak_ok, f"x{uuid.uuid4().hex[:4]}")["status"] == "SUCCESS"
    assert ask(strict, f"strong-enough-token-{uuid.uuid4().hex[:6]}")["status"] == "SUCCESS"


def test_no_api_schema_on_the_device_port(http: httpx.Client) -> None:
    for path in ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"):
        assert http.get(path).status_code == 404, path


# --- wrong device credentials, limited per source address and transport --------------------------------------


def coap(env: Env, source: str, path: str) -> str:
    """One CoAP POST with libcoap's client from ``source``: what it printed (an error answer's code first)."""
    done = subprocess.run(["coap-client-notls", "-a", source, "-m", "post", "-e", '{"t":1}', "-B", "5",
                           f"coap://127.0.0.1:{env.coap_port}{path}"], capture_output=True, text=True, timeout=20)
    return (done.stdout + done.stderr).strip()


def mqtt_connack(env: Env, source: str, password: str) -> int:
    """MQTT 5 CONNECT from ``source`` with a token as password; the CONNACK's reason code."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"c-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv5)
    client.username_pw_set("device", password)
    answered, codes = threading.Event(), []

    def on_connect(_c: Any, _u: Any, _f: Any, reason_code: Any, _p: Any = None) -> None:
        codes.append(int(reason_code.value))
        answered.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", env.mqtt_port, bind_address=source)
    client.loop_start()
    try:
        assert answered.wait(10), "no CONNACK"
    finally:
        client.disconnect()
        client.loop_stop()
    return codes[0]


@pytest.mark.skipif(shutil.which("coap-client-notls") is None, reason="needs libcoap's coap-client-notls")
def test_wrong_tokens_limited_per_source_and_transport(env: Env, stack: Stack, admin: Admin,
                                                       http: httpx.Client) -> None:
    profile = admin.create_profile()
    token = provisioned(http, tb_request(profile, deviceName=f"auth-{uuid.uuid4().hex[:6]}"))["credentialsValue"]
    guesses = [f"guess-{uuid.uuid4().hex}" for _ in range(AUTH_BUDGET + 2)]

    def from_address(source: str) -> httpx.Client:
        return httpx.Client(base_url=env.http_url, timeout=10, transport=httpx.HTTPTransport(local_address=source))

    # HTTP: the budget of wrong tokens answers 401, then the address is refused unasked (429 + Retry-After),
    # whatever the token; another address is untouched.
    # Each address's budget is counted in fixed one-minute windows: each part starts with enough of one left.
    window_left_at_least(15)
    with from_address("127.0.0.21") as guesser:
        codes = [guesser.post(f"/api/v1/{g}/telemetry", json={"t": 1}).status_code for g in guesses]
        assert codes == [401] * AUTH_BUDGET + [429] * 2
        refused = guesser.post(f"/api/v1/{token}/telemetry", json={"t": 1})
        assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.json()["message"] == "Too many failed authentication attempts from this address"
    with from_address("127.0.0.22") as device:
        assert device.post(f"/api/v1/{token}/telemetry", json={"t": 1}).status_code == 200

    # CoAP (forgeable UDP sources): its own budget; an address it holds back still reaches HTTP and MQTT.
    window_left_at_least(25)
    answers = [coap(env, "127.0.0.23", f"/api/v1/{g}/telemetry") for g in guesses]
    assert all(a.startswith("4.01") for a in answers[:AUTH_BUDGET]), answers
    assert all(a.startswith("4.29") for a in answers[AUTH_BUDGET:]), answers
    with from_address("127.0.0.23") as same_address:
        assert same_address.post(f"/api/v1/{token}/telemetry", json={"t": 1}).status_code == 200
    assert mqtt_connack(env, "127.0.0.23", token) == 0

    # MQTT: wrong logins, then "connection rate exceeded" (0x9F) before any look-up.
    window_left_at_least(15)
    codes = [mqtt_connack(env, "127.0.0.24", g) for g in guesses]
    assert codes == [0x86] * AUTH_BUDGET + [0x9F] * 2 or codes == [0x87] * AUTH_BUDGET + [0x9F] * 2, codes
    assert mqtt_connack(env, "127.0.0.25", token) == 0

    # Counted and visible, one WARNING per episode, and never a token in any log.
    logs = stack.output()
    assert "wrong credentials from 127.0.0.21 reached 5 a minute" in logs
    for secret in [token, *guesses]:
        assert secret not in logs
