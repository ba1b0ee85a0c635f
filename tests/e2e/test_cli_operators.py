"""The installed ``provisioning`` console script's operator commands against the running stack: accounts
(``operators``), personal API tokens (``tokens``) and a device's credentials (``devices rotate|revoke``),
each checked through the API it changed, and through the device API for credentials."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx

from .conftest import Admin, Env

PASSWORD = "correct horse battery staple"


def cli(env: Env, *args: str, token: str | None = None, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """The console script as an operator runs it, its token in PROVISIONING_TOKEN (the bootstrap token when
    none is given), ``stdin`` on its standard input (not a terminal: a password is read from it)."""
    exe = shutil.which("provisioning", path=str(Path(sys.executable).parent))
    assert exe, "the provisioning console script is not installed (make install)"
    variables = {key: value for key, value in os.environ.items() if key not in ("ADMIN_API_TOKEN",)}
    variables.update(PROVISIONING_URL=env.admin_url, PROVISIONING_TOKEN=token or env.admin_token, NO_COLOR="1",
                     COLUMNS="200")
    return subprocess.run([exe, *args], capture_output=True, text=True, env=variables, input=stdin, timeout=120)


def ok(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def new_operator(env: Env, role: str) -> tuple[str, str]:
    """An account of ``role`` made with the CLI (password on stdin) and a token for it: (user name, token)."""
    username = f"{role}-{uuid.uuid4().hex[:6]}"
    ok(cli(env, "--json", "operators", "create", username, "--role", role, stdin=PASSWORD + "\n"))
    token = ok(cli(env, "--json", "tokens", "create", "cli tests", "--operator", username))["token"]
    return username, token


def test_operators_create_list_and_disable(env: Env, admin: Admin) -> None:
    username = f"op-{uuid.uuid4().hex[:6]}"
    created = cli(env, "operators", "create", username, "--role", "operator", stdin=PASSWORD + "\n")
    assert created.returncode == 0, created.stderr
    assert PASSWORD not in created.stdout + created.stderr
    listed = {o["username"]: o for o in admin.http.get("/api/operators").json()}
    assert listed[username]["role"] == "operator" and not listed[username]["disabled"]
    # The password read from stdin is the account's console password.
    login = httpx.post(f"{env.admin_url}/console/login", json={"username": username, "password": PASSWORD},
                       timeout=30)
    assert login.status_code == 200, login.text
    table = cli(env, "operators", "list")
    assert table.returncode == 0 and username in table.stdout and "operator" in table.stdout
    # No password on stdin: refused before anything is sent (the password is never an argument).
    nameless = f"nopw-{uuid.uuid4().hex[:6]}"
    refused = cli(env, "operators", "create", nameless)
    assert refused.returncode == 2 and "no password" in refused.stderr
    assert nameless not in {o["username"] for o in admin.http.get("/api/operators").json()}
    # Disabled: its token stops working.
    token = ok(cli(env, "--json", "tokens", "create", "laptop", "--operator", username))["token"]
    assert httpx.get(f"{env.admin_url}/api/devices", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert ok(cli(env, "--json", "operators", "disable", username))["disabled"] is True
    assert httpx.get(f"{env.admin_url}/api/devices", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert cli(env, "devices", "list", token=token).returncode == 4


def test_a_viewers_token_is_refused_for_create(env: Env, admin: Admin) -> None:
    _, token = new_operator(env, "viewer")
    assert cli(env, "profiles", "list", token=token).returncode == 0  # it reads
    wanted = f"by-viewer-{uuid.uuid4().hex[:6]}"
    refused = cli(env, "operators", "create", wanted, "--role", "admin", token=token, stdin=PASSWORD + "\n")
    assert refused.returncode == 5 and "403" in refused.stderr and "viewer" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert wanted not in {o["username"] for o in admin.http.get("/api/operators").json()}
    profile = admin.create_profile()
    device = admin.create_device(profile["id"])
    assert cli(env, "devices", "rotate", device["id"], token=token).returncode == 5
    assert admin.http.get(f"/api/devices/{device['id']}").json()["credentialsType"] == "ACCESS_TOKEN"


def test_a_token_is_shown_once_and_a_revoked_one_stops_working(env: Env, admin: Admin) -> None:
    username, token = new_operator(env, "operator")
    # Created with the operator's own token (default: their own tokens); the value goes to stdout alone.
    created = cli(env, "tokens", "create", "ci pipeline", token=token)
    assert created.returncode == 0, created.stderr
    second = created.stdout.strip()
    assert "shown once" in created.stderr and len(second) >= 40 and "\n" not in second
    bearer = {"Authorization": f"Bearer {second}"}
    assert httpx.get(f"{env.admin_url}/api/devices", headers=bearer).status_code == 200
    listed = cli(env, "tokens", "list", token=token)
    assert listed.returncode == 0 and "ci pipeline" in listed.stdout and second not in listed.stdout
    revoked = cli(env, "tokens", "revoke", "ci pipeline", token=token)
    assert revoked.returncode == 0, revoked.stderr
    assert httpx.get(f"{env.admin_url}/api/devices", headers=bearer).status_code == 401
    assert cli(env, "devices", "list", token=second).returncode == 4
    assert cli(env, "devices", "list", token=token).returncode == 0  # the other token lives on
    operators = admin.http.get("/api/operators").json()
    operator_id = next(o["id"] for o in operators if o["username"] == username)
    stored = {t["name"]: t for t in admin.http.get(f"/api/operators/{operator_id}/tokens").json()}
    assert stored["ci pipeline"]["revokedTime"] is not None and stored["cli tests"]["revokedTime"] is None
    missing = cli(env, "tokens", "revoke", "ci pipeline", token=token)  # revoked already: not a live one
    assert missing.returncode == 5 and "no live token" in missing.stderr


def test_devices_rotate_and_revoke(env: Env, admin: Admin, http: httpx.Client) -> None:
    _, token = new_operator(env, "operator")
    profile = admin.create_profile()
    device = admin.create_device(profile["id"])
    old = device["credentials"]["credentialsValue"]
    assert http.post(f"/api/v1/{old}/telemetry", json={"t": 1}).status_code == 200
    rotated = ok(cli(env, "--json", "devices", "rotate", device["id"], token=token))
    new = rotated["credentials"]["credentialsValue"]
    assert rotated["credentials"]["credentialsType"] == "ACCESS_TOKEN" and new != old
    assert http.post(f"/api/v1/{old}/telemetry", json={"t": 1}).status_code == 401
    assert http.post(f"/api/v1/{new}/telemetry", json={"t": 1}).status_code == 200
    # The table form prints the new credentials once, too.
    again = cli(env, "devices", "rotate", device["id"], token=token)
    assert again.returncode == 0 and "shown once" in again.stdout, again.stderr
    newest = json.loads(again.stdout.split("shown once): ", 1)[1].strip())
    assert http.post(f"/api/v1/{newest}/telemetry", json={"t": 1}).status_code == 200
    revoked = cli(env, "devices", "revoke", device["id"], token=token)
    assert revoked.returncode == 0 and device["name"] in revoked.stdout, revoked.stderr
    assert http.post(f"/api/v1/{newest}/telemetry", json={"t": 1}).status_code == 401
    assert admin.http.get(f"/api/devices/{device['id']}").json()["credentialsType"] is None
    unknown = cli(env, "devices", "rotate", str(uuid.uuid4()), token=token)
    assert unknown.returncode == 5 and "not found" in unknown.stderr
