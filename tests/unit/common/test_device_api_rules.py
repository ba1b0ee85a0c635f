"""ThingsBoard's device-API payload rules shared by the three gateways (provisioning_common.device_api)."""

from __future__ import annotations

import json

import pytest
from provisioning_common.contract import DOWNLINK_ATTRIBUTES, DOWNLINK_RPC
from provisioning_common.device_api import (
    DeviceApiError,
    RateLimit,
    SessionLimitsInfo,
    attributes_query,
    parse_attributes,
    parse_attributes_request,
    parse_rate,
    parse_rpc_call,
    parse_rpc_response,
    render_attribute_update,
    render_attributes,
    render_server_rpc,
)
from provisioning_common.device_link import Downlink
from provisioning_common.models import AttributesSnapshot


def test_client_attributes_must_be_a_non_empty_object_with_sane_keys() -> None:
    assert parse_attributes(b'{"fw":"1.2","temp":21.5,"nested":{"a":[1]}}') == {
        "fw": "1.2", "temp": 21.5, "nested": {"a": [1]}}
    for bad in (b"[1,2]", b'"x"', b"{}", b"not json", b'{"":1}', b'{"   ":1}', json.dumps({"k" * 256: 1}).encode(),
                b"\xff\xfe", b"[" * 5000 + b"]" * 5000, b'{"\\ud800":1}', b'{"k":["\\uDFFF"]}', b'{"k":NaN}'):
        with pytest.raises(DeviceApiError):
            parse_attributes(bad)


def test_escaped_surrogate_pairs_are_text() -> None:
    assert parse_attributes(b'{"smile":"\\ud83d\\ude00"}') == {"smile": "\U0001f600"}


@pytest.mark.parametrize(
    ("client", "shared", "expected"),
    [
        (None, None, ([], [])),  # neither named: everything of both scopes
        ("a,b", None, (["a", "b"], None)),
        (None, " c , ,d ", (None, ["c", "d"])),
        ("a", "c", (["a"], ["c"])),
        ("", "c", (None, ["c"])),  # an empty list names no key of that scope
        ("", "", ([], [])),
    ],
)
def test_attribute_queries_follow_thingsboard(
    client: str | None, shared: str | None, expected: tuple[list[str] | None, list[str] | None]
) -> None:
    query = attributes_query("dev", client, shared)
    assert (query.client_keys, query.shared_keys) == expected


def test_mqtt_attribute_request_payloads() -> None:
    assert parse_attributes_request("d", b"").client_keys == []
    query = parse_attributes_request("d", b'{"clientKeys":"x,y","sharedKeys":"z"}')
    assert (query.client_keys, query.shared_keys) == (["x", "y"], ["z"])
    for bad in (b"[]", b'{"clientKeys":["x"]}', b"nope"):
        with pytest.raises(DeviceApiError):
            parse_attributes_request("d", bad)


def test_attribute_answers_leave_out_empty_scopes() -> None:
    assert json.loads(render_attributes(AttributesSnapshot(client={"a": 1}, shared={}))) == {"client": {"a": 1}}
    assert json.loads(render_attributes(AttributesSnapshot())) == {}


def test_rpc_bodies() -> None:
    assert parse_rpc_call(b'{"method":"getTime"}') == {"method": "getTime", "params": None}
    assert parse_rpc_call(b'{"method":"m","params":{"x":1},"extra":2}') == {"method": "m", "params": {"x": 1}}
    for bad in (b'{"params":1}', b'{"method":""}', b'{"method":5}', b"[]", json.dumps({"method": "m" * 256}).encode()):
        with pytest.raises(DeviceApiError):
            parse_rpc_call(bad)
    assert parse_rpc_response(b'{"ok":true}') == b'{"ok":true}'
    assert parse_rpc_response(b"42") == b"42"
    with pytest.raises(DeviceApiError):
        parse_rpc_response(b"{broken")
    call = Downlink(DOWNLINK_RPC, {"method": "reboot", "params": {"in": 5}})
    assert json.loads(render_server_rpc(call)) == {"method": "reboot", "params": {"in": 5}}
    assert json.loads(render_server_rpc(call, 7)) == {"id": 7, "method": "reboot", "params": {"in": 5}}
    update = Downlink(DOWNLINK_ATTRIBUTES, {"deleted": ["a"]})
    assert json.loads(render_attribute_update(update)) == {"deleted": ["a"]}


def test_rate_limits_in_thingsboard_notation() -> None:
    assert parse_rate("100:1,3000:60") == [(100, 1), (3000, 60)]
    assert parse_rate("") == []
    for bad in ("x", "1", "0:1", "5:0", "1:-1"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    unlimited = RateLimit("")
    assert not unlimited.limited and all(unlimited.allow() for _ in range(10_000))
    limit = RateLimit("5:60,100:3600")
    assert [limit.allow() for _ in range(7)] == [True] * 5 + [False] * 2
    assert not limit.allow(1)


def test_session_limits_are_what_the_sdk_reads() -> None:
    info = SessionLimitsInfo(max_payload_size=65000, max_inflight_messages=100,
                             rate_limits={"messages": "100:1", "telemetryMessages": "", "telemetryDataPoints": ""})
    assert json.loads(info.render()) == {
        "maxPayloadSize": 65000, "maxInflightMessages": 100,
        "rateLimits": {"messages": "100:1", "telemetryMessages": "", "telemetryDataPoints": ""},
    }
