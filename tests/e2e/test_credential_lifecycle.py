"""Credential revocation and rotation through the admin API (issue 19): the old credentials stop working
everywhere at once (a live MQTT session is closed, MQTT CONNECT and the HTTP device API refuse them, no device
can be given them again) and rotated ones work at once."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from devstack.stack import Stack
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import Infra
from tests.pki import issue

from . import mqtt_clients as mc
from .conftest import Admin, Env, module_env, tb_request
from .test_mqtt_bridge import AUTH_HEADERS, broker_auth  # noqa: F401 - the fixture: broker_auth as a process


@pytest.fixture(scope="module")
def env(infra: Infra, tls_files: tuple[Path, Path, Path]) -> Iterator[Env]:
    """This module's stack keeps no content replay window (PROVISION_REPLAY_WINDOW_S=0): a device that sends its
    first request again after a factory reset is then a new request at once, not a replay of the first answer
    (with the default window it gets that answer, still valid, for ten minutes)."""
    with module_env(infra, tls_files, PROVISION_REPLAY_WINDOW_S="0") as environment:
        yield environment


def _provisioned_token(http: httpx.Client, profile: dict[str, Any]) -> tuple[str, str]:
    name = f"life-{uuid.uuid4().hex[:8]}"
    answer = http.post("/api/v1/provision", json=tb_request(profile, deviceName=name)).json()
    assert answer["status"] == "SUCCESS", answer
    return name, answer["credentialsValue"]


def _device_id(admin: Admin, name: str) -> str:
    found = admin.http.get("/api/devices", params={"textSearch": name}).json()["data"]
    assert len(found) == 1
    return str(found[0]["id"])


class LiveSession:
    """An MQTT 5 device session (paho) that records how it ended."""

    def __init__(self, port: int, token: str) -> None:
        self.connected, self.ended = threading.Event(), threading.Event()
        self.reason: int | None = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"live-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(token)
        self.client.on_connect = lambda _c, _u, _f, rc, _p=None: self.connected.set() if not rc.is_failure else None
        self.client.on_disconnect = self._on_disconnect
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.connected.wait(10), "no CONNACK"

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, reason_code: Any, _p: Any = None) -> None:
        self.reason = int(getattr(reason_code, "value", reason_code))
        self.ended.set()

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _mqtt_refuses(port: int, **credentials: str) -> None:
    client = mc.connect(port, **credentials)
    client.stop()
    assert mc.refusal_value(client) == mc.NOT_AUTHORIZED


def _mqtt_accepts(port: int, **credentials: str) -> None:
    client = mc.connect(port, **credentials)
    try:
        assert mc.accepted(client)
    finally:
        client.stop()


def test_revoke_ends_the_live_session_and_the_token_is_refused_everywhere(
    env: Env, stack: Stack, admin: Admin, http: httpx.Client, profile: dict[str, Any]
) -> None:
    name, token = _provisioned_token(http, profile)
    device_id = _device_id(admin, name)
    session = LiveSession(env.mqtt_port, token)
    try:
        assert http.post(f"/api/v1/{token}/telemetry", json={"t": 1}).status_code == 200
        revoked = admin.http.post(f"/api/devices/{device_id}/credentials/revoke")
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["credentialsType"] is None and revoked.json()["sessionsEnded"] is True
        assert session.ended.wait(10), "the live MQTT session was not closed"
        assert session.reason == 0x87  # MQTT 5 DISCONNECT: Not authorized
    finally:
        session.stop()
    _mqtt_refuses(env.mqtt_port, username=token)
    assert http.post(f"/api/v1/{token}/telemetry", json={"t": 2}).status_code == 401
    assert admin.http.get(f"/api/devices/{device_id}").json()["credentialsType"] is None
    # Revoked credentials are dead for good: no other device may be given them.
    reuse = admin.http.post("/api/devices", json={
        "name": f"reuse-{uuid.uuid4().hex[:6]}", "deviceProfileId": profile["id"],
        "credentials": {"credentialsType": "ACCESS_TOKEN", "credentialsValue": token}})
    assert reuse.status_code == 409 and "already assigned" in reuse.json()["message"]
    # Nor may a device choose them when it provisions.
    again = http.post("/api/v1/provision", json=tb_request(
        profile, deviceName=f"chooser-{uuid.uuid4().hex[:6]}", credentialsType="ACCESS_TOKEN", token=token)).json()
    assert again["status"] == "FAILURE"
    # Idempotent.
    assert admin.http.post(f"/api/devices/{device_id}/credentials/revoke").status_code == 200


def test_rotate_shows_new_credentials_once_and_only_they_work(
    env: Env, stack: Stack, admin: Admin, http: httpx.Client, profile: dict[str, Any]
) -> None:
    name, old = _provisioned_token(http, profile)
    device_id = _device_id(admin, name)
    session = LiveSession(env.mqtt_port, old)
    try:
        rotated = admin.http.post(f"/api/devices/{device_id}/credentials/rotate")
        assert rotated.status_code == 200, rotated.text
        assert session.ended.wait(10), "the session on the old token was not closed"
    finally:
        session.stop()
    credentials = rotated.json()["credentials"]
    assert credentials["credentialsType"] == "ACCESS_TOKEN"
    new = credentials["credentialsValue"]
    assert new != old and len(new) >= 16
    _mqtt_refuses(env.mqtt_port, username=old)
    _mqtt_accepts(env.mqtt_port, username=new)
    assert http.post(f"/api/v1/{old}/telemetry", json={"t": 1}).status_code == 401
    assert http.post(f"/api/v1/{new}/telemetry", json={"t": 1}).status_code == 200
    # Never shown again.
    assert "credentials" not in admin.http.get(f"/api/devices/{device_id}").json()
    # Rotating back to the revoked token is refused, and changes nothing.
    back = admin.http.post(f"/api/devices/{device_id}/credentials/rotate",
                           json={"credentialsType": "ACCESS_TOKEN", "credentialsValue": old})
    assert back.status_code == 409
    _mqtt_accepts(env.mqtt_port, username=new)


def test_mqtt_basic_rotation_keeps_client_id_and_user_name_with_a_new_password(
    env: Env, stack: Stack, admin: Admin, profile: dict[str, Any]
) -> None:
    client_id = f"basic-{uuid.uuid4().hex[:8]}"
    device = admin.create_device(profile["id"], credentials={
        "credentialsType": "MQTT_BASIC",
        "credentialsValue": {"clientId": client_id, "userName": "line-7", "password": "first-password-1"}})
    _mqtt_accepts(env.mqtt_port, client_id=client_id, username="line-7", password="first-password-1")
    rotated = admin.http.post(f"/api/devices/{device['id']}/credentials/rotate")
    assert rotated.status_code == 200, rotated.text
    value = rotated.json()["credentials"]["credentialsValue"]
    assert value["clientId"] == client_id and value["userName"] == "line-7"
    assert value["password"] and value["password"] != "first-password-1"
    _mqtt_refuses(env.mqtt_port, client_id=client_id, username="line-7", password="first-password-1")
    _mqtt_accepts(env.mqtt_port, client_id=client_id, username="line-7", password=value["password"])
    # Revoked, the client id and user name are dead too: no other device may take them.
    assert admin.http.post(f"/api/devices/{device['id']}/credentials/revoke").status_code == 200
    _mqtt_refuses(env.mqtt_port, client_id=client_id, username="line-7", password=value["password"])
    taken = admin.http.post("/api/devices", json={
        "name": f"again-{uuid.uuid4().hex[:6]}", "deviceProfileId": profile["id"],
        "credentials": {"credentialsType": "MQTT_BASIC",
                        "credentialsValue": {"clientId": client_id, "userName": "line-7", "password": "other-pw-123"}}})
    assert taken.status_code == 409


def test_x509_rotation_takes_the_new_certificate(admin: Admin, profile: dict[str, Any]) -> None:
    first, second = issue(f"cert-{uuid.uuid4().hex[:6]}"), issue(f"cert-{uuid.uuid4().hex[:6]}")
    device = admin.create_device(profile["id"], credentials={"credentialsType": "X509_CERTIFICATE",
                                                             "credentialsValue": first.pem})
    without = admin.http.post(f"/api/devices/{device['id']}/credentials/rotate")
    assert without.status_code == 400 and "certificate" in without.json()["message"]
    rotated = admin.http.post(f"/api/devices/{device['id']}/credentials/rotate",
                              json={"credentialsType": "X509_CERTIFICATE", "credentialsValue": second.pem})
    assert rotated.status_code == 200, rotated.text
    assert rotated.json()["credentialsType"] == "X509_CERTIFICATE"
    # The replaced certificate cannot be given to another device.
    other = admin.http.post("/api/devices", json={
        "name": f"other-{uuid.uuid4().hex[:6]}", "deviceProfileId": profile["id"],
        "credentials": {"credentialsType": "X509_CERTIFICATE", "credentialsValue": first.pem}})
    assert other.status_code == 409


def test_a_pre_provisioned_device_collects_its_rotated_credentials(admin: Admin, http: httpx.Client) -> None:
    profile = admin.create_profile("CHECK_PRE_PROVISIONED_DEVICES")
    device = admin.create_device(profile["id"])
    original = device["credentials"]["credentialsValue"]
    rotated = admin.http.post(f"/api/devices/{device['id']}/credentials/rotate").json()["credentials"]
    answer = http.post("/api/v1/provision", json=tb_request(profile, deviceName=device["name"])).json()
    assert answer == {"credentialsType": "ACCESS_TOKEN", "credentialsValue": rotated["credentialsValue"],
                      "status": "SUCCESS"}
    assert rotated["credentialsValue"] != original


def test_unknown_devices_are_404(admin: Admin) -> None:
    missing = uuid.uuid4()
    for action in ("revoke", "rotate"):
        response = admin.http.post(f"/api/devices/{missing}/credentials/{action}")
        assert response.status_code == 404 and str(missing) in response.json()["message"]


def test_an_import_that_replaces_credentials_revokes_the_old_ones_and_ends_their_sessions(
    env: Env, stack: Stack, admin: Admin, profile: dict[str, Any]
) -> None:
    old = f"import-old-{uuid.uuid4().hex}"
    device = admin.create_device(profile["id"],
                                 credentials={"credentialsType": "ACCESS_TOKEN", "credentialsValue": old})
    session = LiveSession(env.mqtt_port, old)
    new = f"import-new-{uuid.uuid4().hex}"
    try:
        job = admin.http.post("/api/devices/import", params={"deviceProfileId": profile["id"], "onExisting": "update"},
                              content=f"name,accessToken\n{device['name']},{new}\n",
                              headers={"Content-Type": "text/csv"})
        assert job.status_code == 202, job.text
        for _ in range(100):
            report = admin.http.get(f"/api/devices/import/{job.json()['id']}").json()
            if report["status"] != "running":
                break
            time.sleep(0.1)
        assert report["status"] == "done" and report["updated"] == 1, report
        assert session.ended.wait(10), "the session on the replaced token was not closed"
    finally:
        session.stop()
    _mqtt_refuses(env.mqtt_port, username=old)
    _mqtt_accepts(env.mqtt_port, username=new)
    reuse = admin.http.post("/api/devices", json={
        "name": f"reuse-{uuid.uuid4().hex[:6]}", "deviceProfileId": profile["id"],
        "credentials": {"credentialsType": "ACCESS_TOKEN", "credentialsValue": old}})
    assert reuse.status_code == 409


# --- re-provisioning after a factory reset (profile reprovisionPolicy) ----------------------------------------


def test_never_keeps_thingsboards_answer_for_a_second_provision_request(
    admin: Admin, http: httpx.Client, profile: dict[str, Any]
) -> None:
    name, _ = _provisioned_token(http, profile)
    again = http.post("/api/v1/provision", json=tb_request(profile, deviceName=name))
    assert again.json() == {"errorMsg": "Failed to provision device!", "status": "FAILURE"}


@pytest.fixture(scope="module")
def broker_auth_url(broker_auth: Stack) -> str:  # noqa: F811 - the imported fixture, by name
    return str(broker_auth.env["URL"])


def _broker_auth_says(url: str, token: str) -> str:
    """What broker_auth answers EMQX for a ThingsBoard device logging in with ``token`` as its user name."""
    with httpx.Client(base_url=url, timeout=10, headers=AUTH_HEADERS) as client:
        answer = client.post("/emqx/auth", json={"clientid": "c1", "username": token, "password": ""})
    return str(answer.json()["result"])


def test_rotate_gives_a_factory_reset_device_new_credentials_and_kills_the_old_ones(
    env: Env, stack: Stack, admin: Admin, http: httpx.Client, broker_auth_url: str
) -> None:
    profile = admin.create_profile(reprovisionPolicy="ROTATE")
    assert profile["reprovisionPolicy"] == "ROTATE"
    name, old = _provisioned_token(http, profile)
    device_id = _device_id(admin, name)
    stale = LiveSession(env.mqtt_port, old)  # e.g. a clone, or the unit's session from before its reset
    try:
        # The device was reset and lost its token: it provisions again, as ThingsBoard firmware does on first boot,
        # and connects with its new token at once.
        again = http.post("/api/v1/provision", json=tb_request(profile, deviceName=name)).json()
        assert again["status"] == "SUCCESS" and again["credentialsValue"] != old
        new = again["credentialsValue"]
        fresh = LiveSession(env.mqtt_port, new)
        try:
            assert stale.ended.wait(10), "the session with the old token was not closed"
            assert stale.reason == 0x87  # MQTT 5 DISCONNECT: Not authorized
            # The revocation reached the gateway (above); the session opened with the new token stays.
            sent = fresh.client.publish("v1/devices/me/telemetry", '{"t": 1}', qos=1)
            sent.wait_for_publish(10)
            assert sent.is_published()  # PUBACK'd
            assert not fresh.ended.is_set()
        finally:
            fresh.stop()
    finally:
        stale.stop()
    assert _device_id(admin, name) == device_id  # the same device, its data kept
    _mqtt_refuses(env.mqtt_port, username=old)
    assert http.post(f"/api/v1/{old}/telemetry", json={"t": 1}).status_code == 401
    _mqtt_accepts(env.mqtt_port, username=new)
    assert http.post(f"/api/v1/{new}/telemetry", json={"t": 1}).status_code == 200
    # And on an operator's own broker (bridge mode), which asks broker_auth.
    assert (_broker_auth_says(broker_auth_url, old), _broker_auth_says(broker_auth_url, new)) == ("deny", "allow")
    for _ in range(50):  # events are written in batches, off the provisioning path
        events = admin.http.get("/api/provision-events", params={"deviceName": name}).json()["data"]
        if len(events) >= 2:
            break
        time.sleep(0.1)
    assert [e["reason"] for e in events] == ["reprovisioned", "created"]


def test_rotate_with_device_key_needs_the_devices_own_key(admin: Admin, http: httpx.Client) -> None:
    profile = admin.create_profile(reprovisionPolicy="ROTATE_WITH_DEVICE_KEY")
    name, serial = f"inno-{uuid.uuid4().hex[:8]}", f"SN-{uuid.uuid4().hex}"
    first = http.post("/api/provision", json={"device_name": name, "device_key": serial,
                                              "provision_key": profile["provisionDeviceKey"],
                                              "provision_secret": profile["provisionDeviceSecret"]})
    assert first.json()["status"] == "SUCCESS", first.text
    base = {"device_name": name, "provision_key": profile["provisionDeviceKey"],
            "provision_secret": profile["provisionDeviceSecret"]}
    assert http.post("/api/provision", json=base).json()["status"] == "FAILURE"
    assert http.post("/api/provision", json={**base, "device_key": "SN-wrong"}).json()["status"] == "FAILURE"
    again = http.post("/api/provision", json={**base, "device_key": serial}).json()
    assert again["status"] == "SUCCESS"
    assert again["token"] != first.json()["token"] and again["device_id"] == first.json()["device_id"]
