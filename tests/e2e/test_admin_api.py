"""The admin API's contract: bearer auth, profiles, pre-provisioned devices, look-ups and errors."""

from __future__ import annotations

import uuid

import httpx

from tests.pki import pem_body, self_signed_pem

from .conftest import Admin, Env


def test_every_call_needs_the_bearer_token(env: Env, admin: Admin) -> None:
    assert httpx.get(f"{env.admin_url}/api/device-profiles").status_code == 401
    wrong = httpx.get(f"{env.admin_url}/api/device-profiles", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["message"] == "Missing or invalid bearer token"
    assert httpx.get(f"{env.admin_url}/health").status_code == 200


def test_profile_crud(admin: Admin) -> None:
    created = admin.create_profile()
    assert len(created["provisionDeviceKey"]) == 20 and len(created["provisionDeviceSecret"]) == 20
    key = created["provisionDeviceKey"]
    assert key.isalnum() and key.lower() == key
    fetched = admin.http.get(f"/api/device-profiles/{created['id']}").json()
    assert fetched == created
    updated = admin.http.put(f"/api/device-profiles/{created['id']}", json={
        "name": created["name"], "provisionStrategy": "CHECK_PRE_PROVISIONED_DEVICES",
        "provisionDeviceKey": created["provisionDeviceKey"], "provisionDeviceSecret": "new-secret"})
    assert updated.status_code == 200
    assert updated.json()["provisionStrategy"] == "CHECK_PRE_PROVISIONED_DEVICES"
    assert updated.json()["provisionDeviceSecret"] == "new-secret"
    listed = admin.http.get("/api/device-profiles", params={"pageSize": 1000}).json()
    assert created["id"] in [p["id"] for p in listed["data"]]
    assert admin.http.delete(f"/api/device-profiles/{created['id']}").status_code == 204
    assert admin.http.get(f"/api/device-profiles/{created['id']}").status_code == 404


def test_profile_given_key_and_secret_are_kept(admin: Admin) -> None:
    key = f"key-{uuid.uuid4().hex[:8]}"
    created = admin.create_profile(provisionDeviceKey=key, provisionDeviceSecret="my-secret")
    assert (created["provisionDeviceKey"], created["provisionDeviceSecret"]) == (key, "my-secret")


def test_profile_conflicts_and_bad_bodies(admin: Admin) -> None:
    created = admin.create_profile()
    same_name = admin.http.post("/api/device-profiles",
                                json={"name": created["name"], "provisionStrategy": "ALLOW_CREATE_NEW_DEVICES"})
    assert same_name.status_code == 409
    same_key = admin.http.post("/api/device-profiles", json={
        "name": f"other-{uuid.uuid4().hex[:6]}", "provisionStrategy": "ALLOW_CREATE_NEW_DEVICES",
        "provisionDeviceKey": created["provisionDeviceKey"]})
    assert same_key.status_code == 409
    assert same_key.json()["message"] == "Device profile with such provision device key already exists!"
    bad_strategy = admin.http.post("/api/device-profiles", json={"name": "x", "provisionStrategy": "SOMETIMES"})
    assert bad_strategy.status_code == 400 and "provisionStrategy" in bad_strategy.json()["message"]
    blank = admin.http.post("/api/device-profiles", json={"name": "  ", "provisionStrategy": "DISABLED"})
    assert blank.status_code == 400
    assert admin.http.post("/api/device-profiles", content=b"{nope").status_code == 400
    assert admin.http.get(f"/api/device-profiles/{uuid.uuid4()}").status_code == 404
    assert admin.http.get("/api/device-profiles/not-a-uuid").status_code == 400


def test_profile_with_devices_cannot_be_deleted(admin: Admin) -> None:
    profile = admin.create_profile("CHECK_PRE_PROVISIONED_DEVICES")
    admin.create_device(profile["id"])
    response = admin.http.delete(f"/api/device-profiles/{profile['id']}")
    assert response.status_code == 409


def test_devices_create_get_list_and_errors(admin: Admin) -> None:
    profile = admin.create_profile("CHECK_PRE_PROVISIONED_DEVICES")
    names = [f"lamp-{i}-{uuid.uuid4().hex[:4]}" for i in range(3)]
    created = [admin.create_device(profile["id"], name) for name in names]
    first = created[0]
    assert first["credentialsType"] == "ACCESS_TOKEN" and len(first["credentials"]["credentialsValue"]) == 20
    got = admin.http.get(f"/api/devices/{first['id']}").json()
    assert got["name"] == names[0] and got["deviceProfileId"] == profile["id"]
    assert got["provisionState"] is None and "credentials" not in got

    page = admin.http.get("/api/devices", params={"deviceProfileId": profile["id"], "pageSize": 2}).json()
    assert page["totalElements"] == 3 and page["hasNext"] is True and len(page["data"]) == 2
    last = admin.http.get("/api/devices", params={"deviceProfileId": profile["id"], "pageSize": 2, "page": 1}).json()
    assert last["hasNext"] is False and len(last["data"]) == 1
    search = admin.http.get("/api/devices", params={"textSearch": names[1]}).json()
    assert [d["name"] for d in search["data"]] == [names[1]]

    duplicate = admin.http.post("/api/devices", json={"name": names[0], "deviceProfileId": profile["id"]})
    assert duplicate.status_code == 409 and duplicate.json()["message"] == "Device with such name already exists!"
    unknown_profile = admin.http.post("/api/devices", json={"name": "z", "deviceProfileId": str(uuid.uuid4())})
    assert unknown_profile.status_code == 400
    assert admin.http.get(f"/api/devices/{uuid.uuid4()}").status_code == 404
    assert admin.http.delete(f"/api/devices/{first['id']}").status_code == 204
    assert admin.http.get(f"/api/devices/{first['id']}").status_code == 404


def test_device_credentials_given_by_the_admin(admin: Admin) -> None:
    profile = admin.create_profile("CHECK_PRE_PROVISIONED_DEVICES")
    token = f"admin-token-{uuid.uuid4().hex[:6]}"
    device = admin.create_device(profile["id"], credentials={"credentialsType": "ACCESS_TOKEN",
                                                             "credentialsValue": token})
    assert device["credentials"] == {"credentialsType": "ACCESS_TOKEN", "credentialsValue": token}
    taken = admin.http.post("/api/devices", json={
        "name": f"d-{uuid.uuid4().hex[:6]}", "deviceProfileId": profile["id"],
        "credentials": {"credentialsType": "ACCESS_TOKEN", "credentialsValue": token}})
    assert taken.status_code == 409
    assert taken.json()["message"] == "Device credentials are already assigned to another device!"
    pem = self_signed_pem()
    x509 = admin.create_device(profile["id"], credentials={"credentialsType": "X509_CERTIFICATE",
                                                           "credentialsValue": pem})
    assert x509["credentials"]["credentialsValue"] == pem_body(pem)
    bad_cert = admin.http.post("/api/devices", json={
        "name": f"d-{uuid.uuid4().hex[:6]}", "deviceProfileId": profile["id"],
        "credentials": {"credentialsType": "X509_CERTIFICATE", "credentialsValue": "not a cert"}})
    assert bad_cert.status_code == 400 and "X.509" in bad_cert.json()["message"]
    bad_mqtt = admin.http.post("/api/devices", json={
        "name": f"d-{uuid.uuid4().hex[:6]}", "deviceProfileId": profile["id"],
        "credentials": {"credentialsType": "MQTT_BASIC", "credentialsValue": "flat"}})
    assert bad_mqtt.status_code == 400
