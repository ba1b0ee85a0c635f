"""Bulk import of pre-provisioned devices (issue 16): a 10,000-row CSV with a few bad rows through the admin
API and through the installed ``provisioning`` console script, the devices provisioning themselves with the
imported credentials over HTTP and MQTT, re-upload, all-or-nothing, and a kill -9 of the admin API mid-import."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from devstack import Stack

from tests.e2e import mqtt_clients
from tests.e2e.conftest import Admin, Env, tb_request

ROWS = 10_000
FAILURE = {"errorMsg": "Failed to provision device!", "status": "FAILURE"}
HEADER = ["Name", "Type", "Device key", "Access token", "MQTT client id", "MQTT user name", "MQTT password",
          "Certificate"]


def make_csv(prefix: str, rows: int = ROWS, *, bad: bool = True, mqtt: bool = True
             ) -> tuple[str, dict[int, str], dict[str, Any]]:
    """A spreadsheet's CSV (UTF-8 BOM, ``;`` delimiter, CRLF, quoted fields): ``rows`` devices, most with an
    access token, every 500th with MQTT basic credentials, every 700th with none (a token is generated).
    With ``bad``, six rows break a rule. Returns (text, {bad line: field}, {name: credentials}); the bad rows'
    lines are also in BAD_LINES by row index."""
    out = io.StringIO()
    writer = csv.writer(out, delimiter=";", lineterminator="\r\n")
    writer.writerow(HEADER)
    bad_lines: dict[int, str] = {}
    good: dict[str, Any] = {}
    first_token = f"{prefix}-tok-00000-abcdefgh"
    for i in range(rows):
        line = out.getvalue().count("\n") + 1  # where the record starts (a quoted PEM spans lines)
        name = f"{prefix}-{i:05d}"
        token = f"{prefix}-tok-{i:05d}-abcdefgh"
        row = [name, "sensor", "", token, "", "", "", ""]
        credentials: Any = token
        if mqtt and i % 500 == 1:
            row[3] = ""
            row[4:7] = [f"{prefix}-c{i}", f"{prefix}-u{i}", f"pw-{i}"]
            credentials = {"clientId": f"{prefix}-c{i}", "userName": f"{prefix}-u{i}", "password": f"pw-{i}"}
        elif i % 700 == 3:
            row[3] = ""
            credentials = None
        if bad and i in BAD_ROWS:
            field, row = BAD_ROWS[i](row, prefix, first_token)
            bad_lines[line] = field
            BAD_LINES[i] = line
        else:
            good[name] = credentials
        writer.writerow(row)
    return "\ufeff" + out.getvalue(), bad_lines, good


def _empty_name(row: list[str], *_: str) -> tuple[str, list[str]]:
    return "name", ["  ", *row[1:]]


def _duplicate_name(row: list[str], prefix: str, _: str) -> tuple[str, list[str]]:
    return "name", [f"{prefix}-00010", *row[1:]]


def _bad_pem(row: list[str], *_: str) -> tuple[str, list[str]]:
    pem = "-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----"
    return "x509", [*row[:3], "", "", "", "", pem]


def _too_long(row: list[str], *_: str) -> tuple[str, list[str]]:
    return "name", ["n" * 256, *row[1:]]


def _two_kinds(row: list[str], prefix: str, _: str) -> tuple[str, list[str]]:
    return "credentials", [*row[:4], f"{prefix}-both", "", "", ""]


def _token_reused(row: list[str], prefix: str, first_token: str) -> tuple[str, list[str]]:
    return "accessToken", [*row[:3], first_token, "", "", "", ""]


BAD_LINES: dict[int, int] = {}
BAD_ROWS = {17: _empty_name, 2024: _duplicate_name, 4321: _bad_pem, 6000: _too_long, 7777: _two_kinds,
            9998: _token_reused}


def upload(admin: Admin, profile_id: str, body: str | bytes, content_type: str = "text/csv",
           **params: str) -> str:
    response = admin.http.post("/api/devices/import", params={"deviceProfileId": profile_id, **params},
                               content=body, headers={"Content-Type": content_type})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def wait_job(admin: Admin, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = admin.http.get(f"/api/devices/import/{job_id}").json()
        if job["status"] != "running":
            return dict(job)
        time.sleep(0.1)
    raise AssertionError(f"import {job_id} still running after {timeout}s")


def count_devices(admin: Admin, profile_id: str) -> int:
    response = admin.http.get("/api/devices", params={"deviceProfileId": profile_id, "pageSize": 1})
    return int(response.json()["totalElements"])


@pytest.fixture(scope="module")
def big(admin: Admin) -> dict[str, Any]:
    """The 10,000-row CSV imported once through the API into a CHECK_PRE_PROVISIONED_DEVICES profile."""
    profile = admin.create_profile("CHECK_PRE_PROVISIONED_DEVICES")
    prefix = f"bulk{uuid.uuid4().hex[:6]}"
    text, bad_lines, good = make_csv(prefix)
    started = time.monotonic()
    job = wait_job(admin, upload(admin, profile["id"], text.encode()))
    return {"profile": profile, "prefix": prefix, "text": text, "bad": bad_lines, "good": good, "job": job,
            "seconds": time.monotonic() - started}


def test_import_reports_exactly_the_bad_lines(big: dict[str, Any], admin: Admin) -> None:
    job = big["job"]
    assert job["status"] == "done", job
    assert (job["total"], job["processed"]) == (ROWS, ROWS)
    assert (job["created"], job["updated"], job["skipped"], job["rejected"]) == (ROWS - 6, 0, 0, 6)
    assert {e["line"]: e["field"] for e in job["errors"]} == big["bad"]
    reasons = {e["line"]: e["reason"] for e in job["errors"]}
    assert BAD_LINES[17] == 19 and BAD_LINES[6000] == 6004  # the PEM on line 4323 spans three lines
    assert reasons[BAD_LINES[17]] == "must not be blank"
    assert reasons[BAD_LINES[2024]] == "duplicate name in the file (line 12)"
    assert "not a valid X.509 certificate" in reasons[BAD_LINES[4321]]
    assert "255" in reasons[BAD_LINES[6000]]
    assert "more than one kind of credentials" in reasons[BAD_LINES[7777]]
    assert reasons[BAD_LINES[9998]] == "duplicate credentials in the file (line 2)"
    assert not job["errorsTruncated"]
    assert count_devices(admin, big["profile"]["id"]) == ROWS - 6


def test_imported_devices_provision_with_their_credentials_over_http_and_mqtt(
    big: dict[str, Any], admin: Admin, http: httpx.Client, env: Env
) -> None:
    profile, good = big["profile"], big["good"]
    names = sorted(good)
    mqtt_basic = [n for n in names if isinstance(good[n], dict)][:5]
    minted = [n for n in names if good[n] is None][:3]
    tokens = [n for n in names if isinstance(good[n], str)][::700][:12]
    sample = mqtt_basic + minted + tokens
    assert len(sample) == 20
    for index, name in enumerate(sample):
        request = tb_request(profile, deviceName=name)
        if index % 2:
            answer = mqtt_clients.provision_json(env.mqtt_port, request)
        else:
            answer = http.post("/api/v1/provision", content=json.dumps(request)).json()
        assert answer["status"] == "SUCCESS", (name, answer)
        expected = good[name]
        if expected is None:  # generated at import time
            assert answer["credentialsType"] == "ACCESS_TOKEN" and len(answer["credentialsValue"]) == 20
        else:
            assert answer["credentialsValue"] == expected
            assert answer["credentialsType"] == ("MQTT_BASIC" if isinstance(expected, dict) else "ACCESS_TOKEN")
    # An imported MQTT basic device connects with its credentials; a token device sends telemetry.
    creds = good[mqtt_basic[0]]
    client = mqtt_clients.connect(env.mqtt_port, client_id=creds["clientId"], username=creds["userName"],
                                  password=creds["password"])
    try:
        assert mqtt_clients.accepted(client), client.reason_code
    finally:
        client.stop()
    assert http.post(f"/api/v1/{good[tokens[0]]}/telemetry", json={"t": 1}).status_code == 200
    # Names that were not imported (never listed, or on a rejected line) are refused.
    for name in (f"{big['prefix']}-not-listed", "n" * 200, f"{big['prefix']}-04321"):
        request = tb_request(profile, deviceName=name)
        assert http.post("/api/v1/provision", content=json.dumps(request)).json() == FAILURE
    assert mqtt_clients.provision_json(env.mqtt_port, tb_request(profile, deviceName=f"{big['prefix']}-07777")) \
        == FAILURE


def test_reupload_creates_nothing_and_update_mode_updates(big: dict[str, Any], admin: Admin) -> None:
    profile_id = big["profile"]["id"]
    job = wait_job(admin, upload(admin, profile_id, big["text"].encode()))
    assert job["status"] == "done"
    assert (job["created"], job["updated"], job["skipped"], job["rejected"]) == (0, 0, ROWS - 6, 6)
    assert {e["line"] for e in job["errors"]} == set(big["bad"])
    assert count_devices(admin, profile_id) == ROWS - 6
    # update mode, as JSON lines: a device's key and token replaced, not duplicated.
    name = f"{big['prefix']}-00042"
    line = json.dumps({"name": name, "deviceKey": "serial-42", "accessToken": f"{big['prefix']}-new-token-42xx"})
    job = wait_job(admin, upload(admin, profile_id, line + "\n", "application/x-ndjson", onExisting="update"))
    assert (job["status"], job["created"], job["updated"], job["rejected"]) == ("done", 0, 1, 0), job
    found = admin.http.get("/api/devices", params={"deviceProfileId": profile_id, "textSearch": name}).json()
    assert [d["deviceKey"] for d in found["data"]] == ["serial-42"]
    assert count_devices(admin, profile_id) == ROWS - 6


def test_atomic_import_writes_nothing_when_one_row_is_bad(admin: Admin) -> None:
    profile = admin.create_profile("CHECK_PRE_PROVISIONED_DEVICES")
    prefix = f"atom{uuid.uuid4().hex[:6]}"
    rows = [{"name": f"{prefix}-{i}", "accessToken": f"{prefix}-token-{i:04d}"} for i in range(1200)]
    rows[1100]["name"] = ""
    body = "".join(json.dumps(r) + "\n" for r in rows)
    job = wait_job(admin, upload(admin, profile["id"], body, "application/x-ndjson", atomic="true"))
    assert (job["status"], job["processed"], job["rejected"], job["created"]) == ("failed", 1200, 1, 0), job
    assert [e["line"] for e in job["errors"]] == [1101]
    assert "nothing was written" in job["message"]
    assert count_devices(admin, profile["id"]) == 0
    # The same file without the bad row: everything at once.
    del rows[1100]
    body = "".join(json.dumps(r) + "\n" for r in rows)
    job = wait_job(admin, upload(admin, profile["id"], body, "application/x-ndjson", atomic="true"))
    assert (job["status"], job["created"]) == ("done", 1199), job
    assert count_devices(admin, profile["id"]) == 1199


def test_bad_files_are_refused_before_any_job(admin: Admin, big: dict[str, Any]) -> None:
    profile_id = big["profile"]["id"]
    cases = [
        ("text/csv", b"name,colour\nx,red\n", {}, "column 2 ('colour') is not a known field"),
        ("text/csv", b"label\nx\n", {}, "no column is mapped to name"),
        ("text/csv", b"name\n\xff\xfe\n", {}, "not UTF-8"),
        ("text/csv", b"a,b\nx,\"y\n", {"columns": "name,accessToken"}, "line"),
        ("application/json", b"{}", {}, "text/csv or application/x-ndjson"),
    ]
    for content_type, body, params, message in cases:
        response = admin.http.post("/api/devices/import", params={"deviceProfileId": profile_id, **params},
                                   content=body, headers={"Content-Type": content_type})
        assert response.status_code in (400, 415), (body, response.text)
        assert message in response.json()["message"], response.text
    response = admin.http.post("/api/devices/import", params={"deviceProfileId": str(uuid.uuid4())},
                               content=b"name\nx\n", headers={"Content-Type": "text/csv"})
    assert response.status_code == 400
    assert admin.http.get(f"/api/devices/import/{uuid.uuid4()}").status_code == 404


def test_export_lists_the_profile_without_secrets(big: dict[str, Any], admin: Admin) -> None:
    profile_id = big["profile"]["id"]
    response = admin.http.get("/api/devices/export", params={"deviceProfileId": profile_id})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert len(rows) == ROWS - 6
    by_name = {r["name"]: r for r in rows}
    provisioned = [r for r in rows if r["provisionState"] == "provisioned"]
    assert len(provisioned) >= 20 and all(r["provisionedTime"] for r in provisioned)
    assert by_name[f"{big['prefix']}-00001"]["credentialsType"] == "MQTT_BASIC"
    assert "abcdefgh" not in response.text and "pw-1" not in response.text


# --- the console script against the running stack -------------------------------------------------


def cli(env: Env, *args: str, token: str | None = None, url: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("provisioning", path=str(Path(sys.executable).parent))
    assert exe, "the provisioning console script is not installed (make install)"
    variables = {**os.environ, "PROVISIONING_URL": url or env.admin_url, "ADMIN_API_TOKEN": token or env.admin_token,
                 "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([exe, *args], capture_output=True, text=True, env=variables, timeout=120)


def test_cli_imports_the_csv_and_reports_the_bad_lines(admin: Admin, env: Env, tmp_path: Path) -> None:
    created = cli(env, "profiles", "create", f"cli-{uuid.uuid4().hex[:6]}", "--strategy",
                  "CHECK_PRE_PROVISIONED_DEVICES", "--json")
    assert created.returncode == 0, created.stderr
    profile = json.loads(created.stdout)
    assert profile["provisionDeviceKey"] and profile["provisionDeviceSecret"]
    prefix = f"cli{uuid.uuid4().hex[:6]}"
    text, bad_lines, _ = make_csv(prefix)
    path = tmp_path / "production.csv"
    path.write_text(text, encoding="utf-8", newline="")
    result = cli(env, "devices", "import", str(path), "--profile", profile["name"])
    assert result.returncode == 6, (result.stdout, result.stderr)  # some rows rejected
    for line in bad_lines:
        assert f"\n{line} " in result.stdout or f" {line} " in result.stdout, result.stdout
    assert f"created {ROWS - 6}" in result.stdout
    # --json, on a few rows: one already imported (skipped), one new, one rejected.
    few = tmp_path / "few.ndjson"
    few.write_text("\n".join(json.dumps(r) for r in ({"name": f"{prefix}-00000"}, {"name": f"{prefix}-extra"},
                                                      {"name": "x" * 300})) + "\n")
    again = cli(env, "devices", "import", str(few), "--profile", profile["name"], "--json")
    assert again.returncode == 6, again.stderr
    report = json.loads(again.stdout)
    assert (report["created"], report["skipped"], report["rejected"]) == (1, 1, 1)
    assert [(e["line"], e["field"]) for e in report["errors"]] == [(3, "name")]
    listed = cli(env, "devices", "list", "--profile", profile["name"], "--search", f"{prefix}-0001", "--json")
    assert listed.returncode == 0
    assert sorted(d["name"] for d in json.loads(listed.stdout)["data"])[:2] == [f"{prefix}-00010", f"{prefix}-00011"]
    exported = cli(env, "devices", "export", "--profile", profile["name"], "-o", str(tmp_path / "out.csv"))
    assert exported.returncode == 0, exported.stderr
    assert len((tmp_path / "out.csv").read_text().splitlines()) == ROWS - 6 + 1 + 1


def test_cli_lists_profiles_and_says_what_is_wrong_in_one_line(admin: Admin, env: Env) -> None:
    profile = admin.create_profile("CHECK_PRE_PROVISIONED_DEVICES")
    listed = cli(env, "profiles", "list")
    assert listed.returncode == 0 and profile["name"] in listed.stdout
    shown = cli(env, "profiles", "show", profile["name"], "--json")
    assert json.loads(shown.stdout)["id"] == profile["id"]
    refused = cli(env, "profiles", "list", token="wrong-token")
    assert refused.returncode == 4 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "token" in refused.stderr.lower()
    down = cli(env, "profiles", "list", url="http://127.0.0.1:9")
    assert down.returncode == 3 and len(down.stderr.strip().splitlines()) == 1, down.stderr
    assert "cannot reach" in down.stderr
    missing = cli(env, "profiles", "show", "no-such-profile")
    assert missing.returncode == 5 and "no-such-profile" in missing.stderr


def test_cli_manages_profiles_and_devices(env: Env, http: httpx.Client) -> None:
    name = f"cli-crud-{uuid.uuid4().hex[:6]}"
    assert cli(env, "profiles", "create", name, "--json").returncode == 0
    renamed = cli(env, "--json", "profiles", "update", name, "--name", f"{name}-b", "--secret", "s3cret-value-1")
    assert renamed.returncode == 0, renamed.stderr
    profile = json.loads(renamed.stdout)
    assert (profile["name"], profile["provisionDeviceSecret"]) == (f"{name}-b", "s3cret-value-1")
    created = cli(env, "devices", "create", "cli-dev-1", "--profile", profile["id"], "--token",
                  "cli-token-0123456789", "--json")
    assert created.returncode == 0, created.stderr
    device = json.loads(created.stdout)
    assert device["credentials"]["credentialsValue"] == "cli-token-0123456789"
    answer = http.post("/api/v1/provision", content=json.dumps(tb_request(profile, deviceName="cli-dev-1"))).json()
    assert answer["credentialsValue"] == "cli-token-0123456789"
    shown = json.loads(cli(env, "devices", "show", device["id"], "--json").stdout)
    assert shown["provisionState"] == "provisioned"
    in_use = cli(env, "profiles", "delete", profile["id"])
    assert in_use.returncode == 5 and "409" in in_use.stderr
    assert cli(env, "devices", "delete", device["id"]).returncode == 0
    assert cli(env, "profiles", "delete", f"{name}-b").returncode == 0
    assert cli(env, "profiles", "show", profile["id"]).returncode == 5
    usage = cli(env, "devices", "create", "x", "--profile", name, "--token", "t", "--client-id", "c")
    assert usage.returncode == 2


# --- kill -9 of the admin API mid-import: runs last (it restarts the admin process) ---------------


async def test_zz_kill_9_mid_import_leaves_no_half_written_device(admin: Admin, env: Env, stack: Stack) -> None:
    profile = admin.create_profile("CHECK_PRE_PROVISIONED_DEVICES")
    prefix = f"kill{uuid.uuid4().hex[:6]}"
    rows = 12_000
    text, _, _ = make_csv(prefix, rows, bad=False, mqtt=False)
    job_id = upload(admin, profile["id"], text.encode())
    deadline = time.monotonic() + 30
    while True:  # a few batches are in, the import is still running
        job = admin.http.get(f"/api/devices/import/{job_id}").json()
        assert job["status"] == "running", job
        if job["processed"] >= 1000:
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    stack["admin_api"].signal(signal.SIGKILL)
    assert stack["admin_api"].proc is not None
    stack["admin_api"].proc.wait(10)
    stack["admin_api"].start()
    stack["admin_api"].wait_ready(30)
    job = admin.http.get(f"/api/devices/import/{job_id}").json()
    assert job["status"] == "failed" and "stopped" in job["message"], job
    conn = await asyncpg.connect(env.database_url)
    try:
        devices = await conn.fetchval("SELECT count(*) FROM devices WHERE profile_id = $1", uuid.UUID(profile["id"]))
        bare = await conn.fetchval(
            "SELECT count(*) FROM devices d LEFT JOIN device_credentials c ON c.device_id = d.id"
            " WHERE d.profile_id = $1 AND c.device_id IS NULL", uuid.UUID(profile["id"]))
    finally:
        await conn.close()
    assert 1000 <= devices < rows and devices % 500 == 0, devices  # whole batches only
    assert bare == 0
    # Uploading the file again finishes the job: what was written is skipped.
    job = wait_job(admin, upload(admin, profile["id"], text.encode()), timeout=120)
    assert (job["status"], job["created"], job["skipped"]) == ("done", rows - devices, devices), job
