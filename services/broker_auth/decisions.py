"""Who may connect and which topics they may use: pure decision functions, no I/O.

Three kinds of broker user, told apart by the device-authentication policy the MQTT gateway uses too
(``provisioning_common.device_auth``):

* provisioning clients: username or client id ``provision`` (any password, as ThingsBoard), client id
  = a single topic level without wildcards. They may publish to
  ``provision/request/<own id>`` and subscribe to ``provision/response/<own id>`` only.
* devices: credentials the credentials service knows (ThingsBoard's token as username, Innoway's
  token as password, MQTT_BASIC per spec §9). Their topics are the operator's business, except the
  provisioning topics: no device may read or write anything under ``provision/``, nor subscribe to a
  filter that could match it (``#``, ``+/...``).
* the bridge itself is not ours to admit: it is an account in the broker's own user store (see the
  README), so that a device can never obtain its rights through this endpoint.

This module maps the policy's verdicts onto the brokers' answers and decides topics and resources.
"""

from __future__ import annotations

import enum

from provisioning_common import device_auth
from provisioning_common.mqtt_topics import REQUEST_TOPIC, RESPONSE_PREFIX, is_single_level

#: AMQP topic wildcards: an MQTT client id containing one would become a wildcard in RabbitMQ's routing key.
_AMQP_WILDCARDS = frozenset("*#")
MAX_CLIENT_ID = 256


class Verdict(str, enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    #: Not for us (EMQX goes on with the next authenticator in its chain).
    IGNORE = "ignore"


def is_provisioning(username: str | None, client_id: str | None = None) -> bool:
    """The policy's rule 1 (username or client id ``provision``), applied to every broker question
    (login, topic), so that a client admitted as provisioning never gets a device's topics."""
    return device_auth.is_provisioning(client_id, username)


#: The bridge's account on the operator's broker (deploy/brokers: the ACL files grant this name its rights).
BRIDGE_USERNAME = "provisioning-bridge"


def bridge_identity(username: str, client_id: str, bridge_client_id_prefix: str) -> Verdict | None:
    """A login that uses the bridge's identity is never ours to admit.

    * The bridge's user name: its account lives in the broker's own user store (EMQX's built-in database,
      RabbitMQ's internal one). EMQX: ``ignore``, so the next authenticator checks the password; RabbitMQ:
      ``deny`` (its internal backend was asked first). Otherwise a device that provisioned MQTT_BASIC
      credentials with this user name would get the bridge's ACL rights.
    * A client id of the bridge's (``MQTT_BRIDGE_CLIENT_ID`` followed by ``-<host>``): ``deny``. A device
      taking over that id would take over the bridge's session, and with it the queued requests.
    None: not the bridge's identity, decide as usual.
    """
    if username == BRIDGE_USERNAME:
        return Verdict.IGNORE
    if bridge_client_id_prefix and (client_id == bridge_client_id_prefix
                                    or client_id.startswith(bridge_client_id_prefix + "-")):
        return Verdict.DENY
    return None


def provisioning_client_ok(client_id: str | None) -> bool:
    """A client id that can safely name a response topic (MQTT level, AMQP word, ACL ``%c``/``${clientid}``)."""
    return (
        client_id is not None
        and len(client_id) <= MAX_CLIENT_ID
        and is_single_level(client_id)
        and not _AMQP_WILDCARDS.intersection(client_id)
    )


def emqx_login(decision: device_auth.Decision) -> Verdict:
    """EMQX's answer for a device login (not a provisioning client, nor unavailable: 503 for that).

    Found: allow. Credentials that name no device: deny. Nothing to check (no username, no password,
    and no MQTT_BASIC device by the client id alone): ignore, so EMQX asks its next authenticator.
    """
    if decision.verdict is device_auth.Verdict.AUTHENTICATED:
        return Verdict.ALLOW
    return Verdict.IGNORE if decision.verdict is device_auth.Verdict.ANONYMOUS else Verdict.DENY


def rabbitmq_login(decision: device_auth.Decision) -> Verdict:
    """RabbitMQ's answer for a device login: allow a device, deny anything else (no "ignore" there)."""
    return Verdict.ALLOW if decision.verdict is device_auth.Verdict.AUTHENTICATED else Verdict.DENY


def provisioning_acl(client_id: str) -> list[dict[str, str]]:
    """EMQX (5.8+) ACL returned with an allowed provisioning client: its own topics, nothing else."""
    return [
        {"permission": "allow", "action": "publish", "topic": f"eq {REQUEST_TOPIC}/{client_id}"},
        {"permission": "allow", "action": "subscribe", "topic": f"eq {RESPONSE_PREFIX}{client_id}"},
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
    if is_provisioning(username, client_id):
        if not provisioning_client_ok(client_id):
            return Verdict.DENY  # no client id from the broker (RabbitMQ < 3.8): nothing is safe to allow
        assert client_id is not None
        if permission == "write":
            # Its own request topic only: the bridge answers on the response topic of the client id in the
            # request topic, so a client that could write another id's topic (or the bare one) could have
            # answers pushed to someone else (issue 14).
            allowed = {amqp_key(f"{REQUEST_TOPIC}/{client_id}")}
        elif permission == "read":
            allowed = {amqp_key(f"{RESPONSE_PREFIX}{client_id}")}
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
