"""Statuses and messages: every refusal the rules give, and its exact bytes in each dialect.

Spec ``shared/spec/thingsboard-provisioning.md`` §2 (response JSON, keys in this exact order: NOT_FOUND
``{"errorMsg":"Provision data was not found!","status":"NOT_FOUND"}``, FAILURE
``{"errorMsg":"Failed to provision device!","status":"FAILURE"}``, SUCCESS per credentials type), §3.4
(protobuf: failures carry only the status, ``08 02`` / ``08 03``; SUCCESS ACCESS_TOKEN omits field 2),
§10 (``ProvisionResponseStatus``) and "Our deviations" (our FAILURE reasons); ``shared/spec/innoway-provisioning.md``
"Response" (``{"status": ..., "error_msg": ...}`` with the same messages; SUCCESS ``device_id``, ``status``, ``token``).
"""

from __future__ import annotations

import uuid

import pytest
from provisioning_common.dialects import render_result
from provisioning_common.models import (
    MSG_FAILURE,
    MSG_NOT_FOUND,
    CredentialsType,
    Dialect,
    PreparedCredentials,
    ProvisionResult,
    ProvisionStatus,
    ProvisionStrategy,
)
from provisioning_core import rules
from provisioning_core.rules import Refusal

from .factories import device, profile, request

TB_NOT_FOUND = b'{"errorMsg":"Provision data was not found!","status":"NOT_FOUND"}'
TB_FAILURE = b'{"errorMsg":"Failed to provision device!","status":"FAILURE"}'
INNOWAY_NOT_FOUND = b'{"status":"NOT_FOUND","error_msg":"Provision data was not found!"}'
INNOWAY_FAILURE = b'{"status":"FAILURE","error_msg":"Failed to provision device!"}'


def test_the_statuses_are_thingsboards() -> None:
    # ProvisionResponseStatus minus UNKNOWN, which the server never emits (§2, §10).
    assert [s.value for s in ProvisionStatus] == ["SUCCESS", "NOT_FOUND", "FAILURE"]


def test_the_two_fixed_messages() -> None:
    assert MSG_NOT_FOUND == rules.MSG_NOT_FOUND == "Provision data was not found!"
    assert MSG_FAILURE == rules.MSG_FAILURE == "Failed to provision device!"


def test_our_failure_reasons() -> None:
    assert rules.MSG_TOO_MANY_FAILURES == "Too many failed provisioning attempts; retry later"
    assert rules.MSG_CN_MISMATCH == "Certificate CN does not match the device profile's pattern"
    assert rules.MSG_NO_SIGNING_CA == "This device profile does not issue certificates"
    assert rules.MSG_CSR_REQUIRED == "X509_CSR requires a csr (PEM)"


def test_refusals_become_results_with_status_and_message_only() -> None:
    assert rules.not_found().result() == ProvisionResult.not_found()
    assert rules.not_found().result() == ProvisionResult(status=ProvisionStatus.NOT_FOUND, error_message=MSG_NOT_FOUND)
    assert rules.failure().result() == ProvisionResult(status=ProvisionStatus.FAILURE, error_message=MSG_FAILURE)
    assert rules.failure("why").result() == ProvisionResult(status=ProvisionStatus.FAILURE, error_message="why")


# --- each rule's refusal: status and message ------------------------------------------------------------


ALLOW = ProvisionStrategy.ALLOW_CREATE_NEW_DEVICES
CHECK = ProvisionStrategy.CHECK_PRE_PROVISIONED_DEVICES
CHAIN = ProvisionStrategy.X509_CERTIFICATE_CHAIN


def _refusals() -> list[tuple[str, object, ProvisionStatus, str]]:
    owner = profile(CHECK)
    chain = profile(CHAIN, certificate_regex=r"^(s\d)$", allow_create_by_x509=False)
    return [
        ("blank name", rules.check_request(request(device_name="  ")),
         ProvisionStatus.FAILURE, MSG_FAILURE),
        ("empty key", rules.check_request(request(provision_key="")),
         ProvisionStatus.NOT_FOUND, MSG_NOT_FOUND),
        ("empty secret", rules.check_request(request(provision_secret="")),
         ProvisionStatus.NOT_FOUND, MSG_NOT_FOUND),
        ("unknown key", rules.decide_strategy(request(), None, "d"), ProvisionStatus.NOT_FOUND, MSG_NOT_FOUND),
        ("wrong secret", rules.decide_strategy(request(provision_secret="x"), profile(ALLOW), "d"),
         ProvisionStatus.NOT_FOUND, MSG_NOT_FOUND),
        ("disabled", rules.decide_strategy(request(), profile(ProvisionStrategy.DISABLED), "d"),
         ProvisionStatus.NOT_FOUND, MSG_NOT_FOUND),
        ("json against chain", rules.decide_strategy(request(), profile(CHAIN), "d"),
         ProvisionStatus.NOT_FOUND, MSG_NOT_FOUND),
        ("pre-provisioned without name", rules.decide_strategy(request(), owner, ""),
         ProvisionStatus.FAILURE, MSG_FAILURE),
        ("name too long", rules.decide_strategy(request(), profile(ALLOW), "n" * 256),
         ProvisionStatus.FAILURE, MSG_FAILURE),
        ("claim absent", rules.decide_claim(owner, None), ProvisionStatus.FAILURE, MSG_FAILURE),
        ("claim foreign", rules.decide_claim(owner, device(profile(CHECK))), ProvisionStatus.FAILURE, MSG_FAILURE),
        ("claim twice", rules.decide_claim(owner, device(owner, provision_state="provisioned")),
         ProvisionStatus.FAILURE, MSG_FAILURE),
        ("chain to another strategy", rules.x509_target(profile(ALLOW), "s1"), ProvisionStatus.FAILURE, MSG_FAILURE),
        ("cn mismatch", rules.x509_target(chain, "xx"), ProvisionStatus.FAILURE,
         "Certificate CN does not match the device profile's pattern"),
        ("chain creation off", rules.decide_x509_device(chain, "s1", None), ProvisionStatus.FAILURE, MSG_FAILURE),
        ("no signing CA", rules.issue_refusal(request(), profile(ALLOW)), ProvisionStatus.FAILURE,
         "This device profile does not issue certificates"),
        ("mqtt refused", rules.prepare_failure("Both mqtt client id and user name are empty!"),
         ProvisionStatus.FAILURE, MSG_FAILURE),
    ]


@pytest.mark.parametrize(("case", "decision", "status", "message"), _refusals(), ids=[r[0] for r in _refusals()])
def test_each_refusal_has_its_status_and_message(
    case: str, decision: object, status: ProvisionStatus, message: str
) -> None:
    assert isinstance(decision, Refusal), case
    assert (decision.status, decision.message) == (status, message)


# --- on the wire: ThingsBoard JSON, Innoway JSON, protobuf ------------------------------------------------


@pytest.mark.parametrize(
    ("refusal", "thingsboard", "innoway", "protobuf"),
    [
        (rules.not_found(), TB_NOT_FOUND, INNOWAY_NOT_FOUND, b"\x08\x02"),
        (rules.failure(), TB_FAILURE, INNOWAY_FAILURE, b"\x08\x03"),
        (rules.failure(rules.MSG_TOO_MANY_FAILURES),
         b'{"errorMsg":"Too many failed provisioning attempts; retry later","status":"FAILURE"}',
         b'{"status":"FAILURE","error_msg":"Too many failed provisioning attempts; retry later"}',
         b"\x08\x03"),
    ],
)
def test_refusals_on_the_wire(refusal: Refusal, thingsboard: bytes, innoway: bytes, protobuf: bytes) -> None:
    result = refusal.result()
    assert render_result(Dialect.THINGSBOARD, result) == thingsboard
    assert render_result(Dialect.INNOWAY, result) == innoway
    assert render_result(Dialect.PROTOBUF, result) == protobuf


DEVICE_ID = uuid.UUID("bb56e5d7-96bc-4339-8780-6ebb67e5ac44")


def _created(ctype: CredentialsType, value: str | dict[str, str], credentials_id: str = "id") -> ProvisionResult:
    prepared = PreparedCredentials(credentials_type=ctype, credentials_id=credentials_id, response_value=value)
    return rules.created_result(DEVICE_ID, "dev", prepared)


def test_success_access_token_on_the_wire() -> None:
    result = _created(CredentialsType.ACCESS_TOKEN, "Aq1bZ7xjQw9iLmNoPq3r")
    assert render_result(Dialect.THINGSBOARD, result) == (
        b'{"credentialsValue":"Aq1bZ7xjQw9iLmNoPq3r","credentialsType":"ACCESS_TOKEN","status":"SUCCESS"}'
    )
    # Protobuf: field 2 (ACCESS_TOKEN = 0) omitted: 08 01 1a <len> <token>.
    assert render_result(Dialect.PROTOBUF, result) == b"\x08\x01\x1a\x14Aq1bZ7xjQw9iLmNoPq3r"


def test_success_innoway_on_the_wire() -> None:
    result = _created(CredentialsType.ACCESS_TOKEN, "zD8zxMrMaRVnhZhiGEVuRw2jid3oW721")
    assert render_result(Dialect.INNOWAY, result) == (
        b'{"device_id":"bb56e5d7-96bc-4339-8780-6ebb67e5ac44","status":"SUCCESS",'
        b'"token":"zD8zxMrMaRVnhZhiGEVuRw2jid3oW721"}'
    )


def test_success_mqtt_basic_is_a_nested_object() -> None:
    result = _created(CredentialsType.MQTT_BASIC, {"clientId": "c", "userName": "u", "password": "p"})
    assert render_result(Dialect.THINGSBOARD, result) == (
        b'{"credentialsValue":{"clientId":"c","userName":"u","password":"p"},'
        b'"credentialsType":"MQTT_BASIC","status":"SUCCESS"}'
    )


def test_success_x509_is_the_certificate_body() -> None:
    result = rules.x509_result(DEVICE_ID, "sensor-1", PreparedCredentials(
        credentials_type=CredentialsType.X509_CERTIFICATE, credentials_id="f" * 64, response_value="MIIBody"))
    assert result.status is ProvisionStatus.SUCCESS and result.error_message is None
    assert render_result(Dialect.THINGSBOARD, result) == (
        b'{"credentialsValue":"MIIBody","credentialsType":"X509_CERTIFICATE","status":"SUCCESS"}'
    )


def test_success_claimed_lwm2m_has_no_value() -> None:
    owner = profile(CHECK)
    result = rules.claimed_result(device(owner, credentials_type="LWM2M_CREDENTIALS"), "dev", None)
    assert render_result(Dialect.THINGSBOARD, result) == b'{"credentialsType":"LWM2M_CREDENTIALS","status":"SUCCESS"}'
