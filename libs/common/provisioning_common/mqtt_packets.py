"""The MQTT 3.1 / 3.1.1 / 5 wire format both ends of a connection share: decoding and common encoders.

Used by the MQTT gateway (``mqtt_gateway.codec`` adds what only a server sends) and by clients that
speak raw MQTT (tests, ``bench/``, with ``mqtt_client_packets`` for what only a client sends).

Why hand-written: the gateway needs about ten packet types, no routing, hard limits it controls
(maximum packet size before the body is read) and speed (thousands of connections per second), see
``/work/shared/notes/libraries.md`` §1.

Shape:

* **sans-IO decoding**: :func:`decode_remaining_length` and :func:`decode_packet` work on bytes
  that are already in memory, so they are trivially testable and fuzzable. :func:`decode_packet`
  maps what a client sends to dataclasses; what only a server sends (CONNACK, SUBACK, ...) comes back
  as :class:`OtherPacket`, which is what a client reading the server's answers inspects;
* one small asyncio helper, :func:`read_packet`, which reads exactly one packet from a
  :class:`asyncio.StreamReader` and refuses oversize packets *before* reading their body;
* encoders that return ready-to-write ``bytes``: PUBLISH and PUBACK (both sides send them), property
  blocks, and the pieces (:func:`encode_str`, :func:`encode_packet`, ...) the one-sided encoders use.

Every problem with what a peer sent is a :class:`ProtocolError` (or a subclass). The server
closes that one connection; nothing else may escape from decoding (no ``IndexError``,
``UnicodeDecodeError``, ``struct.error``...), which the tests check with random and mutated input.
The ``reason_code`` of the error is the MQTT 5 reason code the server may put in a DISCONNECT.

Protocol levels: 3 = MQTT 3.1 (protocol name ``MQIsdp``), 4 = MQTT 3.1.1 and 5 = MQTT 5 (both
``MQTT``); only level 5 has properties.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeAlias, cast

__all__ = [
    "MALFORMED",
    "PROTOCOL_ERROR",
    "UNSUPPORTED_PROTOCOL_VERSION",
    "CLIENT_IDENTIFIER_NOT_VALID",
    "TOPIC_NAME_INVALID",
    "PACKET_TOO_LARGE",
    "MAX_VARINT",
    "ProtocolError",
    "PacketTooLarge",
    "UnsupportedProtocol",
    "IdentifierRejected",
    "PacketType",
    "Connect",
    "Publish",
    "PubAck",
    "Subscribe",
    "Unsubscribe",
    "PingReq",
    "Disconnect",
    "OtherPacket",
    "Packet",
    "decode_remaining_length",
    "encode_remaining_length",
    "decode_packet",
    "read_packet",
    "encode_properties",
    "encode_str",
    "encode_bin",
    "encode_u16",
    "encode_packet",
    "encode_packet_id",
    "encode_publish",
    "encode_puback",
]


# MQTT 5 reason codes used by the errors below.
MALFORMED = 0x81
PROTOCOL_ERROR = 0x82
UNSUPPORTED_PROTOCOL_VERSION = 0x84
CLIENT_IDENTIFIER_NOT_VALID = 0x85
TOPIC_NAME_INVALID = 0x90
PACKET_TOO_LARGE = 0x95

#: The largest value a variable byte integer can hold (4 bytes of 7 bits).
MAX_VARINT = 268_435_455


# --- errors -------------------------------------------------------------------------------------


class ProtocolError(Exception):
    """Malformed or forbidden packet: the server closes that connection (and only that one)."""

    def __init__(self, message: str, reason_code: int = MALFORMED) -> None:
        super().__init__(message)
        self.message = message
        #: MQTT 5 reason code (0x81 malformed, 0x82 protocol error, 0x95 packet too large, ...).
        self.reason_code = reason_code


class PacketTooLarge(ProtocolError):
    """The declared size exceeds the server's limit; raised before the body is read, so a client
    cannot make us buffer (or wait for) megabytes it announced."""

    def __init__(self, message: str, reason_code: int = PACKET_TOO_LARGE) -> None:
        super().__init__(message, reason_code)


class UnsupportedProtocol(ProtocolError):
    """CONNECT with a protocol name/level pair we do not speak. Distinct so that the server can
    answer CONNACK 0x01 (3.1/3.1.1) / 0x84 (5) instead of just closing, as the spec asks."""

    def __init__(self, message: str, reason_code: int = UNSUPPORTED_PROTOCOL_VERSION) -> None:
        super().__init__(message, reason_code)


class IdentifierRejected(ProtocolError):
    """CONNECT with a client identifier the spec does not allow (empty where it must not be).
    Distinct so that the server can answer CONNACK 0x02 (3.1/3.1.1) / 0x85 (5) at the client's level."""

    def __init__(
        self, message: str, reason_code: int = CLIENT_IDENTIFIER_NOT_VALID, *, protocol_level: int = 4
    ) -> None:
        super().__init__(message, reason_code)
        self.protocol_level = protocol_level


# --- packets --------------------------------------------------------------------------------------


class PacketType(enum.IntEnum):
    """Control packet types: the high nibble of the first byte."""

    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


@dataclass(slots=True)
class Connect:
    """A decoded CONNECT. ``properties`` (level 5 only) maps property id to value; user
    properties (0x26) are a list of ``(name, value)`` pairs because they may repeat."""

    protocol_name: str
    protocol_level: int
    client_id: str
    clean_session: bool
    keep_alive: int
    username: str | None
    password: bytes | None
    will_topic: str | None = None
    will_payload: bytes | None = None
    will_qos: int = 0
    will_retain: bool = False
    properties: dict[int, object] = field(default_factory=dict)
    #: Level 5 will properties (only with a will). Kept apart from ``properties`` because the
    #: same ids (e.g. 0x26) may appear in both blocks with different meaning.
    will_properties: dict[int, object] = field(default_factory=dict)


@dataclass(slots=True)
class Publish:
    """A decoded PUBLISH; ``packet_id`` is set exactly when ``qos`` > 0."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: dict[int, object] = field(default_factory=dict)


@dataclass(slots=True)
class PubAck:
    """A client's PUBACK (acknowledging our QoS 1 PUBLISH). PUBREC/PUBREL/PUBCOMP are not
    mapped here: we never use QoS 2, so they come back as :class:`OtherPacket`."""

    packet_id: int
    reason_code: int = 0


@dataclass(slots=True)
class Subscribe:
    """``topics`` are ``(filter, requested qos)``; for level 5 the qos is the low two bits of the
    subscription options (the other options are validated, then dropped: the gateway ignores them)."""

    packet_id: int
    topics: list[tuple[str, int]]


@dataclass(slots=True)
class Unsubscribe:
    packet_id: int
    topics: list[str]


@dataclass(slots=True)
class PingReq:
    pass


@dataclass(slots=True)
class Disconnect:
    """``reason_code`` is always 0 before level 5 (no reason on the wire)."""

    reason_code: int = 0


@dataclass(slots=True)
class OtherPacket:
    """A well-framed packet a client may send but the gateway does not handle (PUBREC, PUBREL,
    PUBCOMP, AUTH) or must not send (CONNACK, SUBACK...): the server decides (it closes)."""

    packet_type: PacketType
    flags: int
    body: bytes


Packet: TypeAlias = Connect | Publish | PubAck | Subscribe | Unsubscribe | PingReq | Disconnect | OtherPacket


# --- variable byte integers -------------------------------------------------------------------------


def decode_remaining_length(data: bytes | bytearray | memoryview, offset: int = 1) -> tuple[int, int] | None:
    """Decode the variable byte integer at ``data[offset:]``.

    Returns ``(value, number_of_bytes)`` or ``None`` when ``data`` ends before the integer does
    (the caller needs more bytes). More than 4 bytes is malformed: the bound keeps a hostile client
    from announcing absurd lengths. Non-minimal encodings (``80 00``) are accepted, as most brokers do.
    The default offset 1 skips the fixed header's first byte.
    """
    end = len(data)
    if offset >= end:
        return None
    byte = data[offset]
    if byte < 0x80:  # the common case: lengths below 128
        return byte, 1
    value = byte & 0x7F
    for i in range(1, 4):
        if offset + i >= end:
            return None
        byte = data[offset + i]
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return value, i + 1
    raise ProtocolError("variable byte integer longer than 4 bytes")


_SMALL_VARINTS = [bytes((i,)) for i in range(128)]


def encode_remaining_length(value: int) -> bytes:
    """Encode ``value`` (0..268435455) as a variable byte integer; ValueError outside that range."""
    if 0 <= value < 128:
        return _SMALL_VARINTS[value]
    if not 0 <= value <= MAX_VARINT:
        raise ValueError(f"variable byte integer out of range: {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# --- low-level readers (all bounded by ``end``; raise ProtocolError, never IndexError) ------------

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_pack_u16 = _U16.pack
_pack_u32 = _U32.pack


def _truncated(what: str) -> ProtocolError:
    return ProtocolError(f"truncated {what}")


def _read_u16(buf: bytes, pos: int, end: int, what: str) -> int:
    if pos + 2 > end:
        raise _truncated(what)
    return (buf[pos] << 8) | buf[pos + 1]


def _read_str(buf: bytes, pos: int, end: int, what: str) -> tuple[str, int]:
    """A UTF-8 string (2-byte length prefix). Python's strict UTF-8 decoder already rejects
    overlong forms and surrogates, which MQTT forbids; U+0000 is checked on the raw bytes
    (in UTF-8 a 0 byte can only be U+0000)."""
    if pos + 2 > end:
        raise _truncated(what)
    stop = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
    if stop > end:
        raise _truncated(what)
    raw = buf[pos + 2 : stop]
    if b"\x00" in raw:
        raise ProtocolError(f"{what} contains U+0000")
    try:
        return raw.decode("utf-8"), stop
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not valid UTF-8") from None


def _read_bin(buf: bytes, pos: int, end: int, what: str) -> tuple[bytes, int]:
    """Binary data (2-byte length prefix)."""
    if pos + 2 > end:
        raise _truncated(what)
    stop = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
    if stop > end:
        raise _truncated(what)
    return buf[pos + 2 : stop], stop


def _check_topic_name(topic: str, what: str) -> None:
    """Topic *names* (PUBLISH, will) must not contain wildcards."""
    if "+" in topic or "#" in topic:
        raise ProtocolError(f"{what} contains a wildcard: {topic!r}", TOPIC_NAME_INVALID)


# --- MQTT 5 properties ------------------------------------------------------------------------------

# Property value types.
_BYTE, _TWO, _FOUR, _VARINT, _UTF8, _BINARY, _PAIR = range(7)

# Where a client may send a property: bit per context.
_C_CONNECT, _C_WILL, _C_PUBLISH, _C_ACK, _C_SUBSCRIBE, _C_UNSUBSCRIBE, _C_DISCONNECT, _C_SERVER = (
    1 << i for i in range(8)
)
_C_ALL = (1 << 8) - 1

#: id -> (value type, contexts a *client* may send it in; _C_SERVER = server-to-client only).
_PROPERTIES: dict[int, tuple[int, int]] = {
    0x01: (_BYTE, _C_WILL | _C_PUBLISH),  # Payload Format Indicator
    0x02: (_FOUR, _C_WILL | _C_PUBLISH),  # Message Expiry Interval
    0x03: (_UTF8, _C_WILL | _C_PUBLISH),  # Content Type
    0x08: (_UTF8, _C_WILL | _C_PUBLISH),  # Response Topic
    0x09: (_BINARY, _C_WILL | _C_PUBLISH),  # Correlation Data
    0x0B: (_VARINT, _C_SUBSCRIBE),  # Subscription Identifier (client PUBLISH must not carry it)
    0x11: (_FOUR, _C_CONNECT | _C_DISCONNECT | _C_SERVER),  # Session Expiry Interval
    0x12: (_UTF8, _C_SERVER),  # Assigned Client Identifier
    0x13: (_TWO, _C_SERVER),  # Server Keep Alive
    0x15: (_UTF8, _C_CONNECT | _C_SERVER),  # Authentication Method
    0x16: (_BINARY, _C_CONNECT | _C_SERVER),  # Authentication Data
    0x17: (_BYTE, _C_CONNECT),  # Request Problem Information
    0x18: (_FOUR, _C_WILL),  # Will Delay Interval
    0x19: (_BYTE, _C_CONNECT),  # Request Response Information
    0x1A: (_UTF8, _C_SERVER),  # Response Information
    0x1C: (_UTF8, _C_SERVER),  # Server Reference
    0x1F: (_UTF8, _C_ACK | _C_DISCONNECT | _C_SERVER),  # Reason String
    0x21: (_TWO, _C_CONNECT | _C_SERVER),  # Receive Maximum
    0x22: (_TWO, _C_CONNECT | _C_SERVER),  # Topic Alias Maximum
    0x23: (_TWO, _C_PUBLISH | _C_SERVER),  # Topic Alias
    0x24: (_BYTE, _C_SERVER),  # Maximum QoS
    0x25: (_BYTE, _C_SERVER),  # Retain Available
    0x26: (_PAIR, _C_ALL),  # User Property (may repeat)
    0x27: (_FOUR, _C_CONNECT | _C_SERVER),  # Maximum Packet Size
    0x28: (_BYTE, _C_SERVER),  # Wildcard Subscription Available
    0x29: (_BYTE, _C_SERVER),  # Subscription Identifier Available
    0x2A: (_BYTE, _C_SERVER),  # Shared Subscription Available
}

#: Properties whose value must be 0 or 1, and those for which 0 is a protocol error.
_BOOLEAN_PROPERTIES = frozenset({0x01, 0x17, 0x19})
_NONZERO_PROPERTIES = frozenset({0x0B, 0x21, 0x23, 0x27})
_USER_PROPERTY = 0x26


def _decode_properties(buf: bytes, pos: int, context: int, what: str) -> tuple[dict[int, object], int]:
    """Decode a level 5 property block (varint length, then id/value pairs) at ``buf[pos:]``.

    An id unknown or not valid in this packet is malformed (MQTT 5 §2.2.2.2); a repeated id
    (other than the user property) or an out-of-range value is a protocol error. Values never
    read past the block's own end, so a lying length cannot pull payload bytes into a property.
    """
    limit = len(buf)
    if pos >= limit:
        raise _truncated(f"{what} properties")
    length = buf[pos]
    if length == 0:  # by far the most common block
        return {}, pos + 1
    decoded = decode_remaining_length(buf, pos)
    if decoded is None:
        raise _truncated(f"{what} property length")
    length, size = decoded
    pos += size
    end = pos + length
    if end > limit:
        raise _truncated(f"{what} properties")
    props: dict[int, object] = {}
    while pos < end:
        pid = buf[pos]
        pos += 1
        spec = _PROPERTIES.get(pid)
        if spec is None or not spec[1] & context:
            raise ProtocolError(f"property 0x{pid:02x} is not valid in {what}")
        kind = spec[0]
        value: object
        if kind == _BYTE:
            if pos >= end:
                raise _truncated(f"{what} property 0x{pid:02x}")
            value = buf[pos]
            pos += 1
        elif kind == _TWO:
            value = _read_u16(buf, pos, end, f"{what} property 0x{pid:02x}")
            pos += 2
        elif kind == _FOUR:
            if pos + 4 > end:
                raise _truncated(f"{what} property 0x{pid:02x}")
            value = int.from_bytes(buf[pos : pos + 4], "big")
            pos += 4
        elif kind == _VARINT:
            decoded = decode_remaining_length(buf, pos)
            if decoded is None or pos + decoded[1] > end:
                raise _truncated(f"{what} property 0x{pid:02x}")
            value = decoded[0]
            pos += decoded[1]
        elif kind == _UTF8:
            value, pos = _read_str(buf, pos, end, f"{what} property 0x{pid:02x}")
        elif kind == _BINARY:
            value, pos = _read_bin(buf, pos, end, f"{what} property 0x{pid:02x}")
        else:  # _PAIR
            name, pos = _read_str(buf, pos, end, f"{what} user property name")
            text, pos = _read_str(buf, pos, end, f"{what} user property value")
            pairs = props.get(pid)
            if pairs is None:
                props[pid] = [(name, text)]
            else:
                cast(list[tuple[str, str]], pairs).append((name, text))
            continue
        if pid in props:
            raise ProtocolError(f"property 0x{pid:02x} repeated in {what}", PROTOCOL_ERROR)
        if pid in _BOOLEAN_PROPERTIES and value not in (0, 1):
            raise ProtocolError(f"property 0x{pid:02x} must be 0 or 1 in {what}", PROTOCOL_ERROR)
        if pid in _NONZERO_PROPERTIES and value == 0:
            raise ProtocolError(f"property 0x{pid:02x} must not be 0 in {what}", PROTOCOL_ERROR)
        props[pid] = value
    return props, pos


def encode_properties(properties: Mapping[int, object] | None) -> bytes:
    """Encode property id/value pairs as a complete level 5 property block (length included).

    Values: int for byte/two/four-byte/varint properties, str for strings, bytes for binary data,
    a list of ``(name, value)`` pairs for the user property (0x26). Unknown ids or wrong value
    types are programming errors (ValueError / TypeError), not protocol errors.
    """
    if not properties:
        return b"\x00"
    out = bytearray()
    for pid, value in properties.items():
        spec = _PROPERTIES.get(pid)
        if spec is None:
            raise ValueError(f"unknown property id 0x{pid:02x}")
        kind = spec[0]
        if kind == _PAIR:
            for name, text in cast(list[tuple[str, str]], value):
                out.append(pid)
                out += encode_str(name)
                out += encode_str(text)
            continue
        out.append(pid)
        if kind == _UTF8:
            out += encode_str(cast(str, value))
        elif kind == _BINARY:
            out += encode_bin(cast(bytes, value))
        elif kind == _BYTE:
            out.append(cast(int, value))
        elif kind == _TWO:
            out += _pack_u16(cast(int, value))
        elif kind == _FOUR:
            out += _pack_u32(cast(int, value))
        else:  # _VARINT
            out += encode_remaining_length(cast(int, value))
    return encode_remaining_length(len(out)) + bytes(out)


# --- decoding ---------------------------------------------------------------------------------------

# Fixed-header flags a packet type must carry (PUBLISH is checked separately).
_REQUIRED_FLAGS = (None, 0, 0, None, 0, 0, 2, 0, 2, 0, 2, 0, 0, 0, 0, 0)


def decode_packet(first_byte: int, body: bytes, protocol_level: int | None) -> Packet:
    """Decode one packet from its first byte and its body (everything after the remaining length).

    ``protocol_level`` is the level negotiated by CONNECT, or ``None`` before it: then only
    CONNECT is valid (and a second CONNECT afterwards is a protocol error). CONNECT determines its
    own level from the body. Raises :class:`ProtocolError` (or a subclass) for anything malformed
    or forbidden, including bytes left over after the last field.
    """
    if not isinstance(body, bytes):
        body = bytes(body)
    ptype = (first_byte >> 4) & 0x0F
    flags = first_byte & 0x0F
    if protocol_level is None:
        if ptype != PacketType.CONNECT:
            raise ProtocolError("the first packet must be CONNECT", PROTOCOL_ERROR)
        return _decode_connect(flags, body)
    v5 = protocol_level == 5
    if ptype == PacketType.PUBLISH:  # the hot path
        return _decode_publish(flags, body, v5)
    required = _REQUIRED_FLAGS[ptype]
    if ptype == 0 or (ptype == PacketType.AUTH and not v5):
        raise ProtocolError(f"reserved packet type {ptype}")
    if flags != required:
        raise ProtocolError(f"invalid fixed header flags 0x{flags:x} for {PacketType(ptype).name}")
    if ptype == PacketType.PUBACK:
        return _decode_puback(body, v5)
    if ptype == PacketType.PINGREQ:
        if body:
            raise ProtocolError("PINGREQ has a body")
        return PingReq()
    if ptype == PacketType.SUBSCRIBE:
        return _decode_subscribe(body, v5)
    if ptype == PacketType.UNSUBSCRIBE:
        return _decode_unsubscribe(body, v5)
    if ptype == PacketType.DISCONNECT:
        return _decode_disconnect(body, v5)
    if ptype == PacketType.CONNECT:
        raise ProtocolError("second CONNECT", PROTOCOL_ERROR)
    return OtherPacket(PacketType(ptype), flags, body)


def _decode_connect(flags: int, body: bytes) -> Connect:
    if flags:
        raise ProtocolError(f"invalid fixed header flags 0x{flags:x} for CONNECT")
    end = len(body)
    name, pos = _read_str(body, 0, end, "protocol name")
    if pos >= end:
        raise _truncated("CONNECT protocol level")
    level = body[pos]
    pos += 1
    # Checked before anything else: later fields may be laid out differently at other levels.
    if not ((level == 4 or level == 5) and name == "MQTT" or level == 3 and name == "MQIsdp"):
        raise UnsupportedProtocol(f"unsupported protocol {name!r} level {level}")
    if pos + 3 > end:
        raise _truncated("CONNECT header")
    cflags = body[pos]
    keep_alive = (body[pos + 1] << 8) | body[pos + 2]
    pos += 3
    if cflags & 0x01:
        raise ProtocolError("reserved CONNECT flag set")
    clean = bool(cflags & 0x02)
    will = bool(cflags & 0x04)
    will_qos = (cflags >> 3) & 0x03
    will_retain = bool(cflags & 0x20)
    has_password = bool(cflags & 0x40)
    has_username = bool(cflags & 0x80)
    if will:
        if will_qos == 3:
            raise ProtocolError("will QoS 3")
    elif will_qos or will_retain:
        raise ProtocolError("will QoS/retain set without the will flag")
    if has_password and not has_username and level != 5:
        raise ProtocolError("password flag without username flag")
    properties: dict[int, object] = {}
    if level == 5:
        properties, pos = _decode_properties(body, pos, _C_CONNECT, "CONNECT")
        if 0x16 in properties and 0x15 not in properties:
            raise ProtocolError("authentication data without authentication method", PROTOCOL_ERROR)
    client_id, pos = _read_str(body, pos, end, "client identifier")
    will_properties: dict[int, object] = {}
    will_topic: str | None = None
    will_payload: bytes | None = None
    if will:
        if level == 5:
            will_properties, pos = _decode_properties(body, pos, _C_WILL, "will")
        will_topic, pos = _read_str(body, pos, end, "will topic")
        if not will_topic:
            raise ProtocolError("empty will topic")
        _check_topic_name(will_topic, "will topic")
        will_payload, pos = _read_bin(body, pos, end, "will payload")
    username: str | None = None
    password: bytes | None = None
    if has_username:
        username, pos = _read_str(body, pos, end, "username")
    if has_password:
        password, pos = _read_bin(body, pos, end, "password")
    if pos != end:
        raise ProtocolError("trailing bytes after CONNECT payload")
    # Last, so that a malformed packet is reported as such rather than as a bad identifier.
    # 3.1 requires 1..23 characters (we accept longer, as brokers do); 3.1.1 allows an empty
    # identifier only for a clean session (MQTT-3.1.3-7); 5 allows it whatever Clean Start says,
    # and the server assigns one (MQTT-3.1.3-6; ThingsBoard's SDK reconnects that way).
    if not client_id and (level == 3 or (level == 4 and not clean)):
        raise IdentifierRejected("empty client identifier", protocol_level=level)
    return Connect(
        name,
        level,
        client_id,
        clean,
        keep_alive,
        username,
        password,
        will_topic,
        will_payload,
        will_qos,
        will_retain,
        properties,
        will_properties,
    )


def _decode_publish(flags: int, body: bytes, v5: bool) -> Publish:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise ProtocolError("PUBLISH with QoS 3")
    dup = bool(flags & 0x08)
    if dup and not qos:
        raise ProtocolError("QoS 0 PUBLISH with DUP set")
    end = len(body)
    topic, pos = _read_str(body, 0, end, "topic name")
    packet_id: int | None = None
    if qos:
        packet_id = _read_u16(body, pos, end, "PUBLISH packet identifier")
        if not packet_id:
            raise ProtocolError("PUBLISH packet identifier 0")
        pos += 2
    properties: dict[int, object] = {}
    if v5:
        properties, pos = _decode_properties(body, pos, _C_PUBLISH, "PUBLISH")
    if topic:
        _check_topic_name(topic, "topic name")
    elif 0x23 not in properties:  # level 5 may send an empty name with a topic alias
        raise ProtocolError("empty topic name", PROTOCOL_ERROR)
    return Publish(topic, body[pos:], qos, bool(flags & 0x01), dup, packet_id, properties)


def _decode_puback(body: bytes, v5: bool) -> PubAck:
    end = len(body)
    packet_id = _read_u16(body, 0, end, "PUBACK")
    if not packet_id:
        raise ProtocolError("PUBACK packet identifier 0")
    if end == 2:
        return PubAck(packet_id)
    if not v5:
        raise ProtocolError("trailing bytes after PUBACK")
    reason_code = body[2]
    if end > 3:
        _, pos = _decode_properties(body, 3, _C_ACK, "PUBACK")
        if pos != end:
            raise ProtocolError("trailing bytes after PUBACK")
    return PubAck(packet_id, reason_code)


def _decode_subscribe(body: bytes, v5: bool) -> Subscribe:
    end = len(body)
    packet_id = _read_u16(body, 0, end, "SUBSCRIBE")
    if not packet_id:
        raise ProtocolError("SUBSCRIBE packet identifier 0")
    pos = 2
    if v5:
        _, pos = _decode_properties(body, pos, _C_SUBSCRIBE, "SUBSCRIBE")
    reserved = 0xC0 if v5 else 0xFC
    topics: list[tuple[str, int]] = []
    while pos < end:
        topic, pos = _read_str(body, pos, end, "topic filter")
        if pos >= end:
            raise _truncated("subscription options")
        options = body[pos]
        pos += 1
        if options & reserved:
            raise ProtocolError("reserved subscription option bits set")
        if options & 0x03 == 3:
            raise ProtocolError("subscription with QoS 3")
        if options & 0x30 == 0x30:
            raise ProtocolError("retain handling 3", PROTOCOL_ERROR)
        if not topic:
            raise ProtocolError("empty topic filter")
        topics.append((topic, options & 0x03))
    if not topics:
        raise ProtocolError("SUBSCRIBE without topic filters", PROTOCOL_ERROR)
    return Subscribe(packet_id, topics)


def _decode_unsubscribe(body: bytes, v5: bool) -> Unsubscribe:
    end = len(body)
    packet_id = _read_u16(body, 0, end, "UNSUBSCRIBE")
    if not packet_id:
        raise ProtocolError("UNSUBSCRIBE packet identifier 0")
    pos = 2
    if v5:
        _, pos = _decode_properties(body, pos, _C_UNSUBSCRIBE, "UNSUBSCRIBE")
    topics: list[str] = []
    while pos < end:
        topic, pos = _read_str(body, pos, end, "topic filter")
        if not topic:
            raise ProtocolError("empty topic filter")
        topics.append(topic)
    if not topics:
        raise ProtocolError("UNSUBSCRIBE without topic filters", PROTOCOL_ERROR)
    return Unsubscribe(packet_id, topics)


def _decode_disconnect(body: bytes, v5: bool) -> Disconnect:
    if not body:
        return Disconnect()
    if not v5:
        raise ProtocolError("DISCONNECT has a body")
    reason_code = body[0]
    if len(body) > 1:
        _, pos = _decode_properties(body, 1, _C_DISCONNECT, "DISCONNECT")
        if pos != len(body):
            raise ProtocolError("trailing bytes after DISCONNECT")
    return Disconnect(reason_code)


async def read_packet(
    reader: asyncio.StreamReader,
    *,
    max_packet_size: int,
    protocol_level: int | None,
    idle_timeout: float | None = None,
    packet_timeout: float | None = None,
) -> Packet:
    """Read and decode exactly one packet.

    ``max_packet_size`` bounds the whole packet (fixed header included); a larger declared size
    raises :class:`PacketTooLarge` *before* the body is read, so the body bytes stay unread and
    we never wait for them. Truncation surfaces as the stream reports it
    (:class:`asyncio.IncompleteReadError`, an ``EOFError``), which is left to propagate.

    Deadlines (``None``: none), each raising :class:`TimeoutError`: ``idle_timeout`` bounds the wait
    for the packet's first byte (keep-alive, idle connections); ``packet_timeout`` bounds the time from
    that first byte to the packet's last, so that half a packet followed by silence cannot hold a
    connection (and its descriptor) open for as long as the idle deadline allows.
    """
    if (idle_timeout is None and packet_timeout is None) or _whole_packet_buffered(reader, 0):
        # Every packet has at least two bytes (type + one length byte): one await instead of two. A packet
        # already received whole (a client's SUBSCRIBE and PUBLISH in one segment) needs no deadline: nothing
        # below waits for the network, so neither deadline could pass.
        head = await reader.readexactly(2)
        return await _read_after_head(reader, head[0], head[1], max_packet_size, protocol_level)
    try:
        async with asyncio.timeout(idle_timeout):
            first = await reader.readexactly(1)
    except TimeoutError:
        raise TimeoutError(f"no packet within {idle_timeout:g} s") from None
    if _whole_packet_buffered(reader, -1):
        # The usual case: the rest of the packet came with its first byte.
        second = await reader.readexactly(1)
        return await _read_after_head(reader, first[0], second[0], max_packet_size, protocol_level)
    try:
        async with asyncio.timeout(packet_timeout):
            second = await reader.readexactly(1)
            return await _read_after_head(reader, first[0], second[0], max_packet_size, protocol_level)
    except TimeoutError:
        raise TimeoutError(f"packet incomplete {packet_timeout:g} s after its first byte") from None


def _whole_packet_buffered(reader: asyncio.StreamReader, offset: int) -> bool:
    """Whether ``reader`` already holds a whole packet whose first byte is at ``offset`` of its buffer
    (-1: that byte was just read). Reads asyncio's ``StreamReader._buffer`` (there since Python 3.4); a
    reader without it is never "buffered", which only costs the deadlines' timers."""
    buffered = getattr(reader, "_buffer", None)
    if not isinstance(buffered, bytearray):
        return False
    have = len(buffered)
    length = shift = 0
    pos = offset + 1  # the first remaining-length byte
    while True:
        if pos >= have or shift > 21:  # not here yet, or malformed (left to _read_after_head to refuse)
            return False
        byte = buffered[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return have - pos >= length
        shift += 7


async def _read_after_head(
    reader: asyncio.StreamReader, first: int, byte: int, max_packet_size: int, protocol_level: int | None
) -> Packet:
    """The rest of a packet whose first two bytes (type, first length byte) were read."""
    length = byte & 0x7F
    size = 1
    while byte & 0x80:
        if size == 4:
            raise ProtocolError("remaining length longer than 4 bytes")
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << (7 * size)
        size += 1
    if 1 + size + length > max_packet_size:
        raise PacketTooLarge(f"packet of {1 + size + length} bytes exceeds the limit of {max_packet_size}")
    if protocol_level is None and first >> 4 != PacketType.CONNECT:
        # No need to read the body of a packet we refuse anyway.
        raise ProtocolError("the first packet must be CONNECT", PROTOCOL_ERROR)
    body = await reader.readexactly(length) if length else b""
    return decode_packet(first, body, protocol_level)


# --- encoding (what both sides send, and the pieces of every packet) ---------------------------------


def encode_str(text: str) -> bytes:
    """A UTF-8 string with its 2-byte length prefix."""
    raw = text.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError("string longer than 65535 bytes")
    return _pack_u16(len(raw)) + raw


def encode_bin(data: bytes) -> bytes:
    """Binary data with its 2-byte length prefix."""
    if len(data) > 0xFFFF:
        raise ValueError("binary data longer than 65535 bytes")
    return _pack_u16(len(data)) + data


def encode_u16(value: int) -> bytes:
    """A two-byte integer (keep-alive, packet identifiers)."""
    return _pack_u16(value)


def encode_packet(first_byte: int, *parts: bytes) -> bytes:
    """Fixed header + parts, joined in one allocation."""
    length = sum(map(len, parts))
    return b"".join((bytes((first_byte,)), encode_remaining_length(length), *parts))


def encode_packet_id(packet_id: int) -> bytes:
    """A packet identifier (1..65535); ValueError outside that range."""
    if not 0 < packet_id <= 0xFFFF:
        raise ValueError(f"packet identifier out of range: {packet_id}")
    return _pack_u16(packet_id)


def encode_publish(
    topic: str,
    payload: bytes,
    *,
    qos: int = 0,
    packet_id: int | None = None,
    retain: bool = False,
    dup: bool = False,
    protocol_level: int = 4,
    properties: Mapping[int, object] | None = None,
) -> bytes:
    """PUBLISH. ``packet_id`` is required for QoS 1/2 and ignored for QoS 0. The topic is not
    validated (tests use this to build invalid packets); ``properties`` is level 5 only."""
    if not 0 <= qos <= 2:
        raise ValueError(f"invalid QoS {qos}")
    parts = [encode_str(topic)]
    if qos:
        if packet_id is None:
            raise ValueError("QoS > 0 PUBLISH needs a packet identifier")
        parts.append(encode_packet_id(packet_id))
    if protocol_level == 5:
        parts.append(encode_properties(properties))
    parts.append(payload)
    return encode_packet(0x30 | (dup << 3) | (qos << 1) | retain, *parts)


def encode_puback(packet_id: int, *, reason_code: int = 0, protocol_level: int = 4) -> bytes:
    """PUBACK. Level 5 uses the short 2-byte form for success and ``id + reason`` otherwise (the
    property length may be omitted when there are no properties)."""
    pid = encode_packet_id(packet_id)
    if protocol_level == 5 and reason_code:
        return b"\x40\x03" + pid + bytes((reason_code,))
    return b"\x40\x02" + pid
