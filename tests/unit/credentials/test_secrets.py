"""Issue 13, secrets: device-chosen token minimum, and uniform work for MQTT password logins.

The uniform-time check compares the code path, not the clock: every login that presents a password runs
exactly one scrypt verification with the same cost parameters, whether or not its user exists
(bench/mqtt_password_timing.py prints the times).
"""

from __future__ import annotations

import datetime
import json
import uuid
from typing import Any

import pytest
from credentials import hashing
from credentials.service import CredentialsRefused, CredentialsService, prepare_credentials
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from provisioning_common import passwords
from provisioning_common.models import (
    AuthenticateRequest,
    CredentialsType,
    PrepareCredentialsRequest,
    SuppliedCredentials,
)

AT = CredentialsType.ACCESS_TOKEN


def token_request(token: str, *, enforce: bool) -> PrepareCredentialsRequest:
    return PrepareCredentialsRequest(credentials_type=AT, credentials=SuppliedCredentials(token=token),
                                     enforce_token_minimum=enforce)


@pytest.mark.parametrize("token", ["x", "short-token-15ch", "sixteen chars!!!", "a/b" * 10, "é" * 20, "%41" * 8])
async def test_device_chosen_weak_token_refused_with_the_reason(token: str) -> None:
    if token == "short-token-15ch":
        token = token[:15]
    with pytest.raises(CredentialsRefused) as refused:
        await prepare_credentials(token_request(token, enforce=True))
    assert str(refused.value) == hashing.MSG_WEAK_TOKEN
    assert token not in str(refused.value)


@pytest.mark.parametrize("token", ["A" * 16, "device-01.token_~x", "zD8zxMrMaRVnhZhiGEVuRw2jid3oW721"])
async def test_device_chosen_token_meeting_the_minimum_accepted(token: str) -> None:
    prepared = await prepare_credentials(token_request(token, enforce=True))
    assert prepared.response_value == token and prepared.credentials_id == hashing.token_id(token)


async def test_weak_token_accepted_when_the_profile_allows_it() -> None:
    # enforce_token_minimum=False: the profile has allowWeakTokens, or an operator set the token (admin API).
    prepared = await prepare_credentials(token_request("x", enforce=False))
    assert prepared.response_value == "x"


# --- uniform work for MQTT_BASIC passwords ------------------------------------------------------------


class _Pool:
    """credentials_by_id's one query: a stored row by credentials id."""

    def __init__(self, rows: dict[str, dict[str, Any]]) -> None:
        self.rows = rows

    async def fetchrow(self, sql: str, credentials_id: str) -> dict[str, Any] | None:
        return self.rows.get(credentials_id)


@pytest.fixture(scope="module")
def stored_hash() -> str:
    return hashing.hash_password("the-password")


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every scrypt verification run: (password, the cost parameters of the hash it was checked against)."""
    calls: list[tuple[str, str]] = []
    real = passwords.verify_password

    def counted(password: str, stored: str) -> bool:
        calls.append((password, "$".join(stored.split("$")[:4])))
        return real(password, stored)

    monkeypatch.setattr(passwords, "verify_password", counted)
    return calls


def service(stored_hash: str) -> CredentialsService:
    row = {"device_id": uuid.uuid4(), "device_name": "dev", "credentials_type": "MQTT_BASIC",
           "secret_hash": stored_hash, "public_value": json.dumps({"clientId": "", "userName": "known"})}
    return CredentialsService(_Pool({"known": row}))  # type: ignore[arg-type]


@pytest.mark.parametrize(("username", "password", "accepted"), [
    ("known", "the-password", True),
    ("known", "wrong-password", False),
    ("unknown", "any-password", False),
    ("unknown-with-client", "any-password", False),
])
async def test_every_password_login_costs_one_hash_of_the_same_cost(
    stored_hash: str, verifications: list[tuple[str, str]], username: str, password: str, accepted: bool
) -> None:
    client_id = "client" if username.endswith("client") else ""
    result = await service(stored_hash).authenticate(
        AuthenticateRequest(client_id=client_id, username=username, password=password))
    assert result.authenticated is accepted
    cost = "$".join(stored_hash.split("$")[:4])
    assert verifications == [(password, cost)]


async def test_dummy_hash_matches_nothing_and_is_made_once() -> None:
    assert hashing.verify_or_burn("", None) is False
    assert hashing.dummy_hash() is hashing.dummy_hash()
    assert hashing.dummy_hash().startswith("scrypt$")


async def test_login_without_password_costs_no_hash(stored_hash: str, verifications: list[tuple[str, str]]) -> None:
    result = await service(stored_hash).authenticate(AuthenticateRequest(client_id="c", username="unknown"))
    assert not result.authenticated and verifications == []


# --- certificate validity at provisioning ---------------------------------------------------------------


def _pem(not_before: datetime.datetime, not_after: datetime.datetime) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(("offset_days", "reason"), [(-400, "X.509 certificate has expired (not valid after "),
                                                     (400, "X.509 certificate is not yet valid (not valid before ")])
async def test_certificate_outside_its_validity_refused_at_provisioning(offset_days: int, reason: str) -> None:
    start = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=offset_days)
    pem = _pem(start, start + datetime.timedelta(days=30))
    request = PrepareCredentialsRequest(credentials_type=CredentialsType.X509_CERTIFICATE,
                                        credentials=SuppliedCredentials(certificate=pem))
    with pytest.raises(CredentialsRefused) as refused:
        await prepare_credentials(request)
    assert str(refused.value).startswith(reason)


async def test_innoway_token_as_password_costs_no_hash(verifications: list[tuple[str, str]]) -> None:
    """Any user name with a device's token as password (Innoway): MQTT_BASIC misses, the token rule will
    succeed, so no dummy hash is paid."""
    token = "innoway-token-0123456789abcdef"
    row = {"device_id": uuid.uuid4(), "device_name": "dev", "credentials_type": "ACCESS_TOKEN",
           "secret_hash": None, "public_value": None}
    service = CredentialsService(_Pool({hashing.token_id(token): row}))  # type: ignore[arg-type]
    result = await service.authenticate(AuthenticateRequest(client_id="c", username="any", password=token))
    assert not result.authenticated and verifications == []  # MQTT_BASIC denies; device_auth then asks the token
