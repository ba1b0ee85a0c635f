"""ThingsBoard's MQTT device-API topics (``MqttTopics``, ``TopicType``) and how a device session routes them.

Pure functions and constants, no I/O: :func:`route_publish` says what a PUBLISH of an authenticated
device is, :func:`classify_filter` what a SUBSCRIBE filter is, :func:`parse_request_id` reads the id
at the end of a request/response topic as ThingsBoard's ``Integer.parseInt`` does.

Two topic families carry JSON, as in ThingsBoard (``TopicType``): ``v1/devices/me/...`` and the short
``v2/...`` (with or without the ``j`` = JSON marker). The ``p`` (protobuf) variants, claiming and
firmware/software updates are ThingsBoard topics this gateway does not serve: a publish there is answered
as an unknown topic and a subscription to them is refused, so that a device never waits for something
that cannot come.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from provisioning_common.mqtt_topics import TELEMETRY_TOPIC

__all__ = [
    "TELEMETRY",
    "ATTRIBUTES",
    "Family",
    "V1",
    "V2",
    "V2_JSON",
    "Kind",
    "Route",
    "route_publish",
    "Subscription",
    "classify_filter",
    "parse_request_id",
    "filter_matches",
]

TELEMETRY = TELEMETRY_TOPIC  # "v1/devices/me/telemetry"
ATTRIBUTES = "v1/devices/me/attributes"
#: ThingsBoard's gateway API: served only for gateway devices, which this gateway has none of.
GATEWAY_PREFIX = "v1/gateway"


@dataclass(frozen=True)
class Family:
    """ThingsBoard's ``TopicType``: where a session's answers and downlink messages go. The family of the
    request (attributes, client-side RPC) or of the subscription (updates, server-side RPC) is used."""

    name: str
    #: Shared-attribute updates are published here (and client attributes may be published here).
    attributes: str
    attributes_request: str
    attributes_response: str
    #: Server-side RPCs are published to ``rpc_request + id``; a device's client-side RPC comes on it.
    rpc_request: str
    #: A device answers a server-side RPC on ``rpc_response + id``; its client-side RPC is answered there.
    rpc_response: str


V1 = Family("v1", ATTRIBUTES, ATTRIBUTES + "/request/", ATTRIBUTES + "/response/",
            "v1/devices/me/rpc/request/", "v1/devices/me/rpc/response/")
V2 = Family("v2", "v2/a", "v2/a/req/", "v2/a/res/", "v2/r/req/", "v2/r/res/")
V2_JSON = Family("v2/j", "v2/a/j", "v2/a/req/j/", "v2/a/res/j/", "v2/r/req/j/", "v2/r/res/j/")
#: The protobuf variants (``v2/.../p``): ThingsBoard topics this gateway does not serve.
_PROTO = Family("v2/p", "v2/a/p", "v2/a/req/p/", "v2/a/res/p/", "v2/r/req/p/", "v2/r/res/p/")


class Kind(enum.Enum):
    TELEMETRY = "telemetry"
    ATTRIBUTES = "attributes"
    ATTRIBUTES_REQUEST = "attributes request"
    #: A device's answer to a server-side RPC.
    RPC_RESPONSE = "rpc response"
    #: A device's client-side RPC.
    RPC_REQUEST = "rpc request"
    #: ``v1/gateway/...`` from a device that is no gateway: ThingsBoard ignores it (no PUBACK).
    GATEWAY = "gateway"
    #: Anything else, including the ThingsBoard topics this gateway does not serve: PUBACK 0x90.
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Route:
    kind: Kind
    family: Family = V1
    #: The text after the family's prefix (request and response topics), as sent.
    request_id: str = ""


_UNKNOWN = Route(Kind.UNKNOWN)


def route_publish(topic: str) -> Route:
    """What an authenticated device's PUBLISH to ``topic`` is, in ThingsBoard's order of checks."""
    if topic.startswith(GATEWAY_PREFIX):
        return Route(Kind.GATEWAY)
    if topic == ATTRIBUTES:
        return Route(Kind.ATTRIBUTES)
    if topic == TELEMETRY:
        return Route(Kind.TELEMETRY)
    if topic.startswith(V1.attributes_request):
        return Route(Kind.ATTRIBUTES_REQUEST, V1, topic[len(V1.attributes_request):])
    if topic.startswith(V1.rpc_response):
        return Route(Kind.RPC_RESPONSE, V1, topic[len(V1.rpc_response):])
    if topic.startswith(V1.rpc_request):
        return Route(Kind.RPC_REQUEST, V1, topic[len(V1.rpc_request):])
    if not topic.startswith("v2/"):
        return _UNKNOWN
    if topic in ("v2/t", "v2/t/j"):
        return Route(Kind.TELEMETRY)
    if topic in (V2.attributes, V2_JSON.attributes):
        return Route(Kind.ATTRIBUTES)
    # The JSON and protobuf prefixes are longer than the plain short ones: checked first, as ThingsBoard does.
    for kind, field in ((Kind.RPC_RESPONSE, "rpc_response"), (Kind.RPC_REQUEST, "rpc_request"),
                        (Kind.ATTRIBUTES_REQUEST, "attributes_request")):
        for family in (V2_JSON, _PROTO, V2):
            prefix: str = getattr(family, field)
            if topic.startswith(prefix):
                return _UNKNOWN if family is _PROTO else Route(kind, family, topic[len(prefix):])
    return _UNKNOWN


class Subscription(enum.Enum):
    #: Shared-attribute updates are delivered to the family's ``attributes`` topic from now on.
    ATTRIBUTE_UPDATES = "attribute updates"
    #: Server-side RPCs are delivered to the family's ``rpc_request`` prefix from now on.
    RPC_REQUESTS = "rpc requests"
    #: Granted; answers published there follow the granted QoS (attribute/RPC responses, gateway topics).
    GRANTED = "granted"
    #: Not a filter of ThingsBoard's device API (or one of the topics not served): 0x8F / 0x80.
    REFUSED = "refused"


_RESPONSE_FILTERS = frozenset(
    [f.rpc_response + "+" for f in (V1, V2, V2_JSON)]
    + [f.attributes_response + "+" for f in (V1, V2, V2_JSON)]
    + ["v1/gateway/attributes", "v1/gateway/rpc", "v1/gateway/attributes/response"]
)
_UPDATE_FILTERS = {f.attributes: f for f in (V1, V2, V2_JSON)}
_RPC_FILTERS = {f.rpc_request + "+": f for f in (V1, V2, V2_JSON)}


def classify_filter(topic_filter: str) -> tuple[Subscription, Family | None]:
    """ThingsBoard's ``processSubscribe`` switch: exact filters only (``#``, ``v1/devices/me/#`` and
    shared subscriptions are refused there too)."""
    family = _UPDATE_FILTERS.get(topic_filter)
    if family is not None:
        return Subscription.ATTRIBUTE_UPDATES, family
    family = _RPC_FILTERS.get(topic_filter)
    if family is not None:
        return Subscription.RPC_REQUESTS, family
    if topic_filter in _RESPONSE_FILTERS:
        return Subscription.GRANTED, None
    return Subscription.REFUSED, None


_JAVA_INT = re.compile(r"[+-]?[0-9]{1,10}")


def parse_request_id(text: str) -> int | None:
    """A request id as ThingsBoard reads it (``Integer.parseInt``): optional sign, ASCII digits, 32-bit
    range; None otherwise. The answer goes to the id as a number (``007`` is answered on ``7``)."""
    if not _JAVA_INT.fullmatch(text):
        return None
    value = int(text)
    return value if -(2**31) <= value < 2**31 else None


def filter_matches(topic_filter: str, topic: str) -> bool:
    """MQTT wildcard matching of a topic name against a filter (``+`` one level, ``#`` the rest)."""
    if topic_filter == topic:
        return True
    filter_levels = topic_filter.split("/")
    levels = topic.split("/")
    for i, part in enumerate(filter_levels):
        if part == "#":
            return True
        if i >= len(levels):
            return False
        if part != "+" and part != levels[i]:
            return False
    return len(filter_levels) == len(levels)
