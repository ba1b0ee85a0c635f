"""Operator accounts, roles, personal API tokens and the admin audit log (issue 17), against the running admin API:
every /api route refuses a missing or revoked token and a role without the right, and every change is audited
with its actor and without secret values."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from devstack.stack import Stack

from tests.ports import free_port

from .conftest import Admin, Env

READS = {"GET"}


@pytest.fixture(scope="module")
def tokens(admin: Admin) -> Iterator[dict[str, Any]]:
    """One operator per role (created with the shared bootstrap token), each with a fresh API token."""
    made: dict[str, Any] = {}
    for role in ("admin", "operator", "viewer"):
        username = f"{role}-{uuid.uuid4().hex[:6]}"
        created = admin.http.post("/api/operators", json={"username": username, "role": role,
                                                          "password": "correct horse battery"})
        assert created.status_code == 201, created.text
        token = admin.http.post(f"/api/operators/{created.json()['id']}/tokens", json={"name": "tests"})
        assert token.status_code == 201, token.text
        made[role] = {"username": username, "id": created.json()["id"], "token": token.json()["token"],
                      "token_id": token.json()["id"]}
    yield made


def _client(env: Env, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=env.admin_url, headers=headers, timeout=10)


def _routes(admin: Admin) -> list[tuple[str, str]]:
    """Every (method, path) of /api from the admin API's own schema, path parameters filled in."""
    schema = admin.http.get("/openapi.json").json()
    routes = []
    for path, operations in schema["paths"].items():
        if not path.startswith("/api/"):
            continue
        concrete = re.sub(r"\{who\}", "me", path)
        concrete = re.sub(r"\{[^}]+\}", str(uuid.uuid4()), concrete)
        routes += [(method.upper(), concrete) for method in operations]
    assert len(routes) > 20, routes
    return routes


def _needs(method: str, path: str) -> str:
    """What the README's role table says each call needs (written out here, not taken from the code)."""
    if path.startswith("/api/operators/me"):
        return "viewer"
    if path.startswith(("/api/operators", "/api/audit")):
        return "admin"
    if method in READS:
        return "viewer"
    return "admin" if path.startswith("/api/device-profiles") else "operator"


RANK = {"viewer": 0, "operator": 1, "admin": 2}


def test_every_route_refuses_no_token_an_unknown_one_and_a_role_without_the_right(
    env: Env, stack: Stack, admin: Admin, tokens: dict[str, Any]
) -> None:
    routes = _routes(admin)
    with _client(env, None) as anonymous, _client(env, "not-a-token") as unknown:
        for method, path in routes:
            assert anonymous.request(method, path).status_code == 401, (method, path)
            assert unknown.request(method, path).status_code == 401, (method, path)
    for role in ("viewer", "operator"):
        with _client(env, tokens[role]["token"]) as client:
            for method, path in routes:
                if path.endswith("/stream"):
                    continue  # an allowed stream would stay open; refusals of it are checked below
                status = client.request(method, path, json={}).status_code
                if RANK[role] < RANK[_needs(method, path)]:
                    assert status == 403, (role, method, path, status)
                else:
                    assert status not in (401, 403), (role, method, path, status)
    with _client(env, tokens["viewer"]["token"]) as viewer:
        assert viewer.post("/api/provision-events/stream").status_code in (403, 405)


def test_a_revoked_token_is_refused_everywhere(env: Env, stack: Stack, admin: Admin) -> None:
    operator = admin.http.post("/api/operators", json={"username": f"rev-{uuid.uuid4().hex[:6]}",
                                                       "role": "admin"}).json()
    with _client(env, admin.env.admin_token) as bootstrap:
        token = bootstrap.post(f"/api/operators/{operator['id']}/tokens", json={"name": "laptop"}).json()
    with _client(env, token["token"]) as client:
        assert client.get("/api/devices").status_code == 200
        assert client.delete(f"/api/operators/me/tokens/{token['id']}").status_code == 204
        for method, path in _routes(admin):
            assert client.request(method, path).status_code == 401, (method, path)
    listed = admin.http.get(f"/api/operators/{operator['id']}/tokens").json()
    assert listed[0]["revokedTime"] is not None and "token" not in listed[0]


def test_changes_are_audited_with_their_actor_and_without_secrets(
    env: Env, stack: Stack, admin: Admin, tokens: dict[str, Any]
) -> None:
    secret_token = f"audit-secret-{uuid.uuid4().hex}"
    with _client(env, tokens["admin"]["token"]) as as_admin:
        profile = as_admin.post("/api/device-profiles", json={
            "name": f"audited-{uuid.uuid4().hex[:6]}", "provisionStrategy": "CHECK_PRE_PROVISIONED_DEVICES",
            "provisionDeviceSecret": "audit-profile-secret-1"}).json()
    with _client(env, tokens["operator"]["token"]) as as_operator:
        device = as_operator.post("/api/devices", json={
            "name": f"audited-dev-{uuid.uuid4().hex[:6]}", "deviceProfileId": profile["id"],
            "credentials": {"credentialsType": "ACCESS_TOKEN", "credentialsValue": secret_token}}).json()
        refused = as_operator.delete(f"/api/device-profiles/{profile['id']}")
        assert refused.status_code == 403
    for _ in range(50):  # an entry is written once its answer is sent: wait for the last call's
        log = admin.http.get("/api/audit", params={"pageSize": 1000}).json()["data"]
        if any(e["objectId"] == profile["id"] and e["method"] == "DELETE" for e in log) and \
                any(e["objectId"] == device["id"] for e in log):
            break
        time.sleep(0.1)
    by_object: dict[str, list[dict[str, Any]]] = {}
    for entry in log:
        by_object.setdefault(entry["objectId"], []).append(entry)
    [created_profile] = [e for e in by_object[profile["id"]] if e["method"] == "POST"]
    assert created_profile["actor"] == tokens["admin"]["username"] and created_profile["status"] == 201
    assert created_profile["changes"]["name"] == profile["name"]
    assert created_profile["changes"]["provisionDeviceSecret"] == "<set>"
    [refusal] = [e for e in by_object[profile["id"]] if e["method"] == "DELETE"]
    assert refusal["actor"] == tokens["operator"]["username"] and refusal["status"] == 403
    [created_device] = by_object[device["id"]]
    assert created_device["actor"] == tokens["operator"]["username"]
    assert created_device["changes"] == {"name": device["name"], "deviceProfileId": profile["id"],
                                         "credentials": "<set>"}
    # Operators' own calls are audited too (creating the accounts above, by the bootstrap token).
    assert any(e["actor"] == "bootstrap-token" and e["path"] == "/api/operators" for e in log)
    text = str(log)
    assert secret_token not in text and "audit-profile-secret-1" not in text and "correct horse" not in text


def test_viewers_see_profiles_without_their_secret(env: Env, stack: Stack, admin: Admin,
                                                  tokens: dict[str, Any]) -> None:
    profile = admin.create_profile()
    with _client(env, tokens["viewer"]["token"]) as viewer:
        shown = viewer.get(f"/api/device-profiles/{profile['id']}").json()
    assert shown["provisionDeviceKey"] == profile["provisionDeviceKey"] and shown["provisionDeviceSecret"] is None
    with _client(env, tokens["operator"]["token"]) as operator:
        assert operator.get(f"/api/device-profiles/{profile['id']}").json()["provisionDeviceSecret"] == \
            profile["provisionDeviceSecret"]


def test_an_admin_cannot_lock_themselves_out(env: Env, stack: Stack, tokens: dict[str, Any]) -> None:
    me = tokens["admin"]
    with _client(env, me["token"]) as as_admin:
        assert as_admin.put(f"/api/operators/{me['id']}", json={"role": "viewer"}).status_code == 409
        assert as_admin.delete(f"/api/operators/{me['id']}").status_code == 409
        duplicate = as_admin.post("/api/operators", json={"username": me["username"], "role": "viewer"})
        assert duplicate.status_code == 409
        weak = as_admin.post("/api/operators", json={"username": "weak-pw", "role": "viewer", "password": "short"})
        assert weak.status_code == 400


def test_console_log_in_attempts_share_one_budget_across_admin_processes(env: Env, stack: Stack,
                                                                         admin: Admin) -> None:
    """Two more admin API processes on the module's database (two replicas behind one Service), both with
    CONSOLE_LOGIN_FAILURES_PER_MINUTE=3 (a token back every 20 s): their failures come out of one budget, where
    the former per-process counter gave each its own (3 + 3). Right passwords never use it up."""
    password = "correct horse battery"
    username = f"shared-{uuid.uuid4().hex[:6]}"
    assert admin.http.post("/api/operators", json={"username": username, "role": "viewer",
                                                   "password": password}).status_code == 201
    replicas: list[Stack] = []
    try:
        for _ in range(2):
            port = free_port()
            replicas.append(Stack(env.variables(ADMIN_PORT=str(port), CONSOLE_LOGIN_FAILURES_PER_MINUTE="3"),
                                  services=["admin_api"]).start(timeout=60))
        urls = [f"http://127.0.0.1:{replica.env['ADMIN_PORT']}" for replica in replicas]

        def log_in(index: int, secret: str) -> httpx.Response:
            return httpx.post(f"{urls[index % 2]}/console/login", json={"username": username, "password": secret},
                              timeout=30)

        # Right passwords, more than the budget, on both: a success gives its attempt back.
        assert [log_in(i, password).status_code for i in range(5)] == [200] * 5
        # Wrong ones, alternating: 3 in all, then both replicas refuse (each alone would still have 1 or 2 left).
        assert [log_in(i, "wrong password!").status_code for i in range(3)] == [401] * 3
        for index in (1, 0):
            refused = log_in(index, "wrong password!")
            assert refused.status_code == 429, (index, refused.text)
            seconds = int(refused.headers["retry-after"])
            assert 1 <= seconds <= 21
            assert refused.json()["message"] == f"Too many login attempts, try again in {seconds} s"
        # The right password too, now (a guesser cannot tell it from a wrong one), and no session is made.
        refused = log_in(1, password)
        assert refused.status_code == 429 and "console_session" not in refused.cookies
    finally:
        for replica in replicas:
            replica.stop()
