"""The device API of an authenticated MQTT session (device_session, topics) against a fake bus and connection:
ThingsBoard's topics, codes and QoS, the pending-RPC map, limits, and what is refused."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, NoReturn

import pytest
from mqtt_gateway import codec, topics
from mqtt_gateway.device_session import PUBLISH_OVERHEAD, Close, DeviceSession
from provisioning_common.bus import RpcError, RpcTimeout
from provisioning_common.contract import DOWNLINK_ATTRIBUTES, DOWNLINK_RPC
from provisioning_common.device_api import SESSION_LIMITS_METHOD, SessionLimitsInfo
from provisioning_common.device_link import Attachment, Downlink, Sink
from provisioning_common.models import AttributesQuery, AttributesSnapshot
from provisioning_common.mqtt_packets import OtherPacket, PacketType, decode_packet, decode_remaining_length
from provisioning_common.settings import Settings

DEVICE = "device-1"


class FakeWire:
    def __init__(self, level: int) -> None:
        self.level = level
        self.out: list[bytes] = []
        self.aborted: int | None = None

    def send(self, data: bytes) -> None:
        self.out.append(data)

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def disconnect(self, reason_code: int) -> NoReturn:
        if self.level == 5:
            self.out.append(codec.encode_disconnect(reason_code))
        raise Close

    def abort(self, reason_code: int) -> None:
        self.aborted = reason_code

    def packets(self) -> list[Any]:
        """What was written, decoded (PUBLISH / PUBACK as dataclasses, the rest as OtherPacket)."""
        decoded = []
        for data in self.out:
            length = decode_remaining_length(data)
            assert length is not None
            decoded.append(decode_packet(data[0], data[1 + length[1]:], protocol_level=self.level))
        self.out.clear()
        return decoded


class FakeLinks:
    def __init__(self) -> None:
        self.sinks: dict[str, Sink] = {}
        self.answers: list[tuple[Downlink, bytes]] = []
        self.fail = False

    async def attach(self, device_id: str, sink: Sink) -> Attachment:
        if self.fail:
            raise RpcError("bus unavailable")
        self.sinks[device_id] = sink
        return Attachment(device_id, sink)

    async def detach(self, attachment: Attachment) -> None:
        self.sinks.pop(attachment.device_id, None)

    async def answer(self, downlink: Downlink, body: bytes) -> bool:
        self.answers.append((downlink, body))
        return True


class FakeApi:
    def __init__(self, **settings: Any) -> None:
        self.settings = Settings(**settings)
        self.links = FakeLinks()
        self.telemetry: list[bytes] = []
        self.saved: list[dict[str, Any]] = []
        self.queries: list[AttributesQuery] = []
        self.calls: list[dict[str, Any]] = []
        self.rpc_answer: bytes | None = b'{"pong":true}'
        self.rpc_gate: asyncio.Event | None = None
        self.fail: Exception | None = None

    async def publish_telemetry(self, device_id: str, payload: bytes) -> None:
        if self.fail:
            raise self.fail
        self.telemetry.append(payload)

    async def save_client_attributes(self, device_id: str, values: dict[str, Any]) -> None:
        if self.fail:
            raise self.fail
        self.saved.append(values)

    async def get_attributes(self, query: AttributesQuery) -> AttributesSnapshot:
        if self.fail:
            raise self.fail
        self.queries.append(query)
        return AttributesSnapshot(client={"fw": "1.0"}, shared={"interval": 5})

    async def client_rpc(self, device_id: str, call: dict[str, Any], *, max_payload_size: int) -> bytes | None:
        self.calls.append(call)
        if call["method"] == SESSION_LIMITS_METHOD:
            return SessionLimitsInfo(max_payload_size, self.settings.device_max_inflight,
                                     {"messages": self.settings.device_messages_rate_limit}).render()
        if self.rpc_gate is not None:
            await self.rpc_gate.wait()
        return self.rpc_answer


async def _session(level: int = 4, subscribe: list[tuple[str, int]] | None = None, **settings: Any,
                   ) -> tuple[DeviceSession, FakeWire, FakeApi]:
    wire, api = FakeWire(level), FakeApi(**settings)
    session = DeviceSession(wire, api, DEVICE, max_packet_bytes=65536)  # type: ignore[arg-type]
    await session.open()
    if subscribe:
        wire.send(session.on_subscribe(codec.Subscribe(1, subscribe)))
        wire.packets()
    return session, wire, api


def _publish(topic: str, payload: bytes | dict[str, Any] | list[Any], qos: int = 1, pid: int = 7) -> codec.Publish:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return codec.Publish(topic, body, qos=qos, packet_id=pid if qos else None)


def _rpc(method: str = "setGpio", *, two_way: bool = True, deadline: float | None = None) -> Downlink:
    return Downlink(DOWNLINK_RPC, {"method": method, "params": {"pin": 4}},
                    "reply-queue" if two_way else None, "corr-1" if two_way else None, deadline)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


SDK_SUBSCRIPTIONS = [("v1/devices/me/attributes", 1), ("v1/devices/me/attributes/response/+", 1),
                     ("v1/devices/me/rpc/request/+", 1), ("v1/devices/me/rpc/response/+", 1)]


# --- topics --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("topic", "kind", "family", "request_id"), [
    ("v1/devices/me/telemetry", topics.Kind.TELEMETRY, topics.V1, ""),
    ("v1/devices/me/attributes", topics.Kind.ATTRIBUTES, topics.V1, ""),
    ("v1/devices/me/attributes/request/12", topics.Kind.ATTRIBUTES_REQUEST, topics.V1, "12"),
    ("v1/devices/me/rpc/request/3", topics.Kind.RPC_REQUEST, topics.V1, "3"),
    ("v1/devices/me/rpc/response/4", topics.Kind.RPC_RESPONSE, topics.V1, "4"),
    ("v2/t", topics.Kind.TELEMETRY, topics.V1, ""),
    ("v2/a/j", topics.Kind.ATTRIBUTES, topics.V1, ""),
    ("v2/a/req/5", topics.Kind.ATTRIBUTES_REQUEST, topics.V2, "5"),
    ("v2/a/req/j/5", topics.Kind.ATTRIBUTES_REQUEST, topics.V2_JSON, "5"),
    ("v2/r/res/j/9", topics.Kind.RPC_RESPONSE, topics.V2_JSON, "9"),
    ("v2/r/req/1", topics.Kind.RPC_REQUEST, topics.V2, "1"),
    ("v2/r/req/p/1", topics.Kind.UNKNOWN, topics.V1, ""),  # protobuf: not served here
    ("v2/t/p", topics.Kind.UNKNOWN, topics.V1, ""),
    ("v1/devices/me/claim", topics.Kind.UNKNOWN, topics.V1, ""),
    ("v1/devices/other-device/telemetry", topics.Kind.UNKNOWN, topics.V1, ""),
    ("v1/gateway/telemetry", topics.Kind.GATEWAY, topics.V1, ""),
])
def test_publish_routes(topic: str, kind: topics.Kind, family: topics.Family, request_id: str) -> None:
    assert topics.route_publish(topic) == topics.Route(kind, family, request_id)


def test_filters_thingsboard_grants_and_refuses() -> None:
    assert topics.classify_filter("v1/devices/me/attributes") == (topics.Subscription.ATTRIBUTE_UPDATES, topics.V1)
    assert topics.classify_filter("v2/r/req/j/+") == (topics.Subscription.RPC_REQUESTS, topics.V2_JSON)
    assert topics.classify_filter("v1/devices/me/rpc/response/+")[0] is topics.Subscription.GRANTED
    for refused in ("#", "v1/devices/me/#", "v1/devices/me/rpc/request/#", "$share/g/v1/devices/me/attributes",
                    "v1/devices/other/attributes", "v2/r/req/p/+", "v1/devices/me/telemetry"):
        assert topics.classify_filter(refused)[0] is topics.Subscription.REFUSED, refused


def test_request_ids_as_integer_parse_int() -> None:
    assert topics.parse_request_id("42") == 42
    assert topics.parse_request_id("007") == 7
    assert topics.parse_request_id("+3") == 3
    for bad in ("", "abc", "1.5", " 1", "1_0", "٣", "2147483648", "1/2"):
        assert topics.parse_request_id(bad) is None, bad


def test_filter_matching() -> None:
    assert topics.filter_matches("v1/devices/me/rpc/request/+", "v1/devices/me/rpc/request/5")
    assert not topics.filter_matches("v1/devices/me/rpc/request/+", "v1/devices/me/rpc/request/5/x")
    assert topics.filter_matches("v1/#", "v1/devices/me")
    assert not topics.filter_matches("v1/devices/me/attributes", "v1/devices/me/attributes/response/1")


# --- subscriptions -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("level", "refused"), [(4, 0x80), (5, 0x8F)])
async def test_the_sdk_subscriptions_are_granted_at_most_qos_1(level: int, refused: int) -> None:
    session, wire, _ = await _session(level)
    requests = [(t, 2) for t, _ in SDK_SUBSCRIPTIONS] + [("#", 1), ("v1/devices/me/telemetry", 0)]
    wire.send(session.on_subscribe(codec.Subscribe(9, requests)))
    [suback] = wire.packets()
    assert isinstance(suback, OtherPacket) and suback.packet_type is PacketType.SUBACK
    assert list(suback.body[-6:]) == [1, 1, 1, 1, refused, refused]


async def test_unsubscribe_codes_follow_thingsboard() -> None:
    session, wire, _ = await _session(5, SDK_SUBSCRIPTIONS)
    wire.send(session.on_unsubscribe(codec.Unsubscribe(3, ["v1/devices/me/attributes", "never/subscribed"])))
    [unsuback] = wire.packets()
    assert unsuback.packet_type is PacketType.UNSUBACK and list(unsuback.body[-2:]) == [0x00, 0x11]
    # No longer subscribed to updates: one is dropped, not written.
    api_sink = session._api.links.sinks[DEVICE]  # type: ignore[attr-defined]
    api_sink(Downlink(DOWNLINK_ATTRIBUTES, {"k": 1}))
    await _settle()
    assert wire.packets() == []


# --- publishes -----------------------------------------------------------------------------------------


async def test_telemetry_and_attributes_are_forwarded_then_acknowledged() -> None:
    session, wire, api = await _session()
    await session.on_publish(_publish("v1/devices/me/telemetry", {"t": 1}))
    await session.on_publish(_publish("v2/a", {"fw": "1.0"}, pid=8))
    assert api.telemetry == [b'{"t": 1}'] and api.saved == [{"fw": "1.0"}]
    assert [(p.packet_id, p.reason_code) for p in wire.packets()] == [(7, 0), (8, 0)]


@pytest.mark.parametrize("level", [4, 5])
async def test_an_unknown_topic_gets_puback_0x90_and_the_session_stays(level: int) -> None:
    session, wire, api = await _session(level)
    for topic in ("v1/devices/other/telemetry", "v1/devices/me/claim", "v2/t/p", "anything"):
        await session.on_publish(_publish(topic, {"t": 1}))
    acks = wire.packets()
    assert [a.reason_code for a in acks] == [0x90 if level == 5 else 0] * 4  # 3.1.1 has no reason code
    assert api.telemetry == []


async def test_the_gateway_api_of_a_plain_device_is_ignored_without_puback() -> None:
    session, wire, _ = await _session(5)
    await session.on_publish(_publish("v1/gateway/telemetry", {"dev": [{"t": 1}]}))
    assert wire.packets() == []


@pytest.mark.parametrize(("topic", "payload"), [
    ("v1/devices/me/telemetry", b"not json"),
    ("v1/devices/me/telemetry", b'"a string"'),
    ("v1/devices/me/attributes", b"[1,2]"),
    ("v1/devices/me/attributes", b"{}"),
    ("v1/devices/me/attributes/request/1", b"{"),
    ("v1/devices/me/attributes/request/x", b"{}"),
    ("v1/devices/me/rpc/request/1", b'{"params":1}'),
    ("v1/devices/me/rpc/request/one", b'{"method":"m"}'),
    ("v1/devices/me/rpc/response/1", b"\xff\xfe"),
    ("v1/devices/me/rpc/response/abc", b"{}"),
])
async def test_an_unreadable_payload_is_thingsboards_0x99(topic: str, payload: bytes) -> None:
    # MQTT 5, QoS 1: PUBACK 0x99 and the session stays.
    session, wire, api = await _session(5)
    await session.on_publish(_publish(topic, payload))
    [ack] = wire.packets()
    assert isinstance(ack, codec.PubAck) and ack.reason_code == 0x99
    # MQTT 5, QoS 0: DISCONNECT 0x99.
    with pytest.raises(Close):
        await session.on_publish(_publish(topic, payload, qos=0))
    [disconnect] = wire.packets()
    assert isinstance(disconnect, codec.Disconnect) and disconnect.reason_code == 0x99
    # 3.1.1: closed without a word.
    session311, wire311, _ = await _session(4)
    with pytest.raises(Close):
        await session311.on_publish(_publish(topic, payload))
    assert wire311.packets() == []
    assert api.telemetry == api.saved == api.queries == api.calls == []


async def test_a_backend_that_cannot_take_a_message_closes_the_session_with_0x83() -> None:
    session, wire, api = await _session(5)
    api.fail = RpcTimeout("no answer")
    with pytest.raises(Close):
        await session.on_publish(_publish("v1/devices/me/attributes", {"a": 1}))
    [disconnect] = wire.packets()
    assert disconnect.reason_code == 0x83


async def test_rate_limit_closes_the_session_and_stores_nothing_more() -> None:
    session, wire, api = await _session(5, device_messages_rate_limit="3:60")
    for i in range(3):
        await session.on_publish(_publish("v1/devices/me/telemetry", {"i": i}, pid=i + 1))
    # getSessionLimits is answered without being counted (as in ThingsBoard).
    await session.on_publish(_publish("v1/devices/me/rpc/request/1", {"method": SESSION_LIMITS_METHOD}, pid=9))
    with pytest.raises(Close):
        await session.on_publish(_publish("v1/devices/me/telemetry", {"i": 3}, pid=4))
    assert len(api.telemetry) == 3
    assert wire.packets()[-1].reason_code == 0x83


# --- attribute requests and client-side RPC -----------------------------------------------------------


async def test_attribute_request_is_answered_on_its_response_topic() -> None:
    session, wire, api = await _session(4, SDK_SUBSCRIPTIONS)
    await session.on_publish(_publish("v1/devices/me/attributes/request/007", {"clientKeys": "fw",
                                                                                "sharedKeys": "interval"}))
    await _settle()
    ack, answer = wire.packets()
    assert isinstance(ack, codec.PubAck) and ack.packet_id == 7
    assert answer.topic == "v1/devices/me/attributes/response/7" and answer.qos == 1
    assert json.loads(answer.payload) == {"client": {"fw": "1.0"}, "shared": {"interval": 5}}
    assert api.queries == [AttributesQuery(device_id=DEVICE, client_keys=["fw"], shared_keys=["interval"])]


async def test_v2_requests_are_answered_on_v2_topics_at_qos_1_without_subscription() -> None:
    session, wire, _ = await _session(4)
    await session.on_publish(_publish("v2/a/req/j/3", b""))
    await session.on_publish(_publish("v2/r/req/4", {"method": "ping"}, pid=8))
    await _settle()
    published = {p.topic: p.qos for p in wire.packets() if isinstance(p, codec.Publish)}
    assert published == {"v2/a/res/j/3": 1, "v2/r/res/4": 1}


async def test_client_rpc_runs_as_a_task_and_its_answer_follows_the_subscription_qos() -> None:
    session, wire, api = await _session(4, [("v1/devices/me/rpc/response/+", 0)])
    api.rpc_gate = asyncio.Event()
    await session.on_publish(_publish("v1/devices/me/rpc/request/1", {"method": "slow", "params": {}}))
    # The read loop was not blocked: a telemetry publish is handled while the RPC waits.
    await session.on_publish(_publish("v1/devices/me/telemetry", {"t": 2}, pid=8))
    assert [p.packet_id for p in wire.packets()] == [7, 8]
    api.rpc_gate.set()
    await _settle()
    [answer] = wire.packets()
    assert (answer.topic, answer.qos, answer.payload) == ("v1/devices/me/rpc/response/1", 0, b'{"pong":true}')


async def test_get_session_limits_reports_what_is_enforced() -> None:
    session, wire, api = await _session(5, SDK_SUBSCRIPTIONS, device_max_inflight=7)
    await session.on_publish(_publish("v1/devices/me/rpc/request/1", {"method": "getSessionLimits",
                                                                        "params": {"timeout": 5000}}))
    await _settle()
    answer = wire.packets()[-1]
    limits = json.loads(answer.payload)
    assert limits["maxPayloadSize"] == 65536 - PUBLISH_OVERHEAD == session.max_payload_size
    assert limits["maxInflightMessages"] == 7
    assert limits["rateLimits"]["messages"] == api.settings.device_messages_rate_limit


async def test_no_backend_answer_means_no_answer() -> None:
    session, wire, api = await _session()
    api.rpc_answer = None
    await session.on_publish(_publish("v1/devices/me/rpc/request/1", {"method": "nobody"}))
    await _settle()
    assert [type(p) for p in wire.packets()] == [codec.PubAck]


async def test_too_many_requests_in_flight_is_quota_exceeded() -> None:
    session, wire, api = await _session(5, device_max_inflight=2)
    api.rpc_gate = asyncio.Event()
    await session.on_publish(_publish("v1/devices/me/rpc/request/1", {"method": "a"}, pid=1))
    await session.on_publish(_publish("v1/devices/me/rpc/request/2", {"method": "b"}, pid=2))
    with pytest.raises(Close):
        await session.on_publish(_publish("v1/devices/me/rpc/request/3", {"method": "c"}, pid=3))
    assert wire.packets()[-1].reason_code == 0x97
    await session.close()


async def test_attribute_request_on_a_dead_backend_closes_the_session() -> None:
    session, wire, api = await _session(5)
    api.fail = RpcTimeout("no answer")
    await session.on_publish(_publish("v1/devices/me/attributes/request/1", {}))
    await _settle()
    assert wire.aborted == 0x83


# --- downlink: attribute updates and server-side RPC ------------------------------------------------


async def test_attribute_updates_only_while_subscribed_at_the_granted_qos() -> None:
    session, wire, api = await _session(4)
    sink = api.links.sinks[DEVICE]
    sink(Downlink(DOWNLINK_ATTRIBUTES, {"interval": 1}))
    await _settle()
    assert wire.packets() == []  # not subscribed: dropped, as ThingsBoard does
    wire.send(session.on_subscribe(codec.Subscribe(1, [("v1/devices/me/attributes", 0)])))
    wire.packets()
    sink(Downlink(DOWNLINK_ATTRIBUTES, {"interval": 2}))
    sink(Downlink(DOWNLINK_ATTRIBUTES, {"deleted": ["interval"]}))
    await _settle()
    updates = wire.packets()
    assert [(u.topic, u.qos, json.loads(u.payload)) for u in updates] == [
        ("v1/devices/me/attributes", 0, {"interval": 2}), ("v1/devices/me/attributes", 0, {"deleted": ["interval"]})]


async def test_server_rpc_round_trip_with_per_session_ids() -> None:
    session, wire, api = await _session(5, SDK_SUBSCRIPTIONS)
    sink = api.links.sinks[DEVICE]
    sink(_rpc("first"))
    sink(_rpc("second"))
    sink(_rpc("oneway", two_way=False))
    await _settle()
    requests = wire.packets()
    assert [(r.topic, json.loads(r.payload)["method"]) for r in requests] == [
        ("v1/devices/me/rpc/request/1", "first"), ("v1/devices/me/rpc/request/2", "second"),
        ("v1/devices/me/rpc/request/3", "oneway")]
    assert all(r.qos == 1 and r.packet_id for r in requests)
    assert json.loads(requests[0].payload) == {"method": "first", "params": {"pin": 4}}
    assert session.pending_rpcs == 2  # the one-way call waits for nothing
    for request in requests:
        session.on_puback(codec.PubAck(request.packet_id))
    await session.on_publish(_publish("v1/devices/me/rpc/response/2", {"ok": 2}))
    # An id this session never sent (or someone else's), and a repeated answer: dropped, session kept.
    await session.on_publish(_publish("v1/devices/me/rpc/response/99", {"ok": 99}, pid=8))
    await session.on_publish(_publish("v1/devices/me/rpc/response/2", {"again": True}, pid=9))
    assert [(d.body["method"], body) for d, body in api.links.answers] == [("second", b'{"ok": 2}')]
    assert [a.reason_code for a in wire.packets()] == [0, 0, 0]
    assert session.pending_rpcs == 1


async def test_rpcs_wait_for_the_rpc_subscription_and_expired_ones_are_dropped() -> None:
    session, wire, api = await _session(4)
    sink = api.links.sinks[DEVICE]
    sink(_rpc("early"))
    sink(_rpc("stale", deadline=time.time() - 1))
    await _settle()
    assert wire.packets() == []
    wire.send(session.on_subscribe(codec.Subscribe(1, [("v2/r/req/+", 1)])))
    await _settle()
    suback, request = wire.packets()
    assert request.topic == "v2/r/req/1" and json.loads(request.payload)["method"] == "early"


async def test_pending_rpcs_are_bounded_by_max_inflight() -> None:
    session, wire, api = await _session(4, SDK_SUBSCRIPTIONS, device_max_inflight=2)
    sink = api.links.sinks[DEVICE]
    for i in range(3):
        sink(_rpc(f"m{i}"))
    await _settle()
    assert [json.loads(p.payload)["method"] for p in wire.packets()] == ["m0", "m1"]  # the third: not delivered
    assert session.pending_rpcs == 2


async def test_receive_maximum_and_maximum_packet_size_of_an_mqtt5_device() -> None:
    wire, api = FakeWire(5), FakeApi()
    session = DeviceSession(wire, api, DEVICE, max_packet_bytes=65536,  # type: ignore[arg-type]
                            connect_properties={0x21: 1, 0x27: 60})
    await session.open()
    wire.send(session.on_subscribe(codec.Subscribe(1, SDK_SUBSCRIPTIONS)))
    wire.packets()
    sink = api.links.sinks[DEVICE]
    sink(Downlink(DOWNLINK_ATTRIBUTES, {"a": 1}))
    sink(Downlink(DOWNLINK_ATTRIBUTES, {"b": 2}))  # a second unacknowledged QoS 1 publish: over Receive Maximum
    await _settle()
    [first] = wire.packets()
    session.on_puback(codec.PubAck(first.packet_id))
    sink(Downlink(DOWNLINK_ATTRIBUTES, {"c": "x" * 100}))  # larger than the device's 60 bytes
    sink(Downlink(DOWNLINK_ATTRIBUTES, {"d": 4}))
    await _settle()
    assert [json.loads(p.payload) for p in wire.packets()] == [{"d": 4}]


async def test_close_detaches_and_a_failed_attach_raises() -> None:
    session, _, api = await _session()
    assert DEVICE in api.links.sinks
    await session.close()
    assert DEVICE not in api.links.sinks
    failing = FakeApi()
    failing.links.fail = True
    with pytest.raises(RpcError):
        await DeviceSession(FakeWire(4), failing, DEVICE, max_packet_bytes=1024).open()  # type: ignore[arg-type]
