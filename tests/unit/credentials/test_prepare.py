"""prepare_credentials: ThingsBoard's credential rules for a new device (thingsboard-provisioning.md §5, §7)."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from credentials import hashing
from credentials.service import CredentialsRefused, CredentialsService, prepare_credentials
from provisioning_common.models import (
    CredentialsType,
    PrepareCredentialsRequest,
    PreparedCredentials,
    SuppliedCredentials,
)

from tests.unit.conftest import SelfSignedCert

AT = CredentialsType.ACCESS_TOKEN
MQTT = CredentialsType.MQTT_BASIC
X509 = CredentialsType.X509_CERTIFICATE


def request(ctype: CredentialsType = AT, token_length: int = 20, **supplied: str) -> PrepareCredentialsRequest:
    return PrepareCredentialsRequest(
        credentials_type=ctype, credentials=SuppliedCredentials(**supplied), token_length=token_length
    )


async def prepare(ctype: CredentialsType = AT, token_length: int = 20, **supplied: str) -> PreparedCredentials:
    return await prepare_credentials(request(ctype, token_length, **supplied))


def sha3(s: str) -> str:
    return hashlib.sha3_256(s.encode("utf-8")).hexdigest()


# --- generated access token ---------------------------------------------------------------------


@pytest.mark.parametrize("length", [20, 32])
async def test_no_fields_generates_access_token(length: int) -> None:
    prepared = await prepare(AT, token_length=length)
    assert prepared.credentials_type is AT
    token = prepared.response_value
    assert isinstance(token, str)
    assert len(token) == length
    assert re.fullmatch(r"[A-Za-z0-9]+", token)
    assert prepared.credentials_id == hashlib.sha256(token.encode()).hexdigest()
    assert prepared.credentials_id != token
    assert prepared.secret_hash is None


async def test_generated_tokens_differ() -> None:
    a, b = await prepare(), await prepare()
    assert a.response_value != b.response_value
    assert a.credentials_id != b.credentials_id


@pytest.mark.parametrize("ctype", [MQTT, X509, CredentialsType.LWM2M_CREDENTIALS])
async def test_type_without_any_field_falls_back_to_generated_access_token(ctype: CredentialsType) -> None:
    prepared = await prepare(ctype)
    assert prepared.credentials_type is AT
    assert isinstance(prepared.response_value, str) and len(prepared.response_value) == 20
    assert prepared.credentials_id == hashing.token_id(prepared.response_value)


# --- supplied access token ------------------------------------------------------------------------


async def test_supplied_access_token() -> None:
    prepared = await prepare(AT, token="my-own token/é")
    assert prepared.credentials_type is AT
    assert prepared.response_value == "my-own token/é"
    assert prepared.credentials_id == hashlib.sha256("my-own token/é".encode()).hexdigest()
    assert prepared.secret_hash is None


async def test_supplied_access_token_any_length() -> None:
    prepared = await prepare(AT, token="x")
    assert prepared.response_value == "x"


@pytest.mark.parametrize("token", ["bad\x00", "tab\tbed", "line\nbreak", "del\x7f", "\x1f"])
async def test_access_token_with_control_char_refused(token: str) -> None:
    with pytest.raises(CredentialsRefused):
        await prepare(AT, token=token)


@pytest.mark.parametrize("field", ["client_id", "username", "password", "certificate"])
async def test_access_token_type_with_other_fields_but_no_token_refused(field: str) -> None:
    # ThingsBoard: credentialsType defaults to ACCESS_TOKEN, so e.g. a lone clientId means an empty token.
    with pytest.raises(CredentialsRefused):
        await prepare(AT, **{field: "value"})


# --- MQTT_BASIC -----------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [{"password": "p"}, {"token": "t"}, {"certificate": "c"}])
async def test_mqtt_both_ids_empty_refused(extra: dict[str, str]) -> None:
    with pytest.raises(CredentialsRefused) as info:
        await prepare(MQTT, **extra)
    assert str(info.value) == "Both mqtt client id and user name are empty!"


async def test_mqtt_client_id_with_password_without_username_refused() -> None:
    with pytest.raises(CredentialsRefused) as info:
        await prepare(MQTT, client_id="c", password="p")
    assert str(info.value) == "Password cannot be specified along with client id"


async def test_mqtt_client_id_only() -> None:
    prepared = await prepare(MQTT, client_id="dev-client")
    assert prepared.credentials_type is MQTT
    assert prepared.credentials_id == sha3("dev-client")
    assert prepared.secret_hash is None
    assert list(prepared.response_value.items()) == [("clientId", "dev-client"), ("userName", ""), ("password", "")]


async def test_mqtt_username_only() -> None:
    prepared = await prepare(MQTT, username="dev-user")
    assert prepared.credentials_id == "dev-user"
    assert prepared.secret_hash is None
    assert list(prepared.response_value.items()) == [("clientId", ""), ("userName", "dev-user"), ("password", "")]


async def test_mqtt_username_and_password() -> None:
    prepared = await prepare(MQTT, username="dev-user", password="pw-1")
    assert prepared.credentials_id == "dev-user"
    assert list(prepared.response_value.items()) == [("clientId", ""), ("userName", "dev-user"), ("password", "pw-1")]
    assert prepared.secret_hash is not None
    assert "pw-1" not in prepared.secret_hash
    assert hashing.verify_password("pw-1", prepared.secret_hash)
    assert not hashing.verify_password("pw-2", prepared.secret_hash)


async def test_mqtt_all_three() -> None:
    prepared = await prepare(MQTT, client_id="c", username="u", password="p")
    assert prepared.credentials_id == sha3("c|u")
    assert list(prepared.response_value.items()) == [("clientId", "c"), ("userName", "u"), ("password", "p")]
    assert prepared.secret_hash is not None
    assert hashing.verify_password("p", prepared.secret_hash)
    assert not hashing.verify_password("", prepared.secret_hash)


async def test_mqtt_client_id_and_username_without_password() -> None:
    prepared = await prepare(MQTT, client_id="c", username="u")
    assert prepared.credentials_id == sha3("c|u")
    assert prepared.secret_hash is None
    assert list(prepared.response_value) == ["clientId", "userName", "password"]
    assert prepared.response_value["password"] == ""


async def test_mqtt_ignores_token_field() -> None:
    prepared = await prepare(MQTT, username="u", token="t")
    assert prepared.credentials_type is MQTT
    assert prepared.credentials_id == "u"


@pytest.mark.parametrize(
    "supplied",
    [{"client_id": "c\x00"}, {"username": "u\n"}, {"username": "u", "password": "p\x7f"},
     {"client_id": "c", "username": "u\t"}],
)
async def test_mqtt_control_chars_refused(supplied: dict[str, str]) -> None:
    with pytest.raises(CredentialsRefused):
        await prepare(MQTT, **supplied)


# --- X509_CERTIFICATE --------------------------------------------------------------------------------


async def test_x509_pem(self_signed_cert: SelfSignedCert) -> None:
    prepared = await prepare(X509, certificate=self_signed_cert.pem)
    assert prepared.credentials_type is X509
    assert prepared.response_value == self_signed_cert.b64
    assert "\n" not in prepared.response_value and "-----" not in prepared.response_value
    assert prepared.credentials_id == hashing.tb_sha3(self_signed_cert.b64)
    assert prepared.credentials_id == sha3(self_signed_cert.b64)
    # The id equals what the MQTT transport computes from a TLS client certificate (b64 of DER).
    assert prepared.credentials_id == sha3(base64.b64encode(self_signed_cert.der).decode())
    assert prepared.secret_hash is None


async def test_x509_bare_base64(self_signed_cert: SelfSignedCert) -> None:
    prepared = await prepare(X509, certificate=self_signed_cert.b64)
    assert prepared.response_value == self_signed_cert.b64
    assert prepared.credentials_id == sha3(self_signed_cert.b64)


@pytest.mark.parametrize("bad", ["testHash", "MIIB", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"])
async def test_x509_invalid_refused(bad: str) -> None:
    with pytest.raises(CredentialsRefused, match="X.509"):
        await prepare(X509, certificate=bad)


async def test_x509_type_with_only_token_refused() -> None:
    with pytest.raises(CredentialsRefused):
        await prepare(X509, token="tok")


async def test_x509_invalid_version_refused(self_signed_cert: SelfSignedCert) -> None:
    der = self_signed_cert.der
    at = der.index(bytes.fromhex("a003020102"))
    bad = base64.b64encode(der[: at + 4] + b"\x05" + der[at + 5:]).decode()
    with pytest.raises(CredentialsRefused):
        await prepare(X509, certificate=bad)


# --- other types and the RPC wrapper ------------------------------------------------------------------


async def test_lwm2m_with_fields_refused() -> None:
    with pytest.raises(CredentialsRefused, match="LWM2M_CREDENTIALS"):
        await prepare(CredentialsType.LWM2M_CREDENTIALS, token="t")


async def test_service_prepare_wraps_refusal() -> None:
    service = CredentialsService(pool=None)  # type: ignore[arg-type]  # prepare never touches the pool
    result = await service.prepare(request(MQTT, password="p"))
    assert result.ok is False
    assert result.prepared is None
    assert result.error_message == "Both mqtt client id and user name are empty!"


async def test_service_prepare_wraps_success() -> None:
    service = CredentialsService(pool=None)  # type: ignore[arg-type]
    result = await service.prepare(request(AT, token="abc"))
    assert result.ok is True
    assert result.prepared is not None
    assert result.prepared.credentials_id == hashlib.sha256(b"abc").hexdigest()
