"""The MQTT gateway's packet codec: the shared wire format plus what only a server sends.

Decoding and the encoders both sides use live in ``provisioning_common.mqtt_packets`` (re-exported
here, so the gateway reads one module); this module adds CONNACK, SUBACK, UNSUBACK, PINGRESP and the
server's DISCONNECT. What only a client sends (CONNECT, SUBSCRIBE, ...) is in
``provisioning_common.mqtt_client_packets``, for tests and bench/: the gateway carries none of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from provisioning_common.mqtt_packets import (
    CLIENT_IDENTIFIER_NOT_VALID,
    MALFORMED,
    MAX_VARINT,
    PACKET_TOO_LARGE,
    PROTOCOL_ERROR,
    TOPIC_NAME_INVALID,
    UNSUPPORTED_PROTOCOL_VERSION,
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
    encode_packet,
    encode_packet_id,
    encode_properties,
    encode_puback,
    encode_publish,
    encode_remaining_length,
    read_packet,
)

__all__ = [
    # the shared wire format (provisioning_common.mqtt_packets)
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
    "encode_publish",
    "encode_puback",
    # what only a server sends
    "encode_connack",
    "encode_suback",
    "encode_unsuback",
    "encode_pingresp",
    "encode_disconnect",
]


def encode_connack(
    return_code: int,
    *,
    session_present: bool = False,
    protocol_level: int = 4,
    properties: bytes | Mapping[int, object] = b"",
) -> bytes:
    """CONNACK (``return_code`` is the 3.1/3.1.1 return code or the level 5 reason code).

    ``properties`` (level 5 only) is either a mapping (encoded with :func:`encode_properties`) or
    the already encoded property *entries without their length prefix* (the codec adds it; empty
    gives the empty block ``00``). Session present is only sent with return code 0 (spec), and
    never at level 3 (3.1 has no such flag).
    """
    ack_flags = 1 if session_present and return_code == 0 and protocol_level != 3 else 0
    if protocol_level == 5:
        if isinstance(properties, (bytes, bytearray, memoryview)):
            block = encode_remaining_length(len(properties)) + bytes(properties)
        else:
            block = encode_properties(properties)
        return encode_packet(0x20, bytes((ack_flags, return_code)), block)
    return bytes((0x20, 2, ack_flags, return_code))


def encode_suback(packet_id: int, return_codes: list[int], *, protocol_level: int = 4) -> bytes:
    """SUBACK with one return/reason code per requested filter."""
    pid = encode_packet_id(packet_id)
    if protocol_level == 5:
        return encode_packet(0x90, pid, b"\x00", bytes(return_codes))
    return encode_packet(0x90, pid, bytes(return_codes))


def encode_unsuback(packet_id: int, reason_codes: int | Sequence[int], *, protocol_level: int = 4) -> bytes:
    """UNSUBACK. Before level 5 it has no payload; level 5 carries one reason code per topic filter of
    the UNSUBSCRIBE: ``reason_codes`` lists them, or is their number (all 0x00, success)."""
    pid = encode_packet_id(packet_id)
    if protocol_level == 5:
        codes = bytes(reason_codes) if isinstance(reason_codes, int) else bytes(reason_codes)
        return encode_packet(0xB0, pid, b"\x00", codes)
    return b"\xb0\x02" + pid


def encode_pingresp() -> bytes:
    return b"\xd0\x00"


def encode_disconnect(reason_code: int = 0, *, protocol_level: int = 5) -> bytes:
    """Server DISCONNECT: exists only at level 5; for 3.1/3.1.1 returns ``b""`` (the server just
    closes the connection)."""
    if protocol_level != 5:
        return b""
    if reason_code == 0:
        return b"\xe0\x00"
    return bytes((0xE0, 1, reason_code))
