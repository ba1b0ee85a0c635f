"""Input validation at the edge: every string field's limits in every dialect, and the malformed-request limiter.

Each field a dialect carries is tried with NUL, other control characters and one character too many;
the answer is a DialectError in the caller's dialect that names the field and never echoes the value.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from provisioning_common.dialects import DialectError, parse_provision_request
from provisioning_common.dialects.limits import (
    FIELD_LIMITS,
    MSG_TOO_MANY_FAILURES,
    Controls,
    MalformedRequestLimiter,
    field_problem,
)
from provisioning_common.models import CredentialsType, Dialect, ProvisionRequest, ProvisionResult, Transport
from provisioning_common.proto import transport_pb2 as pb
from provisioning_common.settings import Settings
from provisioning_common.transport_api import OutcomeKind, TransportApi

TB, INNO, PB = Dialect.THINGSBOARD, Dialect.INNOWAY, Dialect.PROTOBUF
#: Looks like a secret: must never appear in an error message.
MARK = "S3CR3T-mark"

# (wire name, FIELD_LIMITS key) of every string field each dialect carries.
TB_FIELDS = [
    ("provisionDeviceKey", "provision_key"), ("provisionDeviceSecret", "provision_secret"),
    ("deviceName", "device_name"), ("token", "token"), ("clientId", "client_id"), ("username", "username"),
    ("password", "password"), ("hash", "certificate"), ("csr", "csr"),
]
INNO_FIELDS = [
    ("provision_key", "provision_key"), ("provision_secret", "provision_secret"),
    ("device_name", "device_name"), ("device_key", "device_key"),
]
PB_FIELDS = [
    ("provisionDeviceKey", "provision_key"), ("provisionDeviceSecret", "provision_secret"),
    ("deviceName", "device_name"), ("token", "token"), ("clientId", "client_id"), ("userName", "username"),
    ("password", "password"), ("hash", "certificate"),
]


def tb_payload(field: str, value: str) -> bytes:
    obj: dict[str, Any] = {"provisionDeviceKey": "key", "provisionDeviceSecret": "secret", field: value}
    return json.dumps(obj).encode()


def inno_payload(field: str, value: str) -> bytes:
    obj: dict[str, Any] = {"provision_key": "key", "provision_secret": "secret", field: value}
    return json.dumps(obj).encode()


def pb_payload(field: str, value: str) -> bytes:
    msg = pb.ProvisionDeviceRequestMsg(credentialsType=pb.MQTT_BASIC)
    msg.provisionDeviceCredentialsMsg.provisionDeviceKey = "key"
    msg.provisionDeviceCredentialsMsg.provisionDeviceSecret = "secret"
    creds = msg.credentialsDataProto
    target = {
        "provisionDeviceKey": msg.provisionDeviceCredentialsMsg,
        "provisionDeviceSecret": msg.provisionDeviceCredentialsMsg,
        "deviceName": msg, "token": creds.validateDeviceTokenRequestMsg, "hash": creds.validateDeviceX509CertRequestMsg,
        "clientId": creds.validateBasicMqttCredRequestMsg, "userName": creds.validateBasicMqttCredRequestMsg,
        "password": creds.validateBasicMqttCredRequestMsg,
    }[field]
    setattr(target, field, value)
    return msg.SerializeToString()


CASES = (
    [(TB, wire, key, tb_payload) for wire, key in TB_FIELDS]
    + [(INNO, wire, key, inno_payload) for wire, key in INNO_FIELDS]
    + [(PB, wire, key, pb_payload) for wire, key in PB_FIELDS]
)
IDS = [f"{d.value}-{wire}" for d, wire, _, _ in CASES]


def parse(payload: bytes) -> ProvisionRequest:
    return parse_provision_request(payload, transport=Transport.MQTT, source_address="10.1.2.3", protobuf_fallback=True)


def refused(payload: bytes, dialect: Dialect, wire: str) -> str:
    with pytest.raises(DialectError) as info:
        parse(payload)
    assert info.value.dialect is dialect
    assert f"Field {wire} " in info.value.message
    assert MARK not in info.value.message and MARK not in str(info.value)
    return info.value.message


@pytest.mark.parametrize(("dialect", "wire", "key", "make"), CASES, ids=IDS)
def test_nul_inside_any_field_is_refused(dialect: Dialect, wire: str, key: str, make: Any) -> None:
    message = refused(make(wire, f"{MARK}\x00{MARK}"), dialect, wire)
    assert "NUL" in message or "control characters" in message


@pytest.mark.parametrize(("dialect", "wire", "key", "make"), CASES, ids=IDS)
@pytest.mark.parametrize("char", ["\x01", "\x08", "\x1b", "\x1f", "\x7f"], ids=["01", "08", "1b", "1f", "7f"])
def test_other_control_characters(dialect: Dialect, wire: str, key: str, make: Any, char: str) -> None:
    payload = make(wire, f"{MARK}{char}{MARK}")
    if FIELD_LIMITS[key].controls is Controls.NUL:
        parse(payload)  # device names: ThingsBoard accepts them (only 0x00 is refused)
    else:
        assert "control characters" in refused(payload, dialect, wire)


@pytest.mark.parametrize(("dialect", "wire", "key", "make"), CASES, ids=IDS)
@pytest.mark.parametrize("char", ["\t", "\n", "\r"], ids=["tab", "lf", "cr"])
def test_tab_and_newlines_only_in_names_and_pem(dialect: Dialect, wire: str, key: str, make: Any, char: str) -> None:
    payload = make(wire, f"{MARK}{char}{MARK}")
    if FIELD_LIMITS[key].controls is Controls.ALL:
        refused(payload, dialect, wire)
    else:
        parse(payload)


@pytest.mark.parametrize(("dialect", "wire", "key", "make"), CASES, ids=IDS)
def test_longest_value_accepted_one_more_refused(dialect: Dialect, wire: str, key: str, make: Any) -> None:
    limit = FIELD_LIMITS[key].max_chars
    parse(make(wire, "a" * limit))
    message = refused(make(wire, MARK + "a" * (limit + 1 - len(MARK))), dialect, wire)
    assert message == f"Field {wire} is longer than {limit} characters"


@pytest.mark.parametrize(("dialect", "wire", "key", "make"), CASES, ids=IDS)
def test_length_counts_characters_not_bytes(dialect: Dialect, wire: str, key: str, make: Any) -> None:
    limit = FIELD_LIMITS[key].max_chars
    parse(make(wire, "\U0001f600" * limit))  # 4 UTF-8 bytes each
    refused(make(wire, "\u00e9" * (limit + 1)), dialect, wire)


@pytest.mark.parametrize(("dialect", "wire", "key", "make"), CASES, ids=IDS)
def test_huge_value_is_refused_quickly(dialect: Dialect, wire: str, key: str, make: Any) -> None:
    refused(make(wire, MARK * 10_000), dialect, wire)


@pytest.mark.parametrize("make", [tb_payload, pb_payload], ids=["thingsboard", "protobuf"])
def test_device_name_is_measured_after_java_trim(make: Any) -> None:
    # ThingsBoard trims (chars <= U+0020, NUL included) before its 255 and 0x00 checks.
    assert parse(make("deviceName", " \t" + "n" * 255 + "\x00\n ")).device_name.strip(" \t\x00\n") == "n" * 255
    refused(make("deviceName", " " + "n" * 256 + " "), TB if make is tb_payload else PB, "deviceName")
    refused(make("deviceName", " a\x00b "), TB if make is tb_payload else PB, "deviceName")


def test_innoway_name_trim_and_nul() -> None:
    assert parse(inno_payload("device_name", "dev\x00")).device_name == "dev\x00"  # the core trims it
    refused(inno_payload("device_name", "de\x00v"), INNO, "device_name")


def test_first_bad_field_is_named_and_valid_requests_unchanged() -> None:
    raw = json.dumps({"provisionDeviceKey": "k\x00", "provisionDeviceSecret": "s", "deviceName": "d\x00"}).encode()
    refused(raw, TB, "provisionDeviceKey")
    ok = json.dumps({"provisionDeviceKey": "k", "provisionDeviceSecret": "s", "deviceName": "dev A",
                     "credentialsType": "X509_CERTIFICATE", "hash": "-----BEGIN CERTIFICATE-----\r\nMIIB\n\t"}).encode()
    req = parse(ok)
    assert req.device_name == "dev A" and req.credentials_type is CredentialsType.X509_CERTIFICATE


def test_field_problem_messages() -> None:
    assert field_problem("token", "ok") is None
    assert field_problem("token", "a\x00") == "contains control characters"
    assert field_problem("device_name", "a\x00b") == "contains a NUL character"
    assert field_problem("csr", "x" * 16385) == "is longer than 16384 characters"
    assert set(FIELD_LIMITS) == {"provision_key", "provision_secret", "device_name", "device_key", "token",
                                 "client_id", "username", "password", "certificate", "csr"}


# --------------------------------------------------------------------------------------------
# Malformed requests count against PROVISION_FAILURES_PER_MINUTE, per source
# --------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_blocks_a_source_after_the_limit_within_a_minute() -> None:
    clock = Clock()
    limiter = MalformedRequestLimiter(3, clock=clock)
    for _ in range(3):
        assert not limiter.blocked("a")
        limiter.record("a")
    assert limiter.blocked("a") and not limiter.blocked("b")
    clock.now += 60
    assert not limiter.blocked("a")


def test_limiter_ignores_unknown_sources_and_bounds_memory() -> None:
    limiter = MalformedRequestLimiter(1, clock=Clock(), max_sources=2)
    limiter.record("")
    assert not limiter.blocked("")
    for source in ("a", "b", "c"):
        limiter.record(source)
    assert limiter.blocked("a") and limiter.blocked("b") and not limiter.blocked("c")


class FakeBus:
    """Answers every provision with NOT_FOUND and counts the calls that reached it."""

    def __init__(self) -> None:
        self.calls = 0

    async def call(self, *_: Any, **__: Any) -> ProvisionResult:
        self.calls += 1
        return ProvisionResult.not_found()


async def test_transport_api_counts_malformed_requests_per_source() -> None:
    bus = FakeBus()
    api = TransportApi(bus, Settings(provision_failures_per_minute=3))  # type: ignore[arg-type]
    bad = b'{"provisionDeviceKey":"k","provisionDeviceSecret":"s","deviceName":"a\\u0000b"}'
    for _ in range(3):
        outcome = await api.provision(bad, transport=Transport.HTTP, source_address="10.0.0.1")
        assert outcome.kind is OutcomeKind.BAD_REQUEST
        assert json.loads(outcome.body) == {
            "errorMsg": "Field deviceName contains a NUL character", "status": "FAILURE"
        }
    blocked = await api.provision(bad, transport=Transport.HTTP, source_address="10.0.0.1")
    assert blocked.kind is OutcomeKind.ANSWERED
    assert blocked.body == b'{"errorMsg":"' + MSG_TOO_MANY_FAILURES.encode() + b'","status":"FAILURE"}'
    assert blocked.result is not None and blocked.result.error_message == MSG_TOO_MANY_FAILURES
    inno = await api.provision(b'{"provision_key":"k"}', transport=Transport.HTTP, source_address="10.0.0.1")
    assert inno.kind is OutcomeKind.ANSWERED and json.loads(inno.body) == {
        "status": "FAILURE", "error_msg": MSG_TOO_MANY_FAILURES}
    undecodable = await api.provision(b"\xff\xff", transport=Transport.COAP, source_address="10.0.0.1",
                                      protobuf_fallback=True)
    assert undecodable.kind is OutcomeKind.ANSWERED and undecodable.body == b"\x08\x03"
    other = await api.provision(bad, transport=Transport.HTTP, source_address="10.0.0.2")
    assert other.kind is OutcomeKind.BAD_REQUEST
    assert bus.calls == 0
    # Well-formed requests still go to the core, whose own limiter judges the secret.
    good = await api.provision(b'{"provisionDeviceKey":"k","provisionDeviceSecret":"s"}', transport=Transport.HTTP,
                               source_address="10.0.0.1")
    assert good.kind is OutcomeKind.ANSWERED and bus.calls == 1
