"""The MQTT packet codec: known bytes, round trips, real clients' bytes, malformed input, fuzzing.

The decoder is the gateway's attack surface, so besides exact cases the property tests check the
one promise the server relies on: whatever arrives, decoding yields a packet, a ProtocolError
or an IncompleteReadError, and never reads (or waits for) the body of an oversize packet.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mqtt_gateway import codec
from mqtt_gateway.codec import (
    Connect,
    Disconnect,
    IdentifierRejected,
    OtherPacket,
    Packet,
    PacketTooLarge,
    PacketType,
    PingReq,
    ProtocolError,
    PubAck,
    Publish,
    Subscribe,
    Unsubscribe,
    UnsupportedProtocol,
    decode_packet,
    decode_remaining_length,
    read_packet,
)
from provisioning_common import mqtt_client_packets as client_codec

BIG = 1 << 22
FAST = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A private loop for the synchronous (hypothesis) tests: never installed as the current loop,
    so it cannot disturb pytest-asyncio's session loop."""
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


async def _read_stream(data: bytes, level: int | None, max_size: int = BIG) -> Packet:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await read_packet(reader, max_packet_size=max_size, protocol_level=level)


def read(loop: asyncio.AbstractEventLoop, data: bytes, level: int | None, max_size: int = BIG) -> Packet:
    return loop.run_until_complete(_read_stream(data, level, max_size))


def split(data: bytes) -> tuple[int, bytes]:
    """(first byte, body) of one complete encoded packet."""
    decoded = decode_remaining_length(data)
    assert decoded is not None
    length, size = decoded
    assert len(data) == 1 + size + length
    return data[0], data[1 + size :]


def dec(data: bytes, level: int | None) -> Packet:
    return decode_packet(*split(data), level)


def raw(first: int, body: bytes) -> bytes:
    return bytes((first,)) + codec.encode_remaining_length(len(body)) + body


def s(text: str | bytes) -> bytes:
    """An MQTT string as raw bytes (for hand-built, possibly invalid, packets)."""
    data = text.encode() if isinstance(text, str) else text
    return len(data).to_bytes(2, "big") + data


def connect_body(name: bytes, level: int, flags: int, payload: bytes, props: bytes = b"\x00") -> bytes:
    return s(name) + bytes((level, flags)) + b"\x00\x3c" + (props if level == 5 else b"") + payload


# --- exact bytes ------------------------------------------------------------------------------------


def test_known_server_packets() -> None:
    assert codec.encode_connack(0) == b"\x20\x02\x00\x00"
    assert codec.encode_connack(0, session_present=True) == b"\x20\x02\x01\x00"
    assert codec.encode_connack(5, session_present=True) == b"\x20\x02\x00\x05"  # no session flag on refusal
    assert codec.encode_connack(0, session_present=True, protocol_level=3) == b"\x20\x02\x00\x00"
    assert codec.encode_connack(0, protocol_level=5) == b"\x20\x03\x00\x00\x00"
    assert codec.encode_connack(0x87, protocol_level=5, properties={0x24: 1}) == b"\x20\x05\x00\x87\x02\x24\x01"
    assert codec.encode_connack(0, protocol_level=5, properties=b"\x24\x01") == b"\x20\x05\x00\x00\x02\x24\x01"
    assert codec.encode_pingresp() == b"\xd0\x00"
    assert codec.encode_puback(1) == b"\x40\x02\x00\x01"
    assert codec.encode_puback(0x1234, protocol_level=5) == b"\x40\x02\x12\x34"
    assert codec.encode_puback(7, reason_code=0x90, protocol_level=5) == b"\x40\x03\x00\x07\x90"
    assert codec.encode_suback(10, [1, 0x80]) == b"\x90\x04\x00\x0a\x01\x80"
    assert codec.encode_suback(10, [1, 0x8F], protocol_level=5) == b"\x90\x05\x00\x0a\x00\x01\x8f"
    assert codec.encode_unsuback(3, 2) == b"\xb0\x02\x00\x03"
    assert codec.encode_unsuback(3, 2, protocol_level=5) == b"\xb0\x05\x00\x03\x00\x00\x00"
    assert codec.encode_unsuback(3, [0, 0x11], protocol_level=5) == b"\xb0\x05\x00\x03\x00\x00\x11"
    assert codec.encode_publish("a/b", b"hi") == b"\x30\x07\x00\x03a/bhi"
    assert codec.encode_publish("a/b", b"hi", qos=1, packet_id=5, retain=True) == b"\x33\x09\x00\x03a/b\x00\x05hi"
    assert codec.encode_publish("a/b", b"hi", qos=1, packet_id=5, protocol_level=5) == (
        b"\x32\x0a\x00\x03a/b\x00\x05\x00hi"
    )
    assert codec.encode_disconnect(0x8E) == b"\xe0\x01\x8e"
    assert codec.encode_disconnect(0) == b"\xe0\x00"
    assert codec.encode_disconnect(0x8E, protocol_level=4) == b""
    assert codec.encode_disconnect(0x8E, protocol_level=3) == b""


def test_known_client_packets() -> None:
    assert client_codec.encode_connect("c", username="u") == b"\x10\x10\x00\x04MQTT\x04\x82\x00\x3c\x00\x01c\x00\x01u"
    assert client_codec.encode_connect("c", protocol_level=3, clean_session=False, keep_alive=0) == (
        b"\x10\x0f\x00\x06MQIsdp\x03\x00\x00\x00\x00\x01c"
    )
    assert client_codec.encode_connect("c", protocol_level=5) == b"\x10\x0e\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x01c"
    assert client_codec.encode_subscribe(1, [("/provision/response", 1)]) == (
        b"\x82\x18\x00\x01" + s("/provision/response") + b"\x01"
    )
    assert client_codec.encode_unsubscribe(2, ["x"]) == b"\xa2\x05\x00\x02\x00\x01x"
    assert client_codec.encode_pingreq() == b"\xc0\x00"
    assert client_codec.encode_disconnect_client() == b"\xe0\x00"


def test_known_bytes_decode() -> None:
    # A mosquitto_pub 3.1.1 CONNECT, byte for byte.
    data = b"\x10\x23\x00\x04MQTT\x04\xc2\x00\x3c\x00\x04mosq\x00\x09provision\x00\x06secret"
    assert dec(data, None) == Connect("MQTT", 4, "mosq", True, 60, "provision", b"secret")
    assert dec(b"\x40\x02\x00\x01", 4) == PubAck(1)
    assert dec(b"\x40\x04\x00\x01\x10\x00", 5) == PubAck(1, 0x10)
    assert dec(b"\xc0\x00", 3) == PingReq()
    assert dec(b"\xe0\x00", 4) == Disconnect()
    assert dec(b"\xe0\x01\x04", 5) == Disconnect(4)
    assert dec(b"\xe0\x07\x00\x05\x11\x00\x00\x00\x05", 5) == Disconnect(0)
    assert dec(b"\x62\x02\x00\x09", 4) == OtherPacket(PacketType.PUBREL, 2, b"\x00\x09")
    assert dec(b"\x50\x02\x00\x09", 4) == OtherPacket(PacketType.PUBREC, 0, b"\x00\x09")
    assert dec(b"\xf0\x00", 5) == OtherPacket(PacketType.AUTH, 0, b"")
    assert dec(b"\x20\x02\x00\x00", 4) == OtherPacket(PacketType.CONNACK, 0, b"\x00\x00")


@pytest.mark.parametrize(
    ("value", "encoded"),
    [(0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16383, b"\xff\x7f"), (16384, b"\x80\x80\x01"),
     (2097151, b"\xff\xff\x7f"), (2097152, b"\x80\x80\x80\x01"), (268435455, b"\xff\xff\xff\x7f")],
)
def test_remaining_length(value: int, encoded: bytes) -> None:
    assert codec.encode_remaining_length(value) == encoded
    assert decode_remaining_length(b"\x30" + encoded) == (value, len(encoded))
    assert decode_remaining_length(b"xx" + encoded + b"junk", offset=2) == (value, len(encoded))
    for cut in range(len(encoded)):
        assert decode_remaining_length(b"\x30" + encoded[:cut]) is None
    assert decode_remaining_length(memoryview(b"\x30" + encoded)) == (value, len(encoded))


def test_remaining_length_limits() -> None:
    with pytest.raises(ProtocolError):
        decode_remaining_length(b"\x30\xff\xff\xff\xff\x01")
    with pytest.raises(ProtocolError):  # 4 continuation bytes is already malformed, however many follow
        decode_remaining_length(b"\x30\x80\x80\x80\x80")
    assert decode_remaining_length(b"\x30\x80\x00") == (0, 2)  # non-minimal but accepted
    with pytest.raises(ValueError):
        codec.encode_remaining_length(268435456)
    with pytest.raises(ValueError):
        codec.encode_remaining_length(-1)


def test_exception_hierarchy_and_reasons() -> None:
    assert ProtocolError("x").reason_code == 0x81
    assert ProtocolError("x", 0x82).message == "x"
    assert PacketTooLarge("x").reason_code == 0x95
    assert UnsupportedProtocol("x").reason_code == 0x84
    assert IdentifierRejected("x").reason_code == 0x85
    for cls in (PacketTooLarge, UnsupportedProtocol, IdentifierRejected):
        assert issubclass(cls, ProtocolError)


def test_encoder_argument_errors() -> None:
    with pytest.raises(ValueError):
        codec.encode_publish("t", b"", qos=1)
    with pytest.raises(ValueError):
        codec.encode_publish("t", b"", qos=3, packet_id=1)
    with pytest.raises(ValueError):
        codec.encode_puback(0)
    with pytest.raises(ValueError):
        codec.encode_suback(65536, [0])
    with pytest.raises(ValueError):
        codec.encode_publish("x" * 70000, b"")


# --- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [3, 4, 5])
def test_round_trip_session(loop: asyncio.AbstractEventLoop, level: int) -> None:
    """A whole provisioning conversation as one byte stream: read_packet consumes exactly one packet."""
    stream = (
        client_codec.encode_connect("dev-1", username="provision", password=b"pw", keep_alive=30, protocol_level=level)
        + client_codec.encode_subscribe(1, [("/provision/response", 1), ("a/+/#", 0)], protocol_level=level)
        + codec.encode_publish("/provision/request", b'{"a":1}', qos=1, packet_id=2, protocol_level=level)
        + codec.encode_puback(7, protocol_level=level)
        + client_codec.encode_pingreq()
        + client_codec.encode_unsubscribe(3, ["/provision/response"], protocol_level=level)
        + client_codec.encode_disconnect_client()
    )
    name = "MQIsdp" if level == 3 else "MQTT"

    async def run() -> list[Packet]:
        reader = asyncio.StreamReader()
        reader.feed_data(stream)
        reader.feed_eof()
        got = [await read_packet(reader, max_packet_size=1024, protocol_level=None)]
        while not reader.at_eof():
            got.append(await read_packet(reader, max_packet_size=1024, protocol_level=level))
        return got

    assert loop.run_until_complete(run()) == [
        Connect(name, level, "dev-1", True, 30, "provision", b"pw"),
        Subscribe(1, [("/provision/response", 1), ("a/+/#", 0)]),
        Publish("/provision/request", b'{"a":1}', qos=1, packet_id=2),
        PubAck(7),
        PingReq(),
        Unsubscribe(3, ["/provision/response"]),
        Disconnect(),
    ]


def test_round_trip_v5_properties() -> None:
    data = client_codec.encode_connect(
        "c",
        username="u",
        password=b"p",
        protocol_level=5,
        will_topic="w/t",
        will_payload=b"bye",
        will_qos=1,
        will_retain=True,
        properties={0x11: 30, 0x21: 10, 0x15: "SCRAM", 0x16: b"\x01", 0x26: [("a", "b"), ("a", "c")]},
        will_properties={0x18: 5, 0x01: 1, 0x03: "text/plain", 0x09: b"corr"},
    )
    assert dec(data, None) == Connect(
        "MQTT", 5, "c", True, 60, "u", b"p", "w/t", b"bye", 1, True,
        {0x11: 30, 0x21: 10, 0x15: "SCRAM", 0x16: b"\x01", 0x26: [("a", "b"), ("a", "c")]},
        {0x18: 5, 0x01: 1, 0x03: "text/plain", 0x09: b"corr"},
    )
    publish = codec.encode_publish("", b"x", protocol_level=5, properties={0x23: 4, 0x02: 2**32 - 1, 0x08: "r/t"})
    assert dec(publish, 5) == Publish("", b"x", properties={0x23: 4, 0x02: 2**32 - 1, 0x08: "r/t"})
    # Subscription identifier (varint) and options beyond QoS are accepted, only the QoS is kept.
    sub = raw(0x82, b"\x00\x01" + b"\x03\x0b\x80\x01" + s("f") + bytes((0b0010_1110,)))
    assert dec(sub, 5) == Subscribe(1, [("f", 2)])


# Strategies: strings MQTT accepts (no surrogates: codec="utf-8"; no U+0000).
_chars = st.characters(codec="utf-8", exclude_characters="\x00")
texts = st.text(_chars, max_size=20)
topic_names = st.text(st.characters(codec="utf-8", exclude_characters="\x00+#"), min_size=1, max_size=20)
topic_filters = st.text(_chars, min_size=1, max_size=20)
packet_ids = st.integers(1, 0xFFFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 2**32 - 1)
user_props = st.lists(st.tuples(texts, texts), min_size=1, max_size=3)
connect_props = st.fixed_dictionaries(
    {},
    optional={0x11: u32, 0x21: st.integers(1, 0xFFFF), 0x22: u16, 0x27: st.integers(1, 2**32 - 1),
              0x17: st.integers(0, 1), 0x19: st.integers(0, 1), 0x15: texts, 0x26: user_props},
)
will_props = st.fixed_dictionaries(
    {},
    optional={0x01: st.integers(0, 1), 0x02: u32, 0x03: texts, 0x08: topic_names, 0x09: st.binary(max_size=8),
              0x18: u32, 0x26: user_props},
)
publish_props = st.fixed_dictionaries(
    {},
    optional={0x01: st.integers(0, 1), 0x02: u32, 0x03: texts, 0x08: topic_names, 0x09: st.binary(max_size=8),
              0x23: st.integers(1, 0xFFFF), 0x26: user_props},
)
levels = st.sampled_from([3, 4, 5])

#: (encoded bytes, protocol level to decode with (None for CONNECT), expected packet)
Case = tuple[bytes, int | None, Packet]


@st.composite
def connect_cases(draw: Callable[..., Any]) -> Case:
    level = draw(levels)
    clean = draw(st.booleans())
    client_id = draw(texts)
    if not client_id and (level == 3 or not clean):
        client_id = "c"
    username = draw(st.none() | texts)
    password = draw(st.none() | st.binary(max_size=20))
    if username is None and level != 5:
        password = None
    keep_alive = draw(u16)
    props = draw(connect_props) if level == 5 else {}
    will = draw(st.booleans())
    will_topic = draw(topic_names) if will else None
    will_payload = draw(st.binary(max_size=20)) if will else None
    will_qos = draw(st.integers(0, 2)) if will else 0
    will_retain = draw(st.booleans()) if will else False
    wprops = draw(will_props) if will and level == 5 else {}
    data = client_codec.encode_connect(
        client_id, username=username, password=password, keep_alive=keep_alive, clean_session=clean,
        protocol_level=level, will_topic=will_topic, will_payload=will_payload or b"", will_qos=will_qos,
        will_retain=will_retain, properties=props, will_properties=wprops,
    )
    expected = Connect(
        "MQIsdp" if level == 3 else "MQTT", level, client_id, clean, keep_alive, username, password,
        will_topic, will_payload, will_qos, will_retain, props, wprops,
    )
    return data, None, expected


@st.composite
def publish_cases(draw: Callable[..., Any]) -> Case:
    level = draw(levels)
    qos = draw(st.integers(0, 2))
    packet_id = draw(packet_ids) if qos else None
    dup = draw(st.booleans()) if qos else False
    retain = draw(st.booleans())
    payload = draw(st.binary(max_size=300))
    props = draw(publish_props) if level == 5 else {}
    topic = "" if 0x23 in props and draw(st.booleans()) else draw(topic_names)
    data = codec.encode_publish(
        topic, payload, qos=qos, packet_id=packet_id, retain=retain, dup=dup, protocol_level=level, properties=props
    )
    return data, level, Publish(topic, payload, qos, retain, dup, packet_id, props)


@st.composite
def other_cases(draw: Callable[..., Any]) -> Case:
    level = draw(levels)
    kind = draw(st.sampled_from(["sub", "unsub", "puback", "ping", "disc", "pubrel"]))
    pid = draw(packet_ids)
    if kind == "sub":
        topics = draw(st.lists(st.tuples(topic_filters, st.integers(0, 2)), min_size=1, max_size=4))
        return client_codec.encode_subscribe(pid, topics, protocol_level=level), level, Subscribe(pid, topics)
    if kind == "unsub":
        filters = draw(st.lists(topic_filters, min_size=1, max_size=4))
        return client_codec.encode_unsubscribe(pid, filters, protocol_level=level), level, Unsubscribe(pid, filters)
    if kind == "puback":
        reason = draw(st.integers(0, 255)) if level == 5 else 0
        return codec.encode_puback(pid, reason_code=reason, protocol_level=level), level, PubAck(pid, reason)
    if kind == "ping":
        return client_codec.encode_pingreq(), level, PingReq()
    if kind == "disc":
        if level == 5:
            reason = draw(st.integers(0, 255))
            return codec.encode_disconnect(reason), level, Disconnect(reason)
        return client_codec.encode_disconnect_client(), level, Disconnect()
    body = pid.to_bytes(2, "big")
    return raw(0x62, body), level, OtherPacket(PacketType.PUBREL, 2, body)


cases = st.one_of(connect_cases(), publish_cases(), other_cases())


@FAST
@given(case=cases)
def test_valid_packets_round_trip(loop: asyncio.AbstractEventLoop, case: Case) -> None:
    data, level, expected = case
    assert read(loop, data, level) == expected
    assert dec(data, level) == expected
    # Exactly at the size limit is still fine.
    assert read(loop, data, level, max_size=len(data)) == expected


@FAST
@given(case=cases, data=st.data())
def test_truncated_packets_raise_incomplete_read(
    loop: asyncio.AbstractEventLoop, case: Case, data: st.DataObject
) -> None:
    packet, level, _ = case
    cut = data.draw(st.integers(0, len(packet) - 1))
    with pytest.raises(asyncio.IncompleteReadError):
        read(loop, packet[:cut], level)


@FAST
@given(case=cases, data=st.data())
def test_mutated_packets_never_crash(loop: asyncio.AbstractEventLoop, case: Case, data: st.DataObject) -> None:
    packet = bytearray(case[0])
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(packet) - 1))
        packet[index] ^= data.draw(st.integers(1, 255))
    level = data.draw(st.sampled_from([case[1], None, 3, 4, 5]))
    try:
        result = read(loop, bytes(packet), level, max_size=data.draw(st.sampled_from([BIG, 64])))
    except (ProtocolError, asyncio.IncompleteReadError):
        return
    assert isinstance(result, Packet)


def _framed(first: int, body: bytes) -> bytes:
    return raw(first, body)


_connect_heads = st.sampled_from([b"\x00\x04MQTT\x05", b"\x00\x04MQTT\x04", b"\x00\x06MQIsdp\x03"])
random_streams = st.one_of(
    st.binary(max_size=300),
    st.builds(_framed, st.integers(0, 255), st.binary(max_size=200)),
    st.builds(lambda head, flags, rest: raw(0x10, head + bytes((flags,)) + rest),
              _connect_heads, st.integers(0, 255), st.binary(max_size=120)),
    st.builds(lambda first, rest: raw(first, rest), st.sampled_from([0x30, 0x32, 0x34, 0x3A, 0x82, 0xA2, 0x40, 0xE0]),
              st.binary(max_size=120)),
)


@settings(max_examples=300, deadline=None)
@given(stream=random_streams, level=st.sampled_from([None, 3, 4, 5]))
def test_random_bytes_never_crash(loop: asyncio.AbstractEventLoop, stream: bytes, level: int | None) -> None:
    try:
        result = read(loop, stream, level)
    except (ProtocolError, asyncio.IncompleteReadError):
        return
    assert isinstance(result, Packet)


_PROPERTY_PREFIXES = {
    # kind: (first byte, level to decode with, bytes before the property block)
    "connect": (0x10, None, b"\x00\x04MQTT\x05\x02\x00\x3c"),
    "will": (0x10, None, b"\x00\x04MQTT\x05\x06\x00\x3c\x00\x00\x00\x01c"),
    "publish": (0x30, 5, b"\x00\x01t"),
    "subscribe": (0x82, 5, b"\x00\x01"),
    "unsubscribe": (0xA2, 5, b"\x00\x01"),
    "puback": (0x40, 5, b"\x00\x01\x00"),
    "disconnect": (0xE0, 5, b"\x00"),
}
_property_ids = st.sampled_from([0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x11, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1F,
                                 0x21, 0x22, 0x23, 0x24, 0x26, 0x27, 0x7F, 0x80])


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(sorted(_PROPERTY_PREFIXES)),
    entries=st.lists(st.tuples(_property_ids, st.binary(max_size=6)), max_size=4),
    lie=st.integers(-3, 3),
    tail=st.binary(max_size=12),
)
def test_random_property_blocks_never_crash(
    loop: asyncio.AbstractEventLoop, kind: str, entries: list[tuple[int, bytes]], lie: int, tail: bytes
) -> None:
    """Level 5 property blocks are the densest parser: random ids/values and a lying block length."""
    first, level, prefix = _PROPERTY_PREFIXES[kind]
    props = b"".join(bytes((pid,)) + value for pid, value in entries)
    packet = raw(first, prefix + codec.encode_remaining_length(max(0, len(props) + lie)) + props + tail)
    try:
        result = read(loop, packet, level)
    except (ProtocolError, asyncio.IncompleteReadError):
        return
    assert isinstance(result, Packet)


@FAST
@given(
    max_size=st.integers(2, 5000),
    excess=st.integers(1, 1 << 20),
    first=st.sampled_from([0x10, 0x30, 0x82, 0xC0]),
    level=st.sampled_from([None, 4, 5]),
    partial=st.binary(max_size=10),
)
def test_oversize_rejected_before_body(
    loop: asyncio.AbstractEventLoop, max_size: int, excess: int, first: int, level: int | None, partial: bytes
) -> None:
    # Choose a remaining length whose whole packet is `excess` bytes above the limit.
    length = max(0, max_size + excess - 2)
    while 1 + len(codec.encode_remaining_length(length)) + length <= max_size:
        length += 1
    header = bytes((first,)) + codec.encode_remaining_length(length)
    partial = partial[: max(0, length - 1)]

    async def run() -> bytes:
        reader = asyncio.StreamReader()
        reader.feed_data(header + partial)  # no EOF: reading the body would hang
        with pytest.raises(PacketTooLarge) as info:
            await asyncio.wait_for(read_packet(reader, max_packet_size=max_size, protocol_level=level), 1.0)
        assert info.value.reason_code == 0x95
        reader.feed_eof()
        return await reader.read()

    assert loop.run_until_complete(run()) == partial  # the body was left unread


def test_size_limit_counts_the_whole_packet(loop: asyncio.AbstractEventLoop) -> None:
    data = codec.encode_publish("t", b"x" * 200)  # 1 + 2 (length) + 3 + 200
    assert len(data) == 206
    assert isinstance(read(loop, data, 4, max_size=206), Publish)
    with pytest.raises(PacketTooLarge):
        read(loop, data, 4, max_size=205)


def test_non_connect_first_is_refused_without_reading_body(loop: asyncio.AbstractEventLoop) -> None:
    async def run() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(b"\x30\x7f")  # PUBLISH header, body never sent
        with pytest.raises(ProtocolError) as info:
            await asyncio.wait_for(read_packet(reader, max_packet_size=1000, protocol_level=None), 1.0)
        assert info.value.reason_code == 0x82

    loop.run_until_complete(run())


def test_long_remaining_length_via_reader(loop: asyncio.AbstractEventLoop) -> None:
    with pytest.raises(ProtocolError) as info:
        read(loop, b"\x30\xff\xff\xff\xff\x01", 4)
    assert type(info.value) is ProtocolError


# --- malformed and forbidden packets ------------------------------------------------------------------

MQTT = b"MQTT"
OK_PAYLOAD = s("cid")

MALFORMED: list[tuple[str, bytes, int | None, type[ProtocolError], int | None]] = [
    # (id, packet, level, exception class, reason code or None)
    ("connect-header-flags", raw(0x11, connect_body(MQTT, 4, 0x02, OK_PAYLOAD)), None, ProtocolError, 0x81),
    ("subscribe-flags-0", raw(0x80, b"\x00\x01" + s("t") + b"\x00"), 4, ProtocolError, 0x81),
    ("unsubscribe-flags-0", raw(0xA0, b"\x00\x01" + s("t")), 4, ProtocolError, 0x81),
    ("pubrel-flags-0", raw(0x60, b"\x00\x01"), 4, ProtocolError, 0x81),
    ("puback-flags", raw(0x42, b"\x00\x01"), 4, ProtocolError, 0x81),
    ("pingreq-flags", b"\xc1\x00", 4, ProtocolError, 0x81),
    ("disconnect-flags", b"\xe2\x00", 5, ProtocolError, 0x81),
    ("reserved-type-0", b"\x00\x00", 4, ProtocolError, 0x81),
    ("auth-before-v5", b"\xf0\x00", 4, ProtocolError, 0x81),
    ("publish-qos3", raw(0x36, s("t") + b"\x00\x01"), 4, ProtocolError, 0x81),
    ("publish-qos0-dup", raw(0x38, s("t")), 4, ProtocolError, 0x81),
    ("not-connect-first", b"\xc0\x00", None, ProtocolError, 0x82),
    ("second-connect", raw(0x10, connect_body(MQTT, 4, 0x02, OK_PAYLOAD)), 4, ProtocolError, 0x82),
    # protocol name / level
    ("mqtt-level-3", raw(0x10, connect_body(MQTT, 3, 0x02, OK_PAYLOAD)), None, UnsupportedProtocol, 0x84),
    ("mqisdp-level-4", raw(0x10, connect_body(b"MQIsdp", 4, 0x02, OK_PAYLOAD)), None, UnsupportedProtocol, 0x84),
    ("mqtt-level-6", raw(0x10, connect_body(MQTT, 6, 0x02, OK_PAYLOAD)), None, UnsupportedProtocol, 0x84),
    ("bridge-level", raw(0x10, connect_body(MQTT, 0x84, 0x02, OK_PAYLOAD)), None, UnsupportedProtocol, 0x84),
    ("other-name", raw(0x10, connect_body(b"HTTP", 4, 0x02, OK_PAYLOAD)), None, UnsupportedProtocol, 0x84),
    # CONNECT flags
    ("reserved-flag", raw(0x10, connect_body(MQTT, 4, 0x03, OK_PAYLOAD)), None, ProtocolError, 0x81),
    ("password-without-user-4",
     raw(0x10, connect_body(MQTT, 4, 0x42, OK_PAYLOAD + s("pw"))), None, ProtocolError, 0x81),
    ("password-without-user-3",
     raw(0x10, connect_body(b"MQIsdp", 3, 0x42, OK_PAYLOAD + s("pw"))), None, ProtocolError, 0x81),
    ("will-qos-without-will", raw(0x10, connect_body(MQTT, 4, 0x0A, OK_PAYLOAD)), None, ProtocolError, 0x81),
    ("will-retain-without-will", raw(0x10, connect_body(MQTT, 4, 0x22, OK_PAYLOAD)), None, ProtocolError, 0x81),
    ("will-qos-3", raw(0x10, connect_body(MQTT, 4, 0x1E, OK_PAYLOAD + s("w") + s("x"))), None, ProtocolError, 0x81),
    ("will-topic-wildcard",
     raw(0x10, connect_body(MQTT, 4, 0x06, OK_PAYLOAD + s("w/#") + s("x"))), None, ProtocolError, None),
    ("will-topic-empty",
     raw(0x10, connect_body(MQTT, 4, 0x06, OK_PAYLOAD + s("") + s("x"))), None, ProtocolError, None),
    # client identifier
    ("empty-id-not-clean-4", raw(0x10, connect_body(MQTT, 4, 0x00, s(""))), None, IdentifierRejected, 0x85),
    ("empty-id-3", raw(0x10, connect_body(b"MQIsdp", 3, 0x02, s(""))), None, IdentifierRejected, 0x85),
    ("empty-id-but-malformed", raw(0x10, connect_body(MQTT, 4, 0x00, s("") + b"x")), None, ProtocolError, 0x81),
    # strings
    ("client-id-bad-utf8", raw(0x10, connect_body(MQTT, 4, 0x02, s(b"\xff\xfe"))), None, ProtocolError, 0x81),
    ("client-id-nul", raw(0x10, connect_body(MQTT, 4, 0x02, s(b"a\x00b"))), None, ProtocolError, 0x81),
    ("client-id-overlong-nul", raw(0x10, connect_body(MQTT, 4, 0x02, s(b"a\xc0\x80"))), None, ProtocolError, 0x81),
    ("username-surrogate",
     raw(0x10, connect_body(MQTT, 4, 0x82, OK_PAYLOAD + s(b"\xed\xa0\x80"))), None, ProtocolError, 0x81),
    ("topic-surrogate", raw(0x30, s(b"a\xed\xb0\x80")), 4, ProtocolError, 0x81),
    ("topic-nul", raw(0x30, s(b"a\x00")), 4, ProtocolError, 0x81),
    ("topic-plus", raw(0x30, s("a/+/b")), 4, ProtocolError, None),
    ("topic-hash", raw(0x30, s("a/#")), 5, ProtocolError, None),
    ("topic-empty-4", raw(0x30, s("")), 4, ProtocolError, None),
    ("topic-empty-5-no-alias", raw(0x30, s("") + b"\x00"), 5, ProtocolError, None),
    # packet identifiers
    ("publish-pid-0", raw(0x32, s("t") + b"\x00\x00"), 4, ProtocolError, 0x81),
    ("puback-pid-0", raw(0x40, b"\x00\x00"), 4, ProtocolError, 0x81),
    ("subscribe-pid-0", raw(0x82, b"\x00\x00" + s("t") + b"\x00"), 4, ProtocolError, 0x81),
    ("unsubscribe-pid-0", raw(0xA2, b"\x00\x00" + s("t")), 4, ProtocolError, 0x81),
    # (un)subscribe payload
    ("subscribe-no-topics", raw(0x82, b"\x00\x01"), 4, ProtocolError, None),
    ("subscribe-no-topics-5", raw(0x82, b"\x00\x01\x00"), 5, ProtocolError, None),
    ("unsubscribe-no-topics", raw(0xA2, b"\x00\x01"), 4, ProtocolError, None),
    ("subscribe-qos-3", raw(0x82, b"\x00\x01" + s("t") + b"\x03"), 4, ProtocolError, 0x81),
    ("subscribe-reserved-bits-4", raw(0x82, b"\x00\x01" + s("t") + b"\x04"), 4, ProtocolError, 0x81),
    ("subscribe-reserved-bits-5", raw(0x82, b"\x00\x01\x00" + s("t") + b"\x40"), 5, ProtocolError, 0x81),
    ("subscribe-retain-handling-3", raw(0x82, b"\x00\x01\x00" + s("t") + b"\x30"), 5, ProtocolError, 0x82),
    ("subscribe-missing-options", raw(0x82, b"\x00\x01" + s("t")), 4, ProtocolError, 0x81),
    ("subscribe-empty-filter", raw(0x82, b"\x00\x01" + s("") + b"\x00"), 4, ProtocolError, 0x81),
    # truncation inside the declared length, and trailing garbage
    ("connect-truncated-name", raw(0x10, b"\x00\x04MQ"), None, ProtocolError, 0x81),
    ("connect-no-level", raw(0x10, s(MQTT)), None, ProtocolError, 0x81),
    ("connect-no-keepalive", raw(0x10, s(MQTT) + b"\x04\x02\x00"), None, ProtocolError, 0x81),
    ("connect-truncated-id", raw(0x10, connect_body(MQTT, 4, 0x02, b"\x00\x05ab")), None, ProtocolError, 0x81),
    ("connect-missing-username", raw(0x10, connect_body(MQTT, 4, 0x82, OK_PAYLOAD)), None, ProtocolError, 0x81),
    ("connect-trailing", raw(0x10, connect_body(MQTT, 4, 0x02, OK_PAYLOAD + b"\x00")), None, ProtocolError, 0x81),
    ("publish-truncated-topic", raw(0x30, b"\x00\x09abc"), 4, ProtocolError, 0x81),
    ("publish-missing-pid", raw(0x32, s("t") + b"\x00"), 4, ProtocolError, 0x81),
    ("puback-trailing-4", raw(0x40, b"\x00\x01\x00"), 4, ProtocolError, 0x81),
    ("puback-short", raw(0x40, b"\x00"), 4, ProtocolError, 0x81),
    ("puback-trailing-5", raw(0x40, b"\x00\x01\x00\x00\x00"), 5, ProtocolError, 0x81),
    ("pingreq-body", raw(0xC0, b"\x00"), 4, ProtocolError, 0x81),
    ("disconnect-body-4", raw(0xE0, b"\x00"), 4, ProtocolError, 0x81),
    ("disconnect-trailing-5", raw(0xE0, b"\x00\x00\x00"), 5, ProtocolError, 0x81),
    ("unsubscribe-truncated", raw(0xA2, b"\x00\x01\x00\x05ab"), 4, ProtocolError, 0x81),
    # v5 properties
    ("prop-unknown", raw(0x10, connect_body(MQTT, 5, 0x02, OK_PAYLOAD, b"\x02\x7f\x00")), None, ProtocolError, 0x81),
    ("prop-wrong-packet",
     raw(0x10, connect_body(MQTT, 5, 0x02, OK_PAYLOAD, b"\x03\x23\x00\x01")), None, ProtocolError, 0x81),
    ("prop-server-only", raw(0x30, s("t") + b"\x02\x24\x01"), 5, ProtocolError, 0x81),
    ("prop-sub-id-in-publish", raw(0x30, s("t") + b"\x02\x0b\x01"), 5, ProtocolError, 0x81),
    ("prop-repeated",
     raw(0x10, connect_body(MQTT, 5, 0x02, OK_PAYLOAD, b"\x06\x21\x00\x01\x21\x00\x02")), None, ProtocolError, 0x82),
    ("prop-receive-max-0",
     raw(0x10, connect_body(MQTT, 5, 0x02, OK_PAYLOAD, b"\x03\x21\x00\x00")), None, ProtocolError, 0x82),
    ("prop-bool-2", raw(0x10, connect_body(MQTT, 5, 0x02, OK_PAYLOAD, b"\x02\x17\x02")), None, ProtocolError, 0x82),
    ("prop-topic-alias-0", raw(0x30, s("") + b"\x03\x23\x00\x00"), 5, ProtocolError, 0x82),
    ("prop-auth-data-no-method",
     raw(0x10, connect_body(MQTT, 5, 0x02, OK_PAYLOAD, b"\x04\x16\x00\x01x")), None, ProtocolError, 0x82),
    ("prop-length-beyond-body", raw(0x30, s("t") + b"\x09\x01\x01"), 5, ProtocolError, 0x81),
    ("prop-value-beyond-block", raw(0x30, s("t") + b"\x02\x02\x00\x00\x00\x00\x00"), 5, ProtocolError, 0x81),
    ("prop-string-beyond-block", raw(0x30, s("t") + b"\x03\x03\x00\x05hello"), 5, ProtocolError, 0x81),
    ("prop-varint-too-long",
     raw(0x82, b"\x00\x01\x06\x0b\x80\x80\x80\x80\x01" + s("t") + b"\x00"), 5, ProtocolError, 0x81),
    ("prop-sub-id-0", raw(0x82, b"\x00\x01\x02\x0b\x00" + s("t") + b"\x00"), 5, ProtocolError, 0x82),
    ("prop-missing-block", raw(0x30, s("t")), 5, ProtocolError, 0x81),
    ("prop-user-bad-utf8", raw(0x30, s("t") + b"\x07\x26" + s("k") + s(b"\xff")), 5, ProtocolError, 0x81),
    ("prop-will-in-connect-block",
     raw(0x10, connect_body(MQTT, 5, 0x02, OK_PAYLOAD, b"\x05\x18\x00\x00\x00\x01")), None, ProtocolError, 0x81),
    ("prop-varint-truncated", raw(0x82, b"\x00\x01\x02\x0b\x80"), 5, ProtocolError, 0x81),
    ("prop-varint-beyond-block", raw(0x82, b"\x00\x01\x02\x0b\x80\x01" + s("t") + b"\x00"), 5, ProtocolError, 0x81),
    ("prop-byte-beyond-block", raw(0x30, s("t") + b"\x01\x01" + b"\x01"), 5, ProtocolError, 0x81),
    ("prop-u16-beyond-block", raw(0x30, s("t") + b"\x02\x23\x00" + b"\x01"), 5, ProtocolError, 0x81),
    ("prop-pair-beyond-block", raw(0x30, s("t") + b"\x06\x26" + s("k") + s("v")), 5, ProtocolError, 0x81),
    ("prop-puback-bad", raw(0x40, b"\x00\x01\x00\x02\x11\x00"), 5, ProtocolError, 0x81),
]


@pytest.mark.parametrize(
    ("packet", "level", "error", "reason"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_packets_are_rejected(
    loop: asyncio.AbstractEventLoop, packet: bytes, level: int | None, error: type[ProtocolError], reason: int | None
) -> None:
    for decode in (lambda: dec(packet, level), lambda: read(loop, packet, level)):
        with pytest.raises(ProtocolError) as info:
            decode()
        assert type(info.value) is error, info.value
        if reason is not None:
            assert info.value.reason_code == reason, info.value


ACCEPTED: list[tuple[str, bytes, int | None, Packet]] = [
    ("empty-id-clean-4",
     raw(0x10, connect_body(MQTT, 4, 0x02, s(""))), None, Connect("MQTT", 4, "", True, 60, None, None)),
    ("empty-id-clean-5",
     raw(0x10, connect_body(MQTT, 5, 0x02, s(""))), None, Connect("MQTT", 5, "", True, 60, None, None)),
    # MQTT 5 lets the server assign an identifier whatever Clean Start says (ThingsBoard's SDK reconnects so).
    ("empty-id-not-clean-5",
     raw(0x10, connect_body(MQTT, 5, 0x00, s(""))), None, Connect("MQTT", 5, "", False, 60, None, None)),
    ("long-id-3", raw(0x10, connect_body(b"MQIsdp", 3, 0x00, s("x" * 40))), None,
     Connect("MQIsdp", 3, "x" * 40, False, 60, None, None)),
    ("password-without-user-5", raw(0x10, connect_body(MQTT, 5, 0x42, OK_PAYLOAD + s("pw"))), None,
     Connect("MQTT", 5, "cid", True, 60, None, b"pw")),
    ("topic-alias-empty-topic",
     raw(0x30, s("") + b"\x03\x23\x00\x07" + b"hi"), 5, Publish("", b"hi", properties={0x23: 7})),
    ("user-props-repeat", raw(0x30, s("t") + b"\x0e\x26" + s("k") + s("1") + b"\x26" + s("k") + s("2")), 5,
     Publish("t", b"", properties={0x26: [("k", "1"), ("k", "2")]})),
    ("pubrel", raw(0x62, b"\x00\x05"), 5, OtherPacket(PacketType.PUBREL, 2, b"\x00\x05")),
    ("auth-5", raw(0xF0, b"\x18\x00"), 5, OtherPacket(PacketType.AUTH, 0, b"\x18\x00")),
    ("non-ascii", raw(0x30, s("tëst/日本") + "ü".encode()), 4, Publish("tëst/日本", "ü".encode())),
    ("puback-5-props", raw(0x40, b"\x00\x01\x10\x04\x1f" + s("x")), 5, PubAck(1, 0x10)),
    ("disconnect-5-props", raw(0xE0, b"\x04\x03\x1f" + s("")), 5, Disconnect(4)),
    ("subscribe-wildcards", raw(0x82, b"\x00\x01" + s("a/+/#") + b"\x02"), 4, Subscribe(1, [("a/+/#", 2)])),
]


@pytest.mark.parametrize(("packet", "level", "expected"), [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_edge_cases_accepted(
    loop: asyncio.AbstractEventLoop, packet: bytes, level: int | None, expected: Packet
) -> None:
    assert dec(packet, level) == expected
    assert read(loop, packet, level) == expected


def test_decode_accepts_memoryview_body() -> None:
    first, body = split(codec.encode_publish("t", b"x", qos=1, packet_id=1))
    assert decode_packet(first, memoryview(body), 4) == Publish("t", b"x", qos=1, packet_id=1)  # type: ignore[arg-type]


# --- real clients: paho-mqtt and mosquitto_pub against a capture server -----------------------------


class CaptureServer:
    """Answers just enough (CONNACK, SUBACK, PUBACK) for a client to go on, and records what
    read_packet decoded, per connection."""

    def __init__(self) -> None:
        self.packets: list[Packet] = []
        self.errors: list[BaseException] = []
        self.closed = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> CaptureServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        assert self.port != 1883
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        level: int | None = None
        try:
            while True:
                try:
                    packet = await read_packet(reader, max_packet_size=65536, protocol_level=level)
                except asyncio.IncompleteReadError:
                    break
                self.packets.append(packet)
                if isinstance(packet, Connect):
                    level = packet.protocol_level
                    writer.write(codec.encode_connack(0, protocol_level=level))
                elif isinstance(packet, Subscribe):
                    granted = [q for _, q in packet.topics]
                    writer.write(codec.encode_suback(packet.packet_id, granted, protocol_level=level or 4))
                elif isinstance(packet, Publish) and packet.packet_id is not None:
                    writer.write(codec.encode_puback(packet.packet_id, protocol_level=level or 4))
                elif isinstance(packet, PingReq):
                    writer.write(codec.encode_pingresp())
                elif isinstance(packet, Disconnect):
                    break
                await writer.drain()
        except Exception as exc:  # reported by the test
            self.errors.append(exc)
        finally:
            writer.close()
            self.closed.set()


REQUEST = b'{"provisionDeviceKey":"k","provisionDeviceSecret":"s"}'


def _run_paho(port: int, protocol: Any) -> None:
    """A real paho client's provisioning exchange (runs in a thread: paho's API blocks)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"paho-{protocol.value}", protocol=protocol)
    client.username_pw_set("provision")
    connected, subscribed = threading.Event(), threading.Event()
    client.on_connect = lambda *args: connected.set()
    client.on_subscribe = lambda *args: subscribed.set()
    properties = None
    if protocol == mqtt.MQTTv5:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 30
        properties.ReceiveMaximum = 10
        properties.UserProperty = ("k", "v")
    client.connect("127.0.0.1", port, keepalive=30, properties=properties)
    client.loop_start()
    try:
        assert connected.wait(5), "no CONNACK"
        client.subscribe("/provision/response", qos=1)
        assert subscribed.wait(5), "no SUBACK"
        info = client.publish("/provision/request", REQUEST, qos=1)
        info.wait_for_publish(5)
        assert info.is_published()
        client.disconnect()
    finally:
        client.loop_stop()


@pytest.mark.parametrize("level", [3, 4, 5])
async def test_paho_packets_decode(level: int) -> None:
    import paho.mqtt.client as mqtt

    protocol = {3: mqtt.MQTTv31, 4: mqtt.MQTTv311, 5: mqtt.MQTTv5}[level]
    async with CaptureServer() as server:
        await asyncio.wait_for(asyncio.to_thread(_run_paho, server.port, protocol), 10)
        await asyncio.wait_for(server.closed.wait(), 5)
    assert not server.errors
    connect, subscribe, publish, disconnect = server.packets
    assert connect == Connect(
        "MQIsdp" if level == 3 else "MQTT", level, f"paho-{level}", True, 30, "provision", None,
        properties={0x11: 30, 0x21: 10, 0x26: [("k", "v")]} if level == 5 else {},
    )
    assert isinstance(subscribe, Subscribe)
    assert subscribe.topics == [("/provision/response", 1)]
    assert isinstance(publish, Publish)
    assert publish.packet_id is not None
    assert publish == Publish("/provision/request", REQUEST, qos=1, packet_id=publish.packet_id)
    assert disconnect == Disconnect(0)


MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"


@pytest.mark.skipif(not Path(MOSQUITTO_PUB).exists(), reason="mosquitto_pub not installed")
@pytest.mark.parametrize(("version", "level"), [("31", 3), ("311", 4), ("5", 5)])
async def test_mosquitto_pub_packets_decode(version: str, level: int) -> None:
    async with CaptureServer() as server:
        proc = await asyncio.create_subprocess_exec(
            MOSQUITTO_PUB, "-h", "127.0.0.1", "-p", str(server.port), "-V", version, "-u", "provision",
            "-t", "/provision/request", "-m", "{}", "-q", "1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        await asyncio.wait_for(server.closed.wait(), 5)
    assert proc.returncode == 0, err
    assert not server.errors
    connect, publish, disconnect = server.packets
    assert isinstance(connect, Connect)
    if level == 3:
        assert connect.client_id  # 3.1 needs one: mosquitto generates it (3.1.1 and 5 send "")
    assert connect == Connect(
        "MQIsdp" if level == 3 else "MQTT", level, connect.client_id, True, 60, "provision", None,
        properties=connect.properties,
    )
    assert isinstance(publish, Publish)
    assert publish == Publish(
        "/provision/request", b"{}", qos=1, packet_id=publish.packet_id, properties=publish.properties
    )
    assert publish.packet_id
    assert isinstance(disconnect, Disconnect)
