"""Bridge-mode topic schemes, request ids and rate-limit keys: pure functions, no I/O.

A device asks on ``provision/request/<its client id>`` and is answered on
``provision/response/<its client id>``. The client id in the request topic is the only identity the
bridge can trust: the broker's ACL lets each client write ``provision/request/%c`` (its own id) and
read ``provision/response/%c``, so the broker vouches that the request came from that client. An MQTT 5
device may add Correlation Data (echoed) and a Response Topic, which must then be its own response
topic: a Response Topic that names anyone else is refused and counted (issue 14: an answer, or a
rate-limit refusal, pushed onto another client's topic). The bare ``provision/request`` carries no
vouched identity and is ignored, as is anything else on ``provision/request/#`` and retained messages.
Rate-limit keys come from the topic's client id too, never from the message.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

# The topic names and the level rule are shared with broker_auth, which holds provisioning clients to them.
from provisioning_common.mqtt_topics import REQUEST_FILTER, REQUEST_TOPIC, RESPONSE_PREFIX, is_single_level

__all__ = [
    "REQUEST_FILTER",
    "REQUEST_TOPIC",
    "RESPONSE_PREFIX",
    "Ignored",
    "Route",
    "is_single_level",
    "rate_limit_key",
    "request_id",
    "route",
    "subscription",
]


class Ignored(str, enum.Enum):
    """Why a message on ``provision/request/#`` got no answer."""

    #: Not ``provision/request/<one level>``.
    TOPIC = "ignored_topic"
    #: The bare ``provision/request``: the broker vouches for no client id there, so nobody to answer.
    NO_CLIENT_ID = "ignored_no_client_id"
    #: A Response Topic that is not the asking client's own ``provision/response/<client id>``.
    FOREIGN_RESPONSE_TOPIC = "refused_foreign_response_topic"
    #: A retained message (handed out on subscribing), not a request made now.
    RETAINED = "ignored_retained"


@dataclass(frozen=True)
class Route:
    """Where and how to answer one request."""

    response_topic: str
    correlation_data: bytes | None
    #: The client the answer is for (the response topic's last level).
    client_id: str


def subscription(share_group: str) -> str:
    """The bridge's topic filter: a shared subscription when a group is set (Mosquitto, EMQX)."""
    return f"$share/{share_group}/{REQUEST_FILTER}" if share_group else REQUEST_FILTER


def route(topic: str, response_topic: str | None, correlation_data: bytes | None) -> Route | Ignored:
    """Decide where the answer to a message on ``topic`` goes, or why there is none.

    Only ``provision/request/<client id>`` is answered, on ``provision/response/<client id>``; a
    Response Topic, when set, must be exactly that (anything else names another client, or no client).
    """
    if topic == REQUEST_TOPIC:
        return Ignored.NO_CLIENT_ID
    if topic.startswith(REQUEST_TOPIC + "/"):
        client = topic[len(REQUEST_TOPIC) + 1:]
        if is_single_level(client):
            own = RESPONSE_PREFIX + client
            if response_topic and response_topic != own:
                return Ignored.FOREIGN_RESPONSE_TOPIC
            return Route(own, correlation_data, client)
    return Ignored.TOPIC


def request_id(topic: str, payload: bytes, target: Route) -> str:
    """The provision request id of one MQTT message, the same for every delivery of it.

    A broker redelivers a message (after a bridge crash, or a device retransmits with DUP) with
    the same topic, payload and properties but possibly another packet id, and packet ids are
    per-hop anyway; so the id hashes what a redelivery keeps: the request topic, the response
    topic (which names the client), the device's Correlation Data and the payload. The core
    replays the first answer for a request id it has seen (for an hour), so duplicates never
    create a second device. The other side of this: the same client sending the very same bytes
    (and, on MQTT 5, the same Correlation Data) again within the hour gets the first answer
    again; a device that wants a fresh attempt changes its Correlation Data or its request.
    """
    digest = hashlib.sha256()
    for part in (b"mqtt-bridge/1", topic.encode(), target.response_topic.encode(), target.correlation_data or b"",
                 payload):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return "mqtt-bridge:" + digest.hexdigest()


def rate_limit_key(target: Route) -> str:
    """What the core's per-source failure limit counts for a bridged request.

    The device's network address is the broker's business and never reaches us; the client id of the
    request topic, which the broker's ACL vouches for (never anything the message says), is the closest
    thing to a source we have (namespaced so it never equals an IP address key).
    A guesser can change client ids, as an HTTP client can change addresses: there is no per-key limit
    (issue 13: it let anyone holding the key lock every device of the profile out), and with ~103-bit
    provision secrets guessing is hopeless anyway; the broker's own connection limits bound the rest.
    """
    return f"mqtt-client:{target.client_id}"
