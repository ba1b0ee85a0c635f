"""The pre-provisioning hook (issue 19): a test hook server, written here, allows, denies, renames, times out
(fail-closed and fail-open) and answers slowly under concurrency; every call it gets is signed with the profile's
secret; repeated requests replay the first decision; a refused request writes nothing."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from devstack.stack import Stack

from tests.conftest import Infra

from .conftest import Admin, Env, module_env, tb_request

SECRET = "hook-secret-" + uuid.uuid4().hex


@dataclass
class HookServer:
    """Answers by the device name's prefix: allow-*, deny-*, rename-*, tag-* (a label and server attributes),
    badlabel-* (a label the contract refuses), slow-* (0.5 s), hang-* (6 s: too late), garbage-* (not JSON)."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, body: bytes, signature: str) -> tuple[int, bytes]:
        parts = dict(item.split("=", 1) for item in signature.split(",") if "=" in item)
        expected = hmac.new(SECRET.encode(), f"{parts.get('t')}.".encode() + body, hashlib.sha256).hexdigest()
        fresh = abs(time.time() - int(parts.get("t", "0"))) < 300
        if not (fresh and hmac.compare_digest(expected, parts.get("v1", ""))):
            with self.lock:
                self.bad_signatures += 1
            return 401, b"{}"
        request = json.loads(body)
        with self.lock:
            self.calls.append(request)
        name = request["deviceName"]
        if name.startswith("deny-"):
            return 200, json.dumps({"allow": False, "reason": "serial not in ERP"}).encode()
        if name.startswith("tag-"):
            return 200, json.dumps({"allow": True, "label": f"Line 3 / {name}",
                                    "attributes": {"erpId": 42, "batch": {"id": "B7", "qa": [True, None]}}}).encode()
        if name.startswith("badlabel-"):
            return 200, json.dumps({"allow": True, "label": "two\nlines"}).encode()
        if name.startswith("rename-"):
            return 200, json.dumps({"allow": True, "deviceName": "renamed-" + name[len("rename-"):]}).encode()
        if name.startswith("slow-"):
            time.sleep(0.5)
        if name.startswith("hang-"):
            time.sleep(6)
        if name.startswith("garbage-"):
            return 200, b"not json"
        return 200, b'{"allow": true}'


@pytest.fixture(scope="module")
def hook() -> Iterator[tuple[HookServer, str]]:
    server_state = HookServer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status, answer = server_state.answer(body, self.headers.get("X-Provision-Signature", ""))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server_state, f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def env(infra: Infra, tls_files: tuple[Path, Path, Path]) -> Iterator[Env]:
    """This module's stack lets profiles call an http:// hook (the test's own server on loopback)."""
    with module_env(infra, tls_files, PROVISION_HOOK_ALLOW_HTTP="true") as environment:
        yield environment


def _profile(admin: Admin, url: str, **hook: Any) -> dict[str, Any]:
    # 4 s: generous on a loaded machine, so that only the hang-* answers (6 s) come too late.
    return admin.create_profile(provisionHook={"url": url, "secret": SECRET, "timeoutMs": 4000, **hook})


def _names(admin: Admin, profile: dict[str, Any]) -> list[str]:
    data = admin.http.get("/api/devices", params={"deviceProfileId": profile["id"], "pageSize": 1000}).json()["data"]
    return sorted(d["name"] for d in data)


def test_the_hook_allows_denies_and_renames_and_every_call_is_signed(
    stack: Stack, admin: Admin, http: httpx.Client, hook: tuple[HookServer, str]
) -> None:
    server, url = hook
    profile = _profile(admin, url)
    assert profile["provisionHook"] == {"url": url, "timeoutMs": 4000, "failOpen": False}  # never the secret
    tag = uuid.uuid4().hex[:6]
    allowed = http.post("/api/v1/provision", json=tb_request(profile, deviceName=f"allow-{tag}")).json()
    assert allowed["status"] == "SUCCESS"
    denied = http.post("/api/v1/provision", json=tb_request(profile, deviceName=f"deny-{tag}")).json()
    assert denied == {"errorMsg": "Provisioning refused by the device profile's hook", "status": "FAILURE"}
    renamed = http.post("/api/v1/provision", json=tb_request(profile, deviceName=f"rename-{tag}")).json()
    assert renamed["status"] == "SUCCESS"
    assert _names(admin, profile) == [f"allow-{tag}", f"renamed-{tag}"]  # nothing written for the denied one
    asked = [c for c in server.calls if c["profileId"] == profile["id"]]
    assert [c["deviceName"] for c in asked] == [f"allow-{tag}", f"deny-{tag}", f"rename-{tag}"]
    assert asked[0]["transport"] == "HTTP" and asked[0]["credentialsType"] == "ACCESS_TOKEN"
    assert asked[0]["extra"] == {}  # the device sent no field of its own
    assert server.bad_signatures == 0
    for _ in range(50):  # events are written in batches
        events = admin.http.get("/api/provision-events", params={"deviceName": f"deny-{tag}"}).json()["data"]
        if events:
            break
        time.sleep(0.1)
    assert [(e["outcome"], e["reason"]) for e in events] == [("FAILURE", "hook_denied")]


def test_a_repeated_request_replays_the_first_decision(
    stack: Stack, admin: Admin, http: httpx.Client, hook: tuple[HookServer, str]
) -> None:
    server, url = hook
    profile = _profile(admin, url)
    request = tb_request(profile, deviceName=f"deny-{uuid.uuid4().hex[:6]}")
    first = http.post("/api/v1/provision", json=request).json()
    second = http.post("/api/v1/provision", json=request).json()
    assert first == second and first["status"] == "FAILURE"
    assert len([c for c in server.calls if c["deviceName"] == request["deviceName"]]) == 1


def test_a_hook_that_does_not_answer_in_time_fails_closed_or_open_as_the_profile_says(
    stack: Stack, admin: Admin, http: httpx.Client, hook: tuple[HookServer, str]
) -> None:
    _, url = hook
    closed, opened = _profile(admin, url), _profile(admin, url, failOpen=True)
    tag = uuid.uuid4().hex[:6]
    refused = http.post("/api/v1/provision", json=tb_request(closed, deviceName=f"hang-{tag}")).json()
    assert refused["status"] == "FAILURE" and _names(admin, closed) == []
    garbage = http.post("/api/v1/provision", json=tb_request(closed, deviceName=f"garbage-{tag}")).json()
    assert garbage["status"] == "FAILURE"
    let_through = http.post("/api/v1/provision", json=tb_request(opened, deviceName=f"hang-{tag}")).json()
    assert let_through["status"] == "SUCCESS" and _names(admin, opened) == [f"hang-{tag}"]


def test_a_slow_hook_under_concurrency_answers_every_request(
    stack: Stack, admin: Admin, env: Env, hook: tuple[HookServer, str]
) -> None:
    _, url = hook
    profile = _profile(admin, url, timeoutMs=8000)  # each answer takes 0.5 s; the time-out is not what is tested
    names = [f"slow-{uuid.uuid4().hex[:8]}" for _ in range(20)]
    with httpx.Client(base_url=env.http_url, timeout=30) as client, ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda n: client.post("/api/v1/provision", json=tb_request(profile, deviceName=n))
                                .json(), names))
    assert [a["status"] for a in answers] == ["SUCCESS"] * 20
    assert _names(admin, profile) == sorted(names)


def test_hook_urls_must_be_https_unless_allowed_and_need_a_secret(admin: Admin) -> None:
    no_secret = admin.http.post("/api/device-profiles", json={
        "name": f"p-{uuid.uuid4().hex[:6]}", "provisionStrategy": "ALLOW_CREATE_NEW_DEVICES",
        "provisionHook": {"url": "https://erp.example/hook"}})
    assert no_secret.status_code == 400 and "secret" in no_secret.json()["message"]
    short = admin.http.post("/api/device-profiles", json={
        "name": f"p-{uuid.uuid4().hex[:6]}", "provisionStrategy": "ALLOW_CREATE_NEW_DEVICES",
        "provisionHook": {"url": "https://erp.example/hook", "secret": "short"}})
    assert short.status_code == 400


def _device(admin: Admin, profile: dict[str, Any], name: str) -> dict[str, Any]:
    data = admin.http.get("/api/devices", params={"deviceProfileId": profile["id"], "textSearch": name}).json()["data"]
    [device] = [d for d in data if d["name"] == name]
    return device


def _server_attributes(admin: Admin, device_id: str) -> dict[str, Any]:
    answer = admin.http.get(f"/api/devices/{device_id}/attributes/server")
    assert answer.status_code == 200, answer.text
    return {a["key"]: a["value"] for a in answer.json()}


def test_the_hook_sees_the_devices_own_fields_and_sets_label_and_attributes(
    stack: Stack, admin: Admin, http: httpx.Client, hook: tuple[HookServer, str]
) -> None:
    server, url = hook
    profile = _profile(admin, url)
    tag = uuid.uuid4().hex[:6]
    own = {"serialNumber": "SN-0001", "hwVersion": 3, "calibration": {"offset": -0.25, "ok": True, "runs": [1, 2]}}
    answer = http.post("/api/v1/provision", json=tb_request(profile, deviceName=f"tag-{tag}", **own)).json()
    assert answer["status"] == "SUCCESS"
    [call] = [c for c in server.calls if c["deviceName"] == f"tag-{tag}"]
    assert call["extra"] == own  # as sent, JSON types kept (numbers are not their source text)
    device = _device(admin, profile, f"tag-{tag}")
    assert device["label"] == f"Line 3 / tag-{tag}"
    attributes = _server_attributes(admin, device["id"])
    assert attributes["erpId"] == 42 and attributes["batch"] == {"id": "B7", "qa": [True, None]}
    assert attributes["provisionState"] == "provisioned"
    # The device itself never sees server attributes: its token reads its (empty) shared/client ones only.
    mine = http.get(f"/api/v1/{answer['credentialsValue']}/attributes", params={"sharedKeys": "erpId"}).json()
    assert "erpId" not in str(mine)

    # Innoway's snake_case dialect: its own fields are not "extra", the others are.
    innoway = http.post("/api/provision", json={
        "provision_key": profile["provisionDeviceKey"], "provision_secret": profile["provisionDeviceSecret"],
        "device_name": f"tag-i-{tag}", "device_key": f"k-{tag}", "firmware": "1.2.0"}).json()
    assert innoway["status"] == "SUCCESS"
    [call] = [c for c in server.calls if c["deviceName"] == f"tag-i-{tag}"]
    assert call["extra"] == {"firmware": "1.2.0"}
    assert _device(admin, profile, f"tag-i-{tag}")["label"] == f"Line 3 / tag-i-{tag}"

    # More than 4 KiB of the device's own fields: dropped (null), never a refusal.
    big = http.post("/api/v1/provision", json=tb_request(profile, deviceName=f"allow-big-{tag}", blob="x" * 5000))
    assert big.json()["status"] == "SUCCESS"
    [call] = [c for c in server.calls if c["deviceName"] == f"allow-big-{tag}"]
    assert call["extra"] is None


def test_a_pre_provisioned_device_gets_the_hooks_label_at_its_claim(
    stack: Stack, admin: Admin, http: httpx.Client, hook: tuple[HookServer, str]
) -> None:
    _, url = hook
    profile = admin.create_profile("CHECK_PRE_PROVISIONED_DEVICES",
                                   provisionHook={"url": url, "secret": SECRET, "timeoutMs": 4000})
    name = f"tag-pre-{uuid.uuid4().hex[:6]}"
    created = admin.create_device(profile["id"], name)
    assert created.get("label") is None
    assert http.post("/api/v1/provision", json=tb_request(profile, deviceName=name)).json()["status"] == "SUCCESS"
    device = _device(admin, profile, name)
    assert device["label"] == f"Line 3 / {name}" and device["provisionState"] == "provisioned"
    assert _server_attributes(admin, device["id"])["erpId"] == 42


def test_an_answer_outside_the_contract_writes_nothing(
    stack: Stack, admin: Admin, http: httpx.Client, hook: tuple[HookServer, str]
) -> None:
    server, url = hook
    profile = _profile(admin, url)
    name = f"badlabel-{uuid.uuid4().hex[:6]}"
    answer = http.post("/api/v1/provision", json=tb_request(profile, deviceName=name)).json()
    assert answer["status"] == "FAILURE"  # a label with a control character: the hook did not decide (fail-closed)
    assert [c["deviceName"] for c in server.calls].count(name) == 1
    assert _names(admin, profile) == []
