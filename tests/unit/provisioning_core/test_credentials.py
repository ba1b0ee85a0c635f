"""Credentials in the provisioning rules: where a new device's credentials come from, and how a refusal
of them is answered.

Spec ``shared/spec/thingsboard-provisioning.md`` §5 (a new device first gets a random 20-char token; only
if any of ``token``, ``hash``, ``username``, ``password``, ``clientId`` is non-empty are credentials written
with ``credentialsType``; any credentials error -> FAILURE ``"Failed to provision device!"``), §2 (what
SUCCESS answers per type), §6 (a claim answers the stored credentials), §8.4 (a chain's leaf becomes the
X509_CERTIFICATE credentials) and "Our deviations" (an X509_CERTIFICATE value that does not parse is
FAILURE with a reason); ``shared/spec/innoway-provisioning.md`` (32-character tokens).
How the credentials service validates and hashes supplied credentials is tested in
``tests/unit/credentials``; here only the rules' side of it.
"""

from __future__ import annotations

import uuid

import pytest
from credentials.service import CredentialsRefused, prepare_credentials
from provisioning_common.db.repository import ProfileRow
from provisioning_common.models import (
    MSG_FAILURE,
    CredentialsType,
    Dialect,
    PrepareCredentialsRequest,
    PreparedCredentials,
    ProvisionStatus,
    ProvisionStrategy,
    SuppliedCredentials,
    VerifyChainResult,
)
from provisioning_core import rules
from provisioning_core.rules import CredentialsSource, Refusal

from .factories import device, profile, request

AT, MQTT, X509 = CredentialsType.ACCESS_TOKEN, CredentialsType.MQTT_BASIC, CredentialsType.X509_CERTIFICATE
CSR = CredentialsType.X509_CSR


# --- where the credentials come from (§5) ----------------------------------------------------------


@pytest.mark.parametrize("ctype", [AT, MQTT, X509, CredentialsType.LWM2M_CREDENTIALS])
def test_no_credential_field_means_a_generated_token_whatever_the_type(ctype: CredentialsType) -> None:
    assert rules.credentials_source(request(credentials_type=ctype)) is CredentialsSource.GENERATED_TOKEN


@pytest.mark.parametrize("field", ["token", "client_id", "username", "password", "certificate"])
@pytest.mark.parametrize("ctype", [AT, MQTT, X509, CredentialsType.LWM2M_CREDENTIALS])
def test_any_credential_field_means_supplied_credentials_of_the_type(field: str, ctype: CredentialsType) -> None:
    req = request(credentials_type=ctype, credentials=SuppliedCredentials(**{field: "v"}))
    assert rules.credentials_source(req) is CredentialsSource.SUPPLIED


def test_a_csr_request_is_issued_a_certificate_with_or_without_its_csr() -> None:
    assert rules.credentials_source(request(credentials_type=CSR)) is CredentialsSource.ISSUED_FROM_CSR
    with_csr = request(credentials_type=CSR, credentials=SuppliedCredentials(csr="-----BEGIN CERTIFICATE REQUEST"))
    assert rules.credentials_source(with_csr) is CredentialsSource.ISSUED_FROM_CSR


@pytest.mark.parametrize(
    ("dialect", "length"), [(Dialect.THINGSBOARD, 20), (Dialect.PROTOBUF, 20), (Dialect.INNOWAY, 32)]
)
def test_generated_token_length_per_dialect(dialect: Dialect, length: int) -> None:
    assert rules.token_length(dialect) == length


# --- a refusal of supplied credentials (§5, deviations) ---------------------------------------------------


async def _refusal_of(ctype: CredentialsType, **supplied: str) -> str:
    """The credentials service's own reason for refusing these credentials."""
    req = PrepareCredentialsRequest(credentials_type=ctype, credentials=SuppliedCredentials(**supplied))
    with pytest.raises(CredentialsRefused) as refused:
        await prepare_credentials(req)
    return str(refused.value)


@pytest.mark.parametrize(
    ("ctype", "supplied"),
    [
        (AT, {"client_id": "only-client"}),  # no credentialsType: an empty token
        (AT, {"token": "tab\tinside"}),
        (MQTT, {"password": "p"}),  # "Both mqtt client id and user name are empty!"
        (MQTT, {"client_id": "c", "password": "p"}),  # "Password cannot be specified along with client id"
        (MQTT, {"username": "u\x7f"}),
        (CredentialsType.LWM2M_CREDENTIALS, {"token": "t"}),
    ],
)
async def test_refused_credentials_are_thingsboards_generic_failure(
    ctype: CredentialsType, supplied: dict[str, str]
) -> None:
    reason = await _refusal_of(ctype, **supplied)
    assert rules.prepare_failure(reason) == Refusal(ProvisionStatus.FAILURE, MSG_FAILURE)
    assert rules.prepare_failure(reason).result().error_message == "Failed to provision device!"


@pytest.mark.parametrize(
    "supplied",
    [{"certificate": "testHash"}, {"certificate": "MIIB"},
     {"certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"},
     {"token": "no-hash-at-all"}],
)
async def test_a_certificate_that_does_not_parse_is_failure_with_its_reason(supplied: dict[str, str]) -> None:
    # ThingsBoard stores any string (MqttProvisionJsonDeviceTest stores "testHash"); we say why we do not.
    reason = await _refusal_of(X509, **supplied)
    assert reason == "X509_CERTIFICATE value is not a valid X.509 certificate (PEM or base64 DER)"
    assert rules.prepare_failure(reason) == Refusal(ProvisionStatus.FAILURE, reason)


@pytest.mark.parametrize("reason", [None, "", "Device credentials are already assigned to another device!"])
def test_no_reason_or_another_reason_is_the_generic_failure(reason: str | None) -> None:
    assert rules.prepare_failure(reason) == rules.failure()


# --- certificates issued from a CSR (ours) ---------------------------------------------------------------


def _signing(**fields: object) -> ProfileRow:
    values: dict[str, object] = {"signing_certificate_pem": "-----BEGIN CERTIFICATE-----", "signing_key_enc": "enc",
                                 **fields}
    return profile(ProvisionStrategy.ALLOW_CREATE_NEW_DEVICES, **values)


def test_a_profile_with_a_signing_ca_and_a_csr_may_issue() -> None:
    req = request(credentials_type=CSR, credentials=SuppliedCredentials(csr="csr"))
    assert rules.issue_refusal(req, _signing()) is None


@pytest.mark.parametrize("missing", [{"signing_certificate_pem": None}, {"signing_key_enc": None},
                                     {"signing_certificate_pem": ""}])
def test_a_profile_without_a_signing_ca_does_not_issue(missing: dict[str, object]) -> None:
    req = request(credentials_type=CSR, credentials=SuppliedCredentials(csr="csr"))
    expected = Refusal(ProvisionStatus.FAILURE, "This device profile does not issue certificates")
    assert rules.issue_refusal(req, _signing(**missing)) == expected


def test_the_signing_ca_is_checked_before_the_csr() -> None:
    no_csr = request(credentials_type=CSR)
    assert rules.issue_refusal(no_csr, _signing()) == Refusal(
        ProvisionStatus.FAILURE, "X509_CSR requires a csr (PEM)")
    assert rules.issue_refusal(no_csr, _signing(signing_key_enc=None)) == Refusal(
        ProvisionStatus.FAILURE, "This device profile does not issue certificates")


@pytest.mark.parametrize(("reason", "message"), [("CSR signature is invalid", "CSR signature is invalid"),
                                                 (None, MSG_FAILURE), ("", MSG_FAILURE)])
def test_a_refused_issuance_tells_its_reason(reason: str | None, message: str) -> None:
    assert rules.issue_failure(reason) == Refusal(ProvisionStatus.FAILURE, message)


# --- what SUCCESS carries (§2, §6, §8.4) ---------------------------------------------------------------


DEVICE_ID = uuid.uuid4()


@pytest.mark.parametrize(
    "prepared",
    [
        PreparedCredentials(credentials_type=AT, credentials_id="sha256", response_value="Aq1bZ7xjQw9iLmNoPq3r"),
        PreparedCredentials(credentials_type=MQTT, credentials_id="u", secret_hash="scrypt$",
                            response_value={"clientId": "", "userName": "u", "password": "p"}),
        PreparedCredentials(credentials_type=X509, credentials_id="sha3", response_value="MIIB"),
    ],
)
def test_a_created_device_answers_the_credentials_it_was_given(prepared: PreparedCredentials) -> None:
    result = rules.created_result(DEVICE_ID, "dev", prepared)
    assert result.status is ProvisionStatus.SUCCESS
    assert (result.device_id, result.device_name) == (str(DEVICE_ID), "dev")
    assert result.credentials_type is prepared.credentials_type
    assert result.credentials_value == prepared.response_value
    assert result.credentials_id == prepared.credentials_id
    assert result.ca_certificates is None and result.error_message is None


def test_an_issued_certificate_carries_its_ca_chain() -> None:
    prepared = PreparedCredentials(credentials_type=X509, credentials_id="sha3", response_value="-----BEGIN")
    result = rules.created_result(DEVICE_ID, "dev", prepared, ["ca-pem"])
    assert result.ca_certificates == ["ca-pem"]


@pytest.mark.parametrize("ctype", ["ACCESS_TOKEN", "MQTT_BASIC", "X509_CERTIFICATE", "LWM2M_CREDENTIALS"])
def test_a_claim_answers_the_stored_type_and_value(ctype: str) -> None:
    owner = profile(ProvisionStrategy.CHECK_PRE_PROVISIONED_DEVICES)
    stored = device(owner, credentials_type=ctype, credentials_id="stored-id")
    result = rules.claimed_result(stored, "dev", "stored-value")
    assert result.credentials_type is CredentialsType(ctype)
    assert (result.credentials_value, result.credentials_id) == ("stored-value", "stored-id")


def test_a_chain_leaf_is_the_devices_x509_credentials() -> None:
    identity = rules.verified_identity(VerifyChainResult(
        ok=True, profile_id=str(uuid.uuid4()), leaf_common_name="s1", leaf_body="MIIBleaf", leaf_credentials_id="h"))
    assert isinstance(identity, rules.X509Identity)
    assert identity.credentials == PreparedCredentials(credentials_type=X509, credentials_id="h",
                                                       response_value="MIIBleaf")
    result = rules.x509_result(DEVICE_ID, "s1", identity.credentials)
    assert (result.credentials_type, result.credentials_value, result.credentials_id) == (X509, "MIIBleaf", "h")
