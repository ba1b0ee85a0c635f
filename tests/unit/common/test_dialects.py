"""Wire dialects: request parsing and response rendering.

See thingsboard-provisioning.md §1-§2 and innoway-provisioning.md.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from provisioning_common.dialects import (
    EXTRA_MAX_BYTES,
    EXTRA_MAX_DEPTH,
    DialectError,
    detect_dialect,
    parse_provision_request,
    render_error,
    render_result,
)
from provisioning_common.models import (
    MSG_FAILURE,
    MSG_NOT_FOUND,
    CredentialsType,
    Dialect,
    ProvisionRequest,
    ProvisionResult,
    ProvisionStatus,
    Transport,
)

TB = Dialect.THINGSBOARD
INNO = Dialect.INNOWAY


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode("utf-8")


def tb_body(**extra: object) -> bytes:
    return body(provisionDeviceKey="key-1", provisionDeviceSecret="secret-1", **extra)


def parse(raw: bytes, transport: Transport = Transport.HTTP, source: str = "") -> ProvisionRequest:
    return parse_provision_request(raw, transport=transport, source_address=source)


def success(ctype: CredentialsType, value: object) -> ProvisionResult:
    return ProvisionResult(
        status=ProvisionStatus.SUCCESS,
        device_id="7d4e7a34-51c1-4a3b-9a62-6d1a6a1c0b11",
        device_name="dev",
        credentials_type=ctype,
        credentials_value=value,
        credentials_id="should-never-be-rendered",
    )


# --------------------------------------------------------------------------------------------
# ThingsBoard rendering: exact bytes and key order (spec §2)
# --------------------------------------------------------------------------------------------


class TestThingsBoardRender:
    def test_success_access_token(self) -> None:
        out = render_result(TB, success(CredentialsType.ACCESS_TOKEN, "A1b2C3d4E5f6G7h8I9j0"))
        assert out == b'{"credentialsValue":"A1b2C3d4E5f6G7h8I9j0","credentialsType":"ACCESS_TOKEN","status":"SUCCESS"}'

    def test_success_mqtt_basic_is_nested_object_in_field_order(self) -> None:
        value = {"clientId": "c", "userName": "u", "password": "p"}
        out = render_result(TB, success(CredentialsType.MQTT_BASIC, value))
        assert out == (
            b'{"credentialsValue":{"clientId":"c","userName":"u","password":"p"},'
            b'"credentialsType":"MQTT_BASIC","status":"SUCCESS"}'
        )

    def test_success_mqtt_basic_with_empty_parts_keeps_all_keys(self) -> None:
        value = {"clientId": "", "userName": "u", "password": ""}
        out = render_result(TB, success(CredentialsType.MQTT_BASIC, value))
        assert out == (
            b'{"credentialsValue":{"clientId":"","userName":"u","password":""},'
            b'"credentialsType":"MQTT_BASIC","status":"SUCCESS"}'
        )

    def test_success_x509(self) -> None:
        out = render_result(TB, success(CredentialsType.X509_CERTIFICATE, "MIIBCjCBsaADAgECAgEB+/=="))
        assert out == (
            b'{"credentialsValue":"MIIBCjCBsaADAgECAgEB+/==","credentialsType":"X509_CERTIFICATE","status":"SUCCESS"}'
        )

    def test_success_lwm2m_without_value_omits_credentials_value(self) -> None:
        out = render_result(TB, success(CredentialsType.LWM2M_CREDENTIALS, None))
        assert out == b'{"credentialsType":"LWM2M_CREDENTIALS","status":"SUCCESS"}'

    def test_not_found(self) -> None:
        out = render_result(TB, ProvisionResult.not_found())
        assert out == b'{"errorMsg":"Provision data was not found!","status":"NOT_FOUND"}'

    def test_failure(self) -> None:
        out = render_result(TB, ProvisionResult.failure())
        assert out == b'{"errorMsg":"Failed to provision device!","status":"FAILURE"}'

    def test_failure_never_carries_credentials(self) -> None:
        result = ProvisionResult(
            status=ProvisionStatus.FAILURE,
            error_message=MSG_FAILURE,
            credentials_type=CredentialsType.ACCESS_TOKEN,
            credentials_value="leaked-token",
            device_id="d",
        )
        assert render_result(TB, result) == b'{"errorMsg":"Failed to provision device!","status":"FAILURE"}'

    def test_render_error_is_failure_with_message(self) -> None:
        assert render_error(TB, "Request body must be a JSON object") == (
            b'{"errorMsg":"Request body must be a JSON object","status":"FAILURE"}'
        )

    def test_u2028_and_u2029_are_escaped(self) -> None:
        out = render_result(TB, success(CredentialsType.ACCESS_TOKEN, "a\u2028b\u2029c"))
        assert b'"credentialsValue":"a\\u2028b\\u2029c"' in out
        assert "\u2028".encode() not in out and "\u2029".encode() not in out

    def test_non_ascii_is_raw_utf8(self) -> None:
        out = render_result(TB, success(CredentialsType.ACCESS_TOKEN, "héllo-日本"))
        assert out == (
            '{"credentialsValue":"héllo-日本","credentialsType":"ACCESS_TOKEN","status":"SUCCESS"}'.encode()
        )
        assert b"\\u" not in out

    def test_slash_and_html_characters_not_escaped(self) -> None:
        out = render_result(TB, success(CredentialsType.X509_CERTIFICATE, "a/b<c>d&e='f'"))
        assert b'"credentialsValue":"a/b<c>d&e=\'f\'"' in out

    def test_control_characters_use_lowercase_hex(self) -> None:
        out = render_result(TB, success(CredentialsType.ACCESS_TOKEN, "x\x1by\x01"))
        assert b'"credentialsValue":"x\\u001by\\u0001"' in out

    def test_output_is_compact(self) -> None:
        out = render_result(TB, ProvisionResult.not_found())
        assert b" " not in out.replace(b"Provision data was not found!", b"")


# --------------------------------------------------------------------------------------------
# Innoway rendering
# --------------------------------------------------------------------------------------------


class TestInnowayRender:
    def test_success(self) -> None:
        result = ProvisionResult(
            status=ProvisionStatus.SUCCESS,
            device_id="bb56e5d7-96bc-4339-8780-6ebb67e5ac44",
            device_name="test 111",
            credentials_type=CredentialsType.ACCESS_TOKEN,
            credentials_value="zD8zxMrMaRVnhZhiGEVuRw2jid3oW721",
            credentials_id="hash",
        )
        assert render_result(INNO, result) == (
            b'{"device_id":"bb56e5d7-96bc-4339-8780-6ebb67e5ac44","status":"SUCCESS",'
            b'"token":"zD8zxMrMaRVnhZhiGEVuRw2jid3oW721"}'
        )

    def test_not_found(self) -> None:
        assert render_result(INNO, ProvisionResult.not_found()) == (
            b'{"status":"NOT_FOUND","error_msg":"Provision data was not found!"}'
        )

    def test_failure(self) -> None:
        assert render_result(INNO, ProvisionResult.failure()) == (
            b'{"status":"FAILURE","error_msg":"Failed to provision device!"}'
        )

    def test_failure_with_custom_message_has_no_credentials(self) -> None:
        result = ProvisionResult(
            status=ProvisionStatus.FAILURE, error_message="Too many", device_id="d", credentials_value="tok"
        )
        assert render_result(INNO, result) == b'{"status":"FAILURE","error_msg":"Too many"}'

    def test_render_error(self) -> None:
        assert render_error(INNO, "Failed to find the field provision_key in JSON body!") == (
            b'{"status":"FAILURE","error_msg":"Failed to find the field provision_key in JSON body!"}'
        )


# --------------------------------------------------------------------------------------------
# ThingsBoard request parsing (spec §1)
# --------------------------------------------------------------------------------------------


class TestThingsBoardParse:
    def test_minimal_request_defaults(self) -> None:
        req = parse(tb_body(), Transport.MQTT, "10.0.0.7")
        assert req.provision_key == "key-1"
        assert req.provision_secret == "secret-1"
        assert req.device_name == ""
        assert req.device_key == ""
        assert req.credentials_type is CredentialsType.ACCESS_TOKEN
        assert not req.credentials.any_given()
        assert req.gateway is False
        assert req.dialect is TB
        assert req.transport is Transport.MQTT
        assert req.source_address == "10.0.0.7"

    def test_all_fields_mapped(self) -> None:
        req = parse(
            tb_body(
                deviceName="dev A",
                credentialsType="MQTT_BASIC",
                token="tok",
                clientId="cid",
                username="user",
                password="pw",
                hash="CERTBODY",
                gateway=True,
            )
        )
        assert req.device_name == "dev A"
        assert req.credentials_type is CredentialsType.MQTT_BASIC
        assert req.credentials.token == "tok"
        assert req.credentials.client_id == "cid"
        assert req.credentials.username == "user"
        assert req.credentials.password == "pw"
        assert req.credentials.certificate == "CERTBODY"
        assert req.gateway is True

    def test_hash_field_is_the_certificate(self) -> None:
        req = parse(tb_body(credentialsType="X509_CERTIFICATE", hash="MIIBxyz"))
        assert req.credentials.certificate == "MIIBxyz"
        assert req.credentials.token == ""

    def test_username_field_maps_to_username(self) -> None:
        req = parse(tb_body(username="bob"))
        assert req.credentials.username == "bob"
        # "userName" (the stored/returned spelling) is not the request key.
        req2 = parse(tb_body(userName="bob"))
        assert req2.credentials.username == ""

    def test_every_request_gets_a_distinct_request_id(self) -> None:
        assert parse(tb_body()).request_id != parse(tb_body()).request_id

    @pytest.mark.parametrize("missing", ["provisionDeviceKey", "provisionDeviceSecret"])
    def test_missing_key_or_secret_names_field_without_secret(self, missing: str) -> None:
        fields = {"provisionDeviceKey": "the-key-value", "provisionDeviceSecret": "s3cr3t-VALUE-42"}
        del fields[missing]
        with pytest.raises(DialectError) as info:
            parse(body(**fields))
        assert missing in info.value.message
        assert "s3cr3t-VALUE-42" not in info.value.message
        assert "s3cr3t-VALUE-42" not in str(info.value)
        assert info.value.dialect is TB

    def test_secret_of_wrong_type_not_echoed(self) -> None:
        raw = body(provisionDeviceKey="k", provisionDeviceSecret={"nested": "s3cr3t-VALUE-42"})
        with pytest.raises(DialectError) as info:
            parse(raw)
        assert "provisionDeviceSecret" in info.value.message
        assert "s3cr3t-VALUE-42" not in str(info.value)

    def test_empty_key_is_present_and_accepted(self) -> None:
        # Only absence is a parse error; empty values reach the core (-> NOT_FOUND there).
        req = parse(body(provisionDeviceKey="", provisionDeviceSecret=""))
        assert req.provision_key == "" and req.provision_secret == ""

    @pytest.mark.parametrize("ctype", list(CredentialsType))
    def test_valid_credentials_types(self, ctype: CredentialsType) -> None:
        assert parse(tb_body(credentialsType=ctype.value)).credentials_type is ctype

    @pytest.mark.parametrize("bad", ["access_token", "Access_Token", "X509", "", " ACCESS_TOKEN", "MQTT_BASIC "])
    def test_invalid_or_lowercase_credentials_type(self, bad: str) -> None:
        with pytest.raises(DialectError) as info:
            parse(tb_body(credentialsType=bad))
        assert "credentialsType" in info.value.message
        assert info.value.dialect is TB

    def test_credentials_type_null_is_error(self) -> None:
        with pytest.raises(DialectError):
            parse(tb_body(credentialsType=None))

    @pytest.mark.parametrize(
        ("literal", "expected"),
        [("1.50", "1.50"), ("42", "42"), ("-0", "-0"), ("1e5", "1e5"), ("1E+400", "1E+400"), ("0.10", "0.10")],
    )
    def test_numbers_become_their_source_text(self, literal: str, expected: str) -> None:
        raw = b'{"provisionDeviceKey":"k","provisionDeviceSecret":"s","deviceName":' + literal.encode() + b"}"
        assert parse(raw).device_name == expected

    def test_numeric_key_and_secret(self) -> None:
        req = parse(b'{"provisionDeviceKey":12345678901234567890,"provisionDeviceSecret":3.0}')
        assert req.provision_key == "12345678901234567890"
        assert req.provision_secret == "3.0"

    def test_boolean_string_field_reads_as_text(self) -> None:
        assert parse(tb_body(deviceName=True)).device_name == "true"

    @pytest.mark.parametrize("field", ["deviceName", "token", "clientId", "username", "password", "hash",
                                       "provisionDeviceKey", "provisionDeviceSecret"])
    @pytest.mark.parametrize("value", [None, {"a": "b"}, {}], ids=["null", "object", "empty-object"])
    def test_null_or_object_values_rejected(self, field: str, value: object) -> None:
        fields: dict[str, object] = {"provisionDeviceKey": "k", "provisionDeviceSecret": "s"}
        fields[field] = value
        with pytest.raises(DialectError) as info:
            parse(body(**fields))
        assert field in info.value.message

    @pytest.mark.parametrize(
        ("value", "expected"),
        [(True, True), (False, False), ("TRUE", True), ("true", True), ("True", True), ("false", False),
         ("yes", False), ("1", False), (1, False)],
    )
    def test_gateway_flag(self, value: object, expected: bool) -> None:
        assert parse(tb_body(gateway=value)).gateway is expected

    @pytest.mark.parametrize("value", [None, {"x": True}])
    def test_gateway_null_or_object_rejected(self, value: object) -> None:
        with pytest.raises(DialectError):
            parse(tb_body(gateway=value))

    @pytest.mark.parametrize(
        "raw",
        [b"[]", b'[{"provisionDeviceKey":"k","provisionDeviceSecret":"s"}]', b'"provisionDeviceKey"', b"42",
         b"null", b"true"],
    )
    def test_non_object_json_rejected(self, raw: bytes) -> None:
        with pytest.raises(DialectError) as info:
            parse(raw)
        assert info.value.dialect is TB

    @pytest.mark.parametrize("raw", [b"", b"{", b"{'a':1}", b'{"a":1,}', b"not json", b'{"a":NaN}',
                                     b'{"provisionDeviceKey":"k","provisionDeviceSecret":Infinity}'])
    def test_invalid_json_rejected(self, raw: bytes) -> None:
        with pytest.raises(DialectError) as info:
            parse(raw)
        assert info.value.dialect is TB

    @pytest.mark.parametrize(
        "raw",
        [
            b'{"provisionDeviceKey":"k","provisionDeviceSecret":"\xff\xfe"}',
            b'{"provisionDeviceKey":"k","provisionDeviceSecret":"s","deviceName":"\xc3"}',
            b'{"provisionDeviceKey":"k","provisionDeviceSecret":"s","deviceName":"\xc0\xaf"}',  # overlong "/"
            b'{"provisionDeviceKey":"k","provisionDeviceSecret":"s","deviceName":"\xf4\x90\x80\x80"}',  # > U+10FFFF
        ],
    )
    def test_invalid_utf8_rejected(self, raw: bytes) -> None:
        with pytest.raises(DialectError):
            parse(raw)

    def test_utf8_encoded_surrogate_rejected(self) -> None:
        raw = b'{"provisionDeviceKey":"k","provisionDeviceSecret":"s","deviceName":"\xed\xa0\x80"}'
        with pytest.raises(DialectError):
            parse(raw)

    def test_invalid_json_message_does_not_echo_body(self) -> None:
        raw = b'{"provisionDeviceKey":"k","provisionDeviceSecret":"s3cr3t-VALUE-42",}'
        with pytest.raises(DialectError) as info:
            parse(raw)
        assert "s3cr3t-VALUE-42" not in str(info.value)

    def test_unicode_values_preserved(self) -> None:
        req = parse(tb_body(deviceName="Đèn phòng khách \u2028 日本"))
        assert req.device_name == "Đèn phòng khách \u2028 日本"

    def test_lone_surrogate_escape_rejected(self) -> None:
        raw = b'{"provisionDeviceKey":"k","provisionDeviceSecret":"s","deviceName":"\\ud800"}'
        with pytest.raises(DialectError):
            parse(raw)

    def test_deeply_nested_json_is_a_dialect_error(self) -> None:
        raw = b'{"provisionDeviceKey":"k","provisionDeviceSecret":"s","x":' + b"[" * 5000 + b"]" * 5000 + b"}"
        assert len(raw) < 64 * 1024  # the HTTP gateway's default body limit lets this through
        with pytest.raises(DialectError):
            parse(raw)


# --------------------------------------------------------------------------------------------
# Innoway parsing and dialect detection
# --------------------------------------------------------------------------------------------


class TestInnowayParseAndDetection:
    def test_innoway_request(self) -> None:
        raw = body(provision_key="hHT0d5BId6azReT94Xwk", provision_secret="6hbFSRcigdKKjhsSO713",
                   device_name="test 111", device_key="provision_1")
        req = parse(raw, Transport.COAP, "192.0.2.1")
        assert req.dialect is INNO
        assert req.provision_key == "hHT0d5BId6azReT94Xwk"
        assert req.provision_secret == "6hbFSRcigdKKjhsSO713"
        assert req.device_name == "test 111"
        assert req.device_key == "provision_1"
        assert req.credentials_type is CredentialsType.ACCESS_TOKEN
        assert not req.credentials.any_given()
        assert req.transport is Transport.COAP
        assert req.source_address == "192.0.2.1"

    def test_innoway_optional_fields_absent(self) -> None:
        req = parse(body(provision_key="k", provision_secret="s"))
        assert req.dialect is INNO
        assert req.device_name == "" and req.device_key == ""

    def test_innoway_ignores_thingsboard_credential_fields(self) -> None:
        req = parse(body(provision_key="k", provision_secret="s", token="t", credentialsType="MQTT_BASIC"))
        assert req.dialect is INNO
        assert req.credentials_type is CredentialsType.ACCESS_TOKEN
        assert not req.credentials.any_given()

    def test_innoway_missing_secret_is_innoway_error(self) -> None:
        with pytest.raises(DialectError) as info:
            parse(body(provision_key="k", device_name="n"))
        assert info.value.dialect is INNO
        assert "provision_secret" in info.value.message

    def test_innoway_secret_not_echoed_on_error(self) -> None:
        with pytest.raises(DialectError) as info:
            parse(body(provision_key="k", provision_secret="s3cr3t-VALUE-42", device_name=None))
        assert info.value.dialect is INNO
        assert "device_name" in info.value.message
        assert "s3cr3t-VALUE-42" not in str(info.value)

    def test_both_keys_means_thingsboard(self) -> None:
        raw = body(provision_key="inno-key", provision_secret="inno-secret",
                   provisionDeviceKey="tb-key", provisionDeviceSecret="tb-secret", device_key="dk")
        req = parse(raw)
        assert req.dialect is TB
        assert req.provision_key == "tb-key"
        assert req.provision_secret == "tb-secret"
        assert req.device_key == ""

    def test_both_keys_missing_tb_secret_is_thingsboard_error(self) -> None:
        raw = body(provision_key="k", provision_secret="s", provisionDeviceKey="tb")
        with pytest.raises(DialectError) as info:
            parse(raw)
        assert info.value.dialect is TB
        assert "provisionDeviceSecret" in info.value.message

    def test_neither_key_is_thingsboard_error(self) -> None:
        with pytest.raises(DialectError) as info:
            parse(body(provision_secret="s"))
        assert info.value.dialect is TB
        assert "provisionDeviceKey" in info.value.message

    def test_detect_dialect(self) -> None:
        assert detect_dialect({"provision_key": "k"}) is INNO
        assert detect_dialect({"provision_key": "k", "provisionDeviceKey": "k"}) is TB
        assert detect_dialect({"provision_secret": "s"}) is TB
        assert detect_dialect({}) is TB


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

_FIELD_NAMES = [
    "provisionDeviceKey", "provisionDeviceSecret", "deviceName", "credentialsType", "token", "clientId",
    "username", "password", "hash", "gateway", "provision_key", "provision_secret", "device_name", "device_key",
]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
    | st.sampled_from([t.value for t in CredentialsType] + ["TRUE", "false", ""])
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(st.sampled_from(_FIELD_NAMES) | st.text(max_size=10), json_values, max_size=10)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=json_objects)
def test_property_any_json_object_parses_or_dialect_error(obj: dict) -> None:
    raw = json.dumps(obj).encode("utf-8")
    try:
        req = parse(raw)
    except DialectError as exc:
        assert exc.dialect in (TB, INNO)
        assert isinstance(exc.message, str) and exc.message
        return
    assert isinstance(req, ProvisionRequest)
    assert req.dialect is detect_dialect(obj)


@settings(max_examples=200, deadline=None)
@given(obj=json_values)
def test_property_any_json_value_parses_or_dialect_error(obj: object) -> None:
    try:
        result = parse(json.dumps(obj).encode("utf-8"))
    except DialectError:
        return
    assert isinstance(obj, dict)
    assert isinstance(result, ProvisionRequest)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200))
def test_property_arbitrary_bytes_parse_or_dialect_error(raw: bytes) -> None:
    try:
        result = parse(raw)
    except DialectError:
        return
    assert isinstance(result, ProvisionRequest)


#: Text every field accepts: no C0 control character or DEL, within the smallest limit (255).
clean_text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters=[chr(c) for c in range(0x20)]
                                   + ["\x7f"]), max_size=255)


@settings(max_examples=200, deadline=None)
@given(
    key=clean_text,
    secret=clean_text,
    name=clean_text,
    token=clean_text,
    client_id=clean_text,
    username=clean_text,
    password=clean_text,
    cert=clean_text,
    ctype=st.sampled_from(list(CredentialsType)),
)
def test_property_string_fields_survive_parsing(
    key: str, secret: str, name: str, token: str, client_id: str, username: str, password: str, cert: str,
    ctype: CredentialsType,
) -> None:
    raw = body(provisionDeviceKey=key, provisionDeviceSecret=secret, deviceName=name, credentialsType=ctype.value,
               token=token, clientId=client_id, username=username, password=password, hash=cert)
    req = parse(raw)
    assert (req.provision_key, req.provision_secret, req.device_name) == (key, secret, name)
    assert req.credentials_type is ctype
    c = req.credentials
    assert (c.token, c.client_id, c.username, c.password, c.certificate) == (token, client_id, username, password, cert)


_text_or_dict = st.text() | st.dictionaries(st.text(), st.text() | st.none(), max_size=4)


@st.composite
def provision_results(draw: st.DrawFn) -> ProvisionResult:
    status = draw(st.sampled_from(list(ProvisionStatus)))
    return ProvisionResult(
        status=status,
        device_id=draw(st.none() | st.uuids().map(str)),
        device_name=draw(st.none() | st.text()),
        credentials_type=draw(st.none() | st.sampled_from(list(CredentialsType))),
        credentials_value=draw(st.none() | _text_or_dict),
        credentials_id=draw(st.none() | st.text()),
        error_message=draw(st.none() | st.text()),
    )


@settings(max_examples=300, deadline=None)
@given(result=provision_results())
def test_property_thingsboard_render_round_trips(result: ProvisionResult) -> None:
    out = render_result(TB, result)
    text = out.decode("utf-8")
    assert "\u2028" not in text and "\u2029" not in text
    loaded = json.loads(text)
    if result.status is ProvisionStatus.SUCCESS:
        expected: dict = {}
        if result.credentials_value is not None:
            expected["credentialsValue"] = result.credentials_value
        expected["credentialsType"] = (result.credentials_type or CredentialsType.ACCESS_TOKEN).value
        expected["status"] = "SUCCESS"
    else:
        expected = {"errorMsg": result.error_message or "", "status": result.status.value}
    assert loaded == expected
    assert list(loaded) == list(expected)
    # Compact output equals Python's canonical compact form apart from the U+2028/2029 escapes.
    assert text == json.dumps(expected, separators=(",", ":"), ensure_ascii=False).replace(
        "\u2028", "\\u2028").replace("\u2029", "\\u2029")


@settings(max_examples=300, deadline=None)
@given(result=provision_results(), token=st.text())
def test_property_innoway_render_round_trips(result: ProvisionResult, token: str) -> None:
    result = result.model_copy(update={"credentials_value": token})
    loaded = json.loads(render_result(INNO, result).decode("utf-8"))
    if result.status is ProvisionStatus.SUCCESS:
        assert list(loaded.items()) == [("device_id", result.device_id), ("status", "SUCCESS"), ("token", token)]
    else:
        assert list(loaded.items()) == [("status", result.status.value), ("error_msg", result.error_message or "")]


@settings(max_examples=100, deadline=None)
@given(message=st.text(), dialect=st.sampled_from([TB, INNO]))
def test_property_render_error_round_trips(message: str, dialect: Dialect) -> None:
    loaded = json.loads(render_error(dialect, message))
    assert loaded["status"] == "FAILURE"
    assert loaded["errorMsg" if dialect is TB else "error_msg"] == message


def test_constants_match_spec() -> None:
    assert MSG_NOT_FOUND == "Provision data was not found!"
    assert MSG_FAILURE == "Failed to provision device!"


# --- the device's own fields (ProvisionRequest.extra, for the pre-provisioning hook) -------------------------


def test_fields_beyond_the_dialects_own_are_kept_as_sent() -> None:
    body = json.dumps({"provisionDeviceKey": "k", "provisionDeviceSecret": "s", "deviceName": "d", "token": "t",
                       "serialNumber": "SN-1", "hwVersion": 3, "cal": {"offset": -0.25, "runs": [1, True, None]}})
    request = parse_provision_request(body.encode(), transport=Transport.HTTP)
    assert request.extra == {"serialNumber": "SN-1", "hwVersion": 3, "cal": {"offset": -0.25, "runs": [1, True, None]}}
    assert request.credentials.token == "t" and request.device_name == "d"
    innoway = parse_provision_request(json.dumps({"provision_key": "k", "provision_secret": "s", "device_key": "dk",
                                                  "firmware": "1.2"}).encode(), transport=Transport.COAP)
    assert innoway.extra == {"firmware": "1.2"}


def test_no_own_fields_and_too_many_of_them() -> None:
    plain = parse_provision_request(b'{"provisionDeviceKey": "k", "provisionDeviceSecret": "s"}',
                                    transport=Transport.HTTP)
    assert plain.extra == {}
    filler = "x" * (EXTRA_MAX_BYTES - len('{"a":""}'))
    fits = parse_provision_request(json.dumps({"provisionDeviceKey": "k", "provisionDeviceSecret": "s",
                                               "a": filler}).encode(), transport=Transport.HTTP)
    assert fits.extra == {"a": filler}
    over = parse_provision_request(json.dumps({"provisionDeviceKey": "k", "provisionDeviceSecret": "s",
                                               "a": filler + "x"}).encode(), transport=Transport.HTTP)
    assert over.extra is None and over.provision_key == "k"  # dropped, not refused


def test_own_fields_nested_too_deep_to_pass_on_are_dropped() -> None:
    def body(depth: int) -> bytes:
        return (b'{"provisionDeviceKey": "k", "provisionDeviceSecret": "s", "d": '
                + b"[" * depth + b"1" + b"]" * depth + b"}")

    at_limit = parse_provision_request(body(EXTRA_MAX_DEPTH - 1), transport=Transport.COAP)
    assert at_limit.extra is not None and at_limit.extra["d"]
    for depth in (EXTRA_MAX_DEPTH + 1, 900):  # 900: deeper than the bus's JSON parser goes
        request = parse_provision_request(body(depth), transport=Transport.COAP)
        assert request.extra is None and request.provision_key == "k"
        ProvisionRequest.model_validate_json(request.model_dump_json())  # crosses the bus


def test_own_fields_with_a_lone_surrogate_are_dropped_and_the_request_crosses_the_bus() -> None:
    body = b'{"provision_key": "k", "provision_secret": "s", "device_key": "dk", "aevice_name": "fz\\ud800-1"}'
    request = parse_provision_request(body, transport=Transport.HTTP)
    assert request.extra is None and request.device_key == "dk"
    ProvisionRequest.model_validate_json(request.model_dump_json())
