"""What only an MQTT client sends: CONNECT, SUBSCRIBE, UNSUBSCRIBE, PINGREQ and the client's DISCONNECT.

For raw-socket clients (the tests, the load generators in ``bench/``, interop checks); PUBLISH,
PUBACK and decoding are in :mod:`provisioning_common.mqtt_packets`. The MQTT gateway never imports
this module: a server has no use for it.
"""

from __future__ import annotations

from collections.abc import Mapping

from .mqtt_packets import encode_bin, encode_packet, encode_packet_id, encode_properties, encode_str, encode_u16

__all__ = ["encode_connect", "encode_subscribe", "encode_unsubscribe", "encode_pingreq", "encode_disconnect_client"]


def encode_connect(
    client_id: str,
    *,
    username: str | None = None,
    password: bytes | str | None = None,
    keep_alive: int = 60,
    clean_session: bool = True,
    protocol_level: int = 4,
    will_topic: str | None = None,
    will_payload: bytes = b"",
    will_qos: int = 0,
    will_retain: bool = False,
    properties: Mapping[int, object] | None = None,
    will_properties: Mapping[int, object] | None = None,
) -> bytes:
    """CONNECT as a client sends it (level 3 uses protocol name ``MQIsdp``). Flags are written as
    given, without validation, so tests can build packets the decoder must refuse."""
    name = b"\x00\x06MQIsdp" if protocol_level == 3 else b"\x00\x04MQTT"
    cflags = 0x02 if clean_session else 0
    payload = [encode_str(client_id)]
    if will_topic is not None:
        cflags |= 0x04 | (will_qos << 3) | (0x20 if will_retain else 0)
        if protocol_level == 5:
            payload.append(encode_properties(will_properties))
        payload.append(encode_str(will_topic))
        payload.append(encode_bin(will_payload))
    if username is not None:
        cflags |= 0x80
        payload.append(encode_str(username))
    if password is not None:
        cflags |= 0x40
        payload.append(encode_bin(password.encode("utf-8") if isinstance(password, str) else password))
    header = name + bytes((protocol_level, cflags)) + encode_u16(keep_alive)
    if protocol_level == 5:
        header += encode_properties(properties)
    return encode_packet(0x10, header, *payload)


def encode_subscribe(packet_id: int, topics: list[tuple[str, int]], protocol_level: int = 4) -> bytes:
    """SUBSCRIBE; the int is the requested QoS (level 5: the whole options byte)."""
    parts = [encode_packet_id(packet_id)]
    if protocol_level == 5:
        parts.append(b"\x00")
    for topic, options in topics:
        parts.append(encode_str(topic))
        parts.append(bytes((options,)))
    return encode_packet(0x82, *parts)


def encode_unsubscribe(packet_id: int, topics: list[str], protocol_level: int = 4) -> bytes:
    parts = [encode_packet_id(packet_id)]
    if protocol_level == 5:
        parts.append(b"\x00")
    parts.extend(encode_str(topic) for topic in topics)
    return encode_packet(0xA2, *parts)


def encode_pingreq() -> bytes:
    return b"\xc0\x00"


def encode_disconnect_client() -> bytes:
    """Client DISCONNECT, valid at every level (level 5: reason 0 may be omitted)."""
    return b"\xe0\x00"
