"""Who may connect and which topics they may use: pure decision functions, no I/O.

Three kinds of broker user:

* provisioning clients: username ``provision`` (any password), client id = a single topic level
  without wildcards. They may publish to ``provision/request`` and ``provision/request/<own id>``
  and subscribe to ``provision/response/<own id>`` only.
* devices: credentials the credentials service knows (ThingsBoard's token as username, Innoway's
  token as password, MQTT_BASIC per spec §9). Their topics are the operator's business, except the
  provisioning topics: no device may read or write anything under ``provision/``, nor subscribe to a
  filter that could match it (``#``, ``+/...``).
* the bridge itself is not ours to admit: it is an account in the broker's own user store (see the
  README), so that a device can never obtain its rights through this endpoint.
"""

from __future__ import annotations

import enum

from mqtt_bridge import topics
from provisioning_common.models import AuthenticateRequest

PROVISION = "provision"
#: AMQP topic wildcards: an MQTT client id containing one would become a wildcard in RabbitMQ's routing key.
_AMQP_WILDCARDS = frozenset("*#")
MAX_CLIENT_ID = 256


class Verdict(str, enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    #: Not for us (EMQX goes on with the next authenticator in its chain).
    IGNORE = "ignore"


def is_provisioning(username: str | None) -> bool:
    return username == PROVISION


def provisioning_client_ok(client_id: str | None) -> bool:
    """A client id that can safely name a response topic (MQTT level, AMQP word, ACL ``%c``/``${clientid}``)."""
    return (
        client_id is not None
        and len(client_id) <= MAX_CLIENT_ID
        and topics.is_single_level(client_id)
        and not _AMQP_WILDCARDS.intersection(client_id)
    )


def credential_attempts(client_id: str, username: str, password: str) -> list[AuthenticateRequest]:
    """What to ask the credentials service, in the MQTT gateway's order (first match wins).

    MQTT_BASIC by client id / username / password, which falls back to the username as a
    ThingsBoard access token (spec §9); then the password as an Innoway access token.
    """
    attempts: list[AuthenticateRequest] = []
    if client_id or username:
        attempts.append(AuthenticateRequest(client_id=client_id, username=username, password=password))
    if password:
        attempts.append(AuthenticateRequest(token=password))
    return attempts


def provisioning_acl(client_id: str) -> list[dict[str, str]]:
    """EMQX (5.8+) ACL returned with an allowed provisioning client: its own topics, nothing else."""
    return [
        {"permission": "allow", "action": "publish", "topic": f"eq {topics.REQUEST_TOPIC}"},
        {"permission": "allow", "action": "publish", "topic": f"eq {topics.REQUEST_TOPIC}/{client_id}"},
        {"permission": "allow", "action": "subscribe", "topic": f"eq {topics.RESPONSE_PREFIX}{client_id}"},
        {"permission": "deny", "action": "all", "topic": "#"},
    ]


# --- RabbitMQ (rabbitmq_auth_backend_http) -------------------------------------------------------


def amqp_key(mqtt_topic: str) -> str:
    """RabbitMQ's MQTT-to-AMQP topic translation (``/`` -> ``.``, ``+`` -> ``*``; ``#`` stays)."""
    return mqtt_topic.replace("/", ".").replace("+", "*")


def overlaps_provisioning(routing_key: str) -> bool:
    """Whether a routing key or binding pattern can touch ``provision.#``.

    Its first word decides: ``provision`` itself, or a wildcard (``*`` or ``#``), which matches it.
    """
    first = routing_key.split(".", 1)[0]
    return first in ("provision", "*", "#")


def rabbitmq_topic(username: str, permission: str, routing_key: str, client_id: str | None) -> Verdict:
    """``/auth/topic``: ``permission`` is ``write`` (publish) or ``read`` (subscribe, ``routing_key`` = filter)."""
    if is_provisioning(username):
        if not provisioning_client_ok(client_id):
            return Verdict.DENY  # no client id from the broker (RabbitMQ < 3.8): nothing is safe to allow
        assert client_id is not None
        if permission == "write":
            allowed = {amqp_key(topics.REQUEST_TOPIC), amqp_key(f"{topics.REQUEST_TOPIC}/{client_id}")}
        elif permission == "read":
            allowed = {amqp_key(f"{topics.RESPONSE_PREFIX}{client_id}")}
        else:
            allowed = set()
        return Verdict.ALLOW if routing_key in allowed else Verdict.DENY
    return Verdict.DENY if overlaps_provisioning(routing_key) else Verdict.ALLOW


def rabbitmq_resource(resource: str, name: str, permission: str, client_id: str | None) -> Verdict:
    """``/auth/resource``: the MQTT plugin's own queue(s) and publishing to / binding on its exchange.

    Topic authorisation (above) decides what a subscription may carry; this keeps a client to its
    own session queues (``mqtt-subscription-<client id>qos0|1``, ``mqtt-will-<client id>``), so that
    nobody consumes another client's queue, the bridge's included. Without a client id (the same
    credentials used over AMQP 0-9-1, or a RabbitMQ too old to send it) no queue is allowed.
    """
    if resource == "exchange":
        return Verdict.ALLOW if permission in ("read", "write") else Verdict.DENY
    if resource == "queue" and client_id:
        own = {f"mqtt-subscription-{client_id}qos0", f"mqtt-subscription-{client_id}qos1", f"mqtt-will-{client_id}"}
        return Verdict.ALLOW if name in own else Verdict.DENY
    return Verdict.DENY
