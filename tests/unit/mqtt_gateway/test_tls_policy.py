"""The MQTT gateway's TLS policy (issue 13), checked with ``openssl s_client`` against a real listener on 127.0.0.1:
TLS 1.2 only with ECDHE + AEAD suites (a CBC or non-forward-secret suite is refused), and a client certificate
outside its validity period is refused at the handshake with a TLS alert that says so."""

from __future__ import annotations

import asyncio
import datetime
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mqtt_gateway.tls import Connection, make_server_context, start_tls_server
from provisioning_common.devcerts import generate_dev_certificate

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

HOST = "127.0.0.1"


@pytest.fixture
async def port(tmp_path: Path) -> AsyncIterator[int]:
    cert, key, _ = generate_dev_certificate(tmp_path)
    context = make_server_context(str(cert), str(key))

    async def connected(conn: Connection) -> None:
        conn.write(b"hello")  # something for s_client to read, then close
        await conn.drain()
        conn.close()

    server = await start_tls_server(connected, HOST, 0, context, handshake_timeout=5.0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def s_client(port: int, *args: str) -> tuple[bool, str]:
    """(whether the handshake completed, what s_client printed)."""
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"{HOST}:{port}", "-servername", "localhost", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    text = out.decode(errors="replace")
    return "Cipher is (NONE)" not in text and "New, " in text and "handshake failure" not in text, text


@pytest.mark.parametrize("cipher", ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"])
async def test_tls12_forward_secret_aead_suites_accepted(port: int, cipher: str) -> None:
    ok, text = await s_client(port, "-tls1_2", "-cipher", cipher)
    assert ok, text
    assert f"Cipher is {cipher}" in text


@pytest.mark.parametrize("cipher", [
    "ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "ECDHE-RSA-AES128-SHA",  # CBC
    "AES128-GCM-SHA256", "AES256-SHA", "DHE-RSA-AES128-GCM-SHA256",  # no ECDHE (static RSA, finite-field DH)
])
async def test_tls12_cbc_and_non_forward_secret_suites_refused(port: int, cipher: str) -> None:
    ok, text = await s_client(port, "-tls1_2", "-cipher", cipher)
    assert not ok, text


async def test_tls13_still_offered(port: int) -> None:
    ok, text = await s_client(port, "-tls1_3")
    assert ok and "TLSv1.3" in text, text


def _client_cert(directory: Path, not_before: datetime.datetime, not_after: datetime.datetime) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / f"c{not_after.year}.pem", directory / f"k{not_after.year}.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
@pytest.mark.parametrize(("offset_days", "alert"), [(-400, "certificate expired"), (400, "bad certificate")])
async def test_client_certificate_outside_its_validity_refused_at_handshake(
    port: int, tmp_path: Path, offset_days: int, alert: str, version: str
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    start = now + datetime.timedelta(days=offset_days)
    cert, key = _client_cert(tmp_path, start, start + datetime.timedelta(days=30))
    # TLS 1.3 sends the client's certificate after the server's Finished: the alert comes with the first read.
    ok, text = await s_client(port, version, "-ign_eof", "-cert", str(cert), "-key", str(key))
    assert f"alert {alert}" in text, text
    assert "hello" not in text.split("---")[-1], text  # the session never started


async def test_valid_client_certificate_accepted(port: int, tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    cert, key = _client_cert(tmp_path, now - datetime.timedelta(days=1), now + datetime.timedelta(days=30))
    ok, text = await s_client(port, "-cert", str(cert), "-key", str(key))
    assert ok and "alert" not in text, text
