"""Unit-test fixtures: nothing here touches the network, a database or RabbitMQ."""

from __future__ import annotations

import base64
import datetime
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class SelfSignedCert:
    der: bytes
    #: PEM text as the cryptography library writes it (markers, 64-column lines, trailing newline).
    pem: str
    #: Standard base64 of the DER with no line breaks: what ThingsBoard stores and answers.
    b64: str


@pytest.fixture(scope="session")
def self_signed_cert() -> SelfSignedCert:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unit-test-device")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
    return SelfSignedCert(der=der, pem=pem, b64=base64.b64encode(der).decode("ascii"))
