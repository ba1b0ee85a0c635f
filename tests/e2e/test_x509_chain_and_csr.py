"""X.509 certificate-chain auto-provisioning over MQTT TLS (spec §8) and certificates issued from CSRs."""

from __future__ import annotations

import datetime
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from devstack import Stack

from tests.pki import Issued, csr_for, issue, write_client_files

from . import mqtt_clients as mc
from .conftest import Admin, Env, tb_request


@pytest.fixture(scope="module")
def pki() -> dict[str, Issued]:
    root = issue("Test Root CA", ca=True, days=3650)
    intermediate = issue("Test Intermediate CA", root, ca=True, days=3650)
    return {"root": root, "intermediate": intermediate}


@pytest.fixture
def chain_profile(admin: Admin, pki: dict[str, Issued]) -> dict[str, Any]:
    """A fresh CA per test (so profiles do not collide on the CA), with a device-name pattern."""
    root = issue(f"Fleet CA {uuid.uuid4().hex[:6]}", ca=True, days=3650)
    intermediate = issue("Fleet Intermediate", root, ca=True, days=3650)
    profile = admin.create_profile("X509_CERTIFICATE_CHAIN", certificatePem=root.pem,
                                   certificateRegExPattern=r"^(sensor-[0-9a-f]+)\.fleet$",
                                   allowCreateNewDevicesByX509Certificate=True)
    profile["_root"], profile["_intermediate"] = root, intermediate
    return profile


def _tls(env: Env, tmp_path: Path, leaf: Issued, *chain: Issued) -> mc.TlsOptions:
    cert_file, key_file = write_client_files(tmp_path, leaf, *chain)
    return mc.TlsOptions(str(env.ca_file), cert_file, key_file)


def _connect(env: Env, tls: mc.TlsOptions) -> int:
    """CONNACK result of a TLS connect presenting ``tls``'s chain: 0 accepted, else the refusal."""
    client = mc.connect(env.mqtts_port, tls=tls)
    try:
        return 0 if mc.accepted(client) else mc.refusal_value(client)
    finally:
        client.stop()


async def _devices_named(db: asyncpg.Connection, name: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT d.id, d.profile_id, c.credentials_type, c.credentials_id FROM devices d"
        " JOIN device_credentials c ON c.device_id = d.id WHERE d.name = $1", name)


# --- chain strategy -------------------------------------------------------------------------------


async def test_first_connect_provisions_then_reconnects_by_hash(
    env: Env, stack: Stack, chain_profile: dict, db: asyncpg.Connection, tmp_path: Path
) -> None:
    name = f"sensor-{uuid.uuid4().hex[:8]}"
    leaf = issue(f"{name}.fleet", chain_profile["_intermediate"])
    tls = _tls(env, tmp_path, leaf, chain_profile["_intermediate"])
    assert _connect(env, tls) == 0
    rows = await _devices_named(db, name)
    assert len(rows) == 1 and str(rows[0]["profile_id"]) == chain_profile["id"]
    assert rows[0]["credentials_type"] == "X509_CERTIFICATE"
    assert rows[0]["credentials_id"] == hashlib.sha3_256(leaf.body.encode()).hexdigest()
    assert _connect(env, tls) == 0  # next connects authenticate by the leaf's hash
    assert len(await _devices_named(db, name)) == 1


async def test_new_leaf_rotates_the_certificate(
    env: Env, stack: Stack, chain_profile: dict, db: asyncpg.Connection, tmp_path: Path
) -> None:
    name = f"sensor-{uuid.uuid4().hex[:8]}"
    old = issue(f"{name}.fleet", chain_profile["_intermediate"])
    new = issue(f"{name}.fleet", chain_profile["_intermediate"])
    assert _connect(env, _tls(env, tmp_path, old, chain_profile["_intermediate"])) == 0
    assert _connect(env, _tls(env, tmp_path, new, chain_profile["_intermediate"])) == 0
    rows = await _devices_named(db, name)
    assert len(rows) == 1 and rows[0]["credentials_id"] == hashlib.sha3_256(new.body.encode()).hexdigest()
    # The old leaf alone (no longer registered) still chains to the CA: it rotates back, as ThingsBoard does.
    assert _connect(env, _tls(env, tmp_path, old, chain_profile["_intermediate"])) == 0


@pytest.mark.parametrize("case", ["wrong_ca_same_name", "expired_leaf", "cn_mismatch", "no_intermediate"])
async def test_refusals_write_nothing(
    env: Env, stack: Stack, chain_profile: dict, db: asyncpg.Connection, tmp_path: Path, case: str
) -> None:
    name = f"sensor-{uuid.uuid4().hex[:8]}"
    intermediate: Issued = chain_profile["_intermediate"]
    chain: tuple[Issued, ...] = (intermediate,)
    if case == "wrong_ca_same_name":
        # Same subject names as the real CA and intermediate, other keys: the issuer lookup matches,
        # the signatures do not.
        fake_root = issue(chain_profile["_root"].cert.subject.rfc4514_string()[3:], ca=True)
        fake_inter = issue("Fleet Intermediate", fake_root, ca=True)
        leaf, chain = issue(f"{name}.fleet", fake_inter), (fake_inter,)
    elif case == "expired_leaf":
        leaf = issue(f"{name}.fleet", intermediate, days=-1,
                     not_before=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10))
    elif case == "cn_mismatch":
        leaf = issue(f"{name}.elsewhere", intermediate)
    else:
        leaf, chain = issue(f"{name}.fleet", intermediate), ()
    before = await db.fetchval("SELECT count(*) FROM devices")
    client = mc.connect(env.mqtts_port, tls=_tls(env, tmp_path, leaf, *chain))
    try:
        if case == "expired_leaf":  # refused at the TLS handshake (alert certificate_expired): no CONNACK at all
            assert client.reason_code is None and client.disconnected.is_set()
        else:
            assert not mc.accepted(client) and mc.refusal_value(client) == mc.NOT_AUTHORIZED
    finally:
        client.stop()
    assert await db.fetchval("SELECT count(*) FROM devices") == before


async def test_unknown_name_refused_when_creation_not_allowed(
    env: Env, stack: Stack, admin: Admin, db: asyncpg.Connection, tmp_path: Path
) -> None:
    root = issue(f"Closed CA {uuid.uuid4().hex[:6]}", ca=True)
    profile = admin.create_profile("X509_CERTIFICATE_CHAIN", certificatePem=root.pem,
                                   certificateRegExPattern="(.*)", allowCreateNewDevicesByX509Certificate=False)
    assert profile["allowCreateNewDevicesByX509Certificate"] is False
    name = f"closed-{uuid.uuid4().hex[:8]}"
    assert _connect(env, _tls(env, tmp_path, issue(name, root))) == mc.NOT_AUTHORIZED
    assert await _devices_named(db, name) == []
    # A pre-created device of that profile and name may connect (its certificate is rotated in).
    admin.create_device(profile["id"], name, credentials={"credentialsType": "X509_CERTIFICATE",
                                                          "credentialsValue": issue("placeholder").pem})
    assert _connect(env, _tls(env, tmp_path, issue(name, root))) == 0


def test_json_provision_against_a_chain_profile_is_not_found(http: httpx.Client, chain_profile: dict) -> None:
    response = http.post("/api/v1/provision", json={"provisionDeviceKey": chain_profile["provisionDeviceKey"],
                                                   "provisionDeviceSecret": "", "deviceName": "x"})
    assert response.json()["status"] == "NOT_FOUND"


def test_admin_validates_chain_profiles(admin: Admin, chain_profile: dict) -> None:
    def post(**fields: Any) -> httpx.Response:
        return admin.http.post("/api/device-profiles", json={"name": f"p-{uuid.uuid4().hex[:6]}",
                                                             "provisionStrategy": "X509_CERTIFICATE_CHAIN", **fields})
    ca = issue("Another CA", ca=True)
    assert post().status_code == 400
    assert "certificatePem" in post(certificatePem="not a pem").json()["message"]
    bad_regex = post(certificatePem=ca.pem, certificateRegExPattern="(unclosed")
    assert bad_regex.status_code == 400 and "regular expression" in bad_regex.json()["message"]
    assert "capture group" in post(certificatePem=ca.pem, certificateRegExPattern=".*").json()["message"]
    not_ca = post(certificatePem=issue("just a leaf").pem)
    assert not_ca.status_code == 400 and "not a CA" in not_ca.json()["message"]
    same_ca = post(certificatePem=chain_profile["_root"].pem)
    assert same_ca.status_code == 409
    assert same_ca.json()["message"] == "Device profile with such certificate already exists!"


# --- certificates from a CSR ----------------------------------------------------------------------


@pytest.fixture
def signing_profile(admin: Admin) -> dict[str, Any]:
    ca = issue(f"Issuing CA {uuid.uuid4().hex[:6]}", ca=True, days=3650)
    profile = admin.create_profile(signingCertificatePem=ca.pem, signingKeyPem=ca.key_pem,
                                   issuedCertificateValidityDays=30)
    profile["_ca"] = ca
    return profile


async def test_csr_over_http_then_tls_connect_with_the_issued_certificate(
    env: Env, stack: Stack, http: httpx.Client, signing_profile: dict, db: asyncpg.Connection, tmp_path: Path
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = f"csr-{uuid.uuid4().hex[:8]}"
    response = http.post("/api/v1/provision", json=tb_request(signing_profile, deviceName=name,
                                                              credentialsType="X509_CSR", csr=csr_for(key)))
    body = response.json()
    assert list(body) == ["credentialsValue", "credentialsType", "credentialsId", "caCertificates", "status"]
    assert body["status"] == "SUCCESS" and body["credentialsType"] == "X509_CERTIFICATE"
    cert = x509.load_pem_x509_certificate(body["credentialsValue"].encode())
    assert cert.subject.rfc4514_string() == f"CN={name}"
    assert cert.issuer == signing_profile["_ca"].cert.subject
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days in (30, 29)
    assert body["caCertificates"] == [signing_profile["_ca"].pem]
    issued = Issued(cert, key)
    assert body["credentialsId"] == hashlib.sha3_256(issued.body.encode()).hexdigest()
    assert (await _devices_named(db, name))[0]["credentials_id"] == body["credentialsId"]
    assert _connect(env, _tls(env, tmp_path, issued)) == 0


def test_csr_over_mqtt(env: Env, stack: Stack, signing_profile: dict) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    answer = mc.provision_json(env.mqtt_port, tb_request(signing_profile, credentialsType="X509_CSR",
                                                        csr=csr_for(key)))
    assert answer["status"] == "SUCCESS"
    assert x509.load_pem_x509_certificate(answer["credentialsValue"].encode()).public_key().public_numbers() == (
        key.public_key().public_numbers())


@pytest.mark.parametrize(("csr", "message"), [
    ("garbage", "csr is not a PEM certificate signing request"),
    (None, "X509_CSR requires a csr (PEM)"),
])
async def test_bad_csr_is_refused_and_nothing_written(
    http: httpx.Client, signing_profile: dict, db: asyncpg.Connection, csr: str | None, message: str
) -> None:
    fields = {"credentialsType": "X509_CSR", "deviceName": f"bad-{uuid.uuid4().hex[:6]}"}
    if csr is not None:
        fields["csr"] = csr
    before = await db.fetchval("SELECT count(*) FROM devices")
    body = http.post("/api/v1/provision", json=tb_request(signing_profile, **fields)).json()
    assert body == {"errorMsg": message, "status": "FAILURE"}
    assert await db.fetchval("SELECT count(*) FROM devices") == before


def test_csr_needs_a_signing_profile(http: httpx.Client, profile: dict) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    body = http.post("/api/v1/provision", json=tb_request(profile, credentialsType="X509_CSR",
                                                          csr=csr_for(key))).json()
    assert body == {"errorMsg": "This device profile does not issue certificates", "status": "FAILURE"}


async def test_signing_key_is_never_returned_and_stored_encrypted(
    admin: Admin, signing_profile: dict, db: asyncpg.Connection
) -> None:
    fetched = admin.http.get(f"/api/device-profiles/{signing_profile['id']}").json()
    assert "signingKeyPem" not in fetched and fetched["hasSigningKey"] is True
    assert "PRIVATE KEY" not in json.dumps(admin.http.get("/api/device-profiles", params={"pageSize": 1000}).json())
    stored = await db.fetchval("SELECT signing_key_enc FROM device_profiles WHERE id = $1",
                               uuid.UUID(signing_profile["id"]))
    assert stored and "PRIVATE KEY" not in stored
    # Updating other fields with the same CA keeps the stored key.
    updated = admin.http.put(f"/api/device-profiles/{signing_profile['id']}", json={
        "name": signing_profile["name"], "provisionStrategy": "ALLOW_CREATE_NEW_DEVICES",
        "provisionDeviceKey": signing_profile["provisionDeviceKey"],
        "provisionDeviceSecret": signing_profile["provisionDeviceSecret"],
        "signingCertificatePem": signing_profile["_ca"].pem})
    assert updated.status_code == 200 and updated.json()["hasSigningKey"] is True


def test_admin_validates_signing_pairs(admin: Admin) -> None:
    ca, other = issue("Signer", ca=True), issue("Other", ca=True)
    def post(**fields: Any) -> httpx.Response:
        return admin.http.post("/api/device-profiles", json={"name": f"s-{uuid.uuid4().hex[:6]}",
                                                             "provisionStrategy": "ALLOW_CREATE_NEW_DEVICES", **fields})
    mismatch = post(signingCertificatePem=ca.pem, signingKeyPem=other.key_pem)
    assert mismatch.status_code == 400
    assert mismatch.json()["message"] == "signingKeyPem does not match signingCertificatePem"
    assert post(signingCertificatePem=ca.pem).status_code == 400
    leaf = issue("leaf", ca)
    assert "not a CA" in post(signingCertificatePem=leaf.pem, signingKeyPem=leaf.key_pem).json()["message"]


def test_readme_example_client_runs(env: Env, stack: Stack, signing_profile: dict, tmp_path: Path) -> None:
    """examples/x509_csr_client.py, as the README shows it, against the real stack."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "examples" / "x509_csr_client.py"
    name = f"example-{uuid.uuid4().hex[:6]}"
    result = subprocess.run(
        [sys.executable, str(script), "--key", signing_profile["provisionDeviceKey"],
         "--secret", signing_profile["provisionDeviceSecret"], "--name", name, "--http", env.http_url,
         "--mqtts-port", str(env.mqtts_port), "--ca", str(env.ca_file), "--out", str(tmp_path / name)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"connected to mqtts://localhost:{env.mqtts_port} as {name}" in result.stdout
    assert (tmp_path / name / "device.key").stat().st_mode & 0o777 == 0o600
