"""Bridge-mode topic schemes, request ids and rate-limit keys: pure functions, no I/O.

Two ways for a device to ask, both answered on a topic that only it may read (the broker's ACL
grants ``provision/response/<own client id>`` to each client):

* MQTT 5: PUBLISH to ``provision/request`` with the Response Topic and Correlation Data properties.
  The Response Topic must be ``provision/response/<one level>`` (we recommend the client id): the
  bridge never publishes outside ``provision/response/``, whatever a device asks for.
* MQTT 3.1.1 (or 5): PUBLISH to ``provision/request/<client id>``; the answer goes to
  ``provision/response/<client id>`` (a Response Topic property on this topic is not followed,
  since only the topic's client id is vouched for by the ACL), echoing Correlation Data if present.

Anything else on ``provision/request/#`` is ignored and counted, as are retained messages.
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

    #: Not ``provision/request`` nor ``provision/request/<one level>``.
    TOPIC = "ignored_topic"
    #: ``provision/request`` without a Response Topic (an MQTT 3.1.1 client on the MQTT 5 topic).
    NO_RESPONSE_TOPIC = "ignored_no_response_topic"
    #: A Response Topic outside ``provision/response/<one level>``.
    BAD_RESPONSE_TOPIC = "ignored_bad_response_topic"
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
    """Decide where the answer to a message on ``topic`` goes, or why there is none."""
    if topic == REQUEST_TOPIC:
        if not response_topic:
            return Ignored.NO_RESPONSE_TOPIC
        client = response_topic[len(RESPONSE_PREFIX):] if response_topic.startswith(RESPONSE_PREFIX) else ""
        if not is_single_level(client):
            return Ignored.BAD_RESPONSE_TOPIC
        return Route(response_topic, correlation_data, client)
    if topic.startswith(REQUEST_TOPIC + "/"):
        client = topic[len(REQUEST_TOPIC) + 1:]
        if is_single_level(client):
            return Route(RESPONSE_PREFIX + client, correlation_data, client)
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

    The device's network address is the broker's business and never reaches us; the client id
    is the closest thing to a source we have (namespaced so it never equals an IP address key).
    A guesser can change client ids, which is why the per-provision-key limit remains the real
    brake, exactly as for HTTP clients behind changing addresses.
    """
    return f"mqtt-client:{target.client_id}"
