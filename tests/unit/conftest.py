"""Unit-test fixtures: nothing here touches the network, a database or RabbitMQ."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import pytest

from tests.pki import issue


@dataclass(frozen=True)
class SelfSignedCert:
    der: bytes
    #: PEM text as the cryptography library writes it (markers, 64-column lines, trailing newline).
    pem: str
    #: Standard base64 of the DER with no line breaks: what ThingsBoard stores and answers.
    b64: str


@pytest.fixture(scope="session")
def self_signed_cert() -> SelfSignedCert:
    device = issue("unit-test-device")
    return SelfSignedCert(der=device.der, pem=device.pem, b64=base64.b64encode(device.der).decode("ascii"))
