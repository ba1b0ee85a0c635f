"""Least privilege on the bus: one RabbitMQ user per service, and what each may configure, write and read.

RabbitMQ checks three regular expressions per user and vhost against the name of the queue or exchange an
operation touches: *configure* (declare, delete), *write* (publish to an exchange; bind a queue) and *read*
(consume a queue; bind from an exchange); and, on topic exchanges, *topic permissions* on routing keys
(publish: write; bind: read). Publishing to the default exchange is a write on ``amq.default`` and reaches
every queue, so no user here may write it: requests go to one direct exchange per service
(``rpc.<service>``; whoever may write it may call that service) and replies to the ``rpc.replies`` topic
exchange, on which each user may bind only its own reply queues.

This module is the one model of those permissions (README, "Bus permissions"); it renders RabbitMQ
definitions - users, permissions, topic permissions, and the exchanges, queues and bindings the services
use, declared beforehand so that a request waits in its queue while its service starts::

    python -m provisioning_common.bus_permissions render definitions.json   # compose: load_definitions
    python -m provisioning_common.bus_permissions apply http://rabbitmq:15672   # k8s: management API

Passwords come from the environment: ``RABBITMQ_<USER>_PASSWORD`` (e.g. ``RABBITMQ_HTTP_GATEWAY_PASSWORD``)
for each user in :data:`USERS` (a user without one is left out), ``RABBITMQ_USER``/``RABBITMQ_PASSWORD``
for an administrator (``render`` only: a broker that loads definitions at boot creates no default user),
and for ``apply`` ``RABBITMQ_ADMIN_USERNAME``/``RABBITMQ_ADMIN_PASSWORD`` to log in. ``BUS_NAMESPACE``,
``BUS_QUEUE_TYPE`` and ``RABBITMQ_VHOST`` (default ``/``) name the resources.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from .bus import reply_queue_prefix, service_queue_arguments
from .contract import (
    ATTRIBUTES_EXCHANGE,
    CORE,
    CREDENTIALS,
    CREDENTIALS_INTERNAL,
    DEVICE_API,
    DOWNLINK_EXCHANGE,
    EVENTS_EXCHANGE,
    REPLY_EXCHANGE,
    RPC_REQUEST_EXCHANGE,
    SERVICES,
    TELEMETRY_EXCHANGE,
    Service,
    request_exchange,
)
from .settings import Settings

#: Device ids are UUIDs: the only binding keys a gateway may use on ``device.downlink`` (never ``#``).
DEVICE_ID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
#: The random part of a reply or downlink queue's name.
HEX = "[0-9a-f]+"
DEVICE_EXCHANGES = (TELEMETRY_EXCHANGE, ATTRIBUTES_EXCHANGE, RPC_REQUEST_EXCHANGE, DOWNLINK_EXCHANGE)
#: Every topic exchange of the contract besides ``rpc.replies``: device data, and provisioning events.
TOPIC_EXCHANGES = (*DEVICE_EXCHANGES, EVENTS_EXCHANGE)


@dataclass(frozen=True)
class BusUser:
    """What one service's RabbitMQ user may do, in the contract's terms."""

    name: str
    #: Services whose queue this user consumes (and whose queue and exchange it declares).
    serves: tuple[Service, ...] = ()
    #: Services it calls (writes to their ``rpc.<service>`` exchange).
    calls: tuple[Service, ...] = ()
    #: Device-data exchanges it publishes to.
    publishes: tuple[str, ...] = ()
    #: Answers askers on ``rpc.replies`` (services' replies, gateways' device RPC answers).
    answers: bool = False
    #: Has a downlink queue of its own bound to ``device.downlink`` by device id (a gateway).
    downlink: bool = False
    #: Extra queue names (regexes, after the namespace) it declares, binds and consumes.
    own_queues: tuple[str, ...] = ()
    #: Device-data exchanges it binds its own queues to with any key (the operator's backend).
    subscribes: tuple[str, ...] = ()


#: Every service's user. A gateway may call provisioning, device logins and attributes - never the internal
#: credentials service (minting, hashing, signing), which only provisioning-core and admin-api may call.
USERS: tuple[BusUser, ...] = (
    # device.downlink: a re-provisioned device's sessions with its old credentials end (device_link.end_sessions).
    BusUser("provisioning_core", serves=(CORE, DEVICE_API), calls=(CREDENTIALS_INTERNAL,),
            publishes=(ATTRIBUTES_EXCHANGE, EVENTS_EXCHANGE, DOWNLINK_EXCHANGE), answers=True),
    BusUser("credentials", serves=(CREDENTIALS, CREDENTIALS_INTERNAL), answers=True),
    # The live stream of provisioning events: one exclusive queue per open stream, bound to provisioning.events.
    BusUser("admin_api", calls=(CREDENTIALS_INTERNAL,), publishes=(DOWNLINK_EXCHANGE,),
            own_queues=(rf"admin_api\.events\.{HEX}",), subscribes=(EVENTS_EXCHANGE,)),
    BusUser("http_gateway", calls=(CORE, CREDENTIALS, DEVICE_API), publishes=(TELEMETRY_EXCHANGE, RPC_REQUEST_EXCHANGE),
            answers=True, downlink=True,
            # Long polls' per-device queues, and each instance's forwarding queue of RPC answers (by tag).
            own_queues=(rf"http_gateway\.(rpc|attributes)\.{DEVICE_ID}", r"http_gateway\.rpc\.[0-9]+")),
    BusUser("mqtt_gateway", calls=(CORE, CREDENTIALS, DEVICE_API), publishes=(TELEMETRY_EXCHANGE, RPC_REQUEST_EXCHANGE),
            answers=True, downlink=True),
    BusUser("coap_gateway", calls=(CORE, CREDENTIALS, DEVICE_API), publishes=(TELEMETRY_EXCHANGE, RPC_REQUEST_EXCHANGE),
            answers=True, downlink=True),
    BusUser("mqtt_bridge", calls=(CORE,)),
    BusUser("broker_auth", calls=(CREDENTIALS,)),
    # The operator's backend (README, "Device data on RabbitMQ"): its own queues backend.*, bound to the
    # uplink exchanges; publishes downlink messages and answers client-side RPCs on rpc.replies.
    BusUser("backend", publishes=(DOWNLINK_EXCHANGE,), answers=True, own_queues=(r"backend\..+",),
            subscribes=(TELEMETRY_EXCHANGE, ATTRIBUTES_EXCHANGE, RPC_REQUEST_EXCHANGE, EVENTS_EXCHANGE)),
)


def _any(names: list[str]) -> str:
    """A regex matching exactly these names (already escaped or patterns); one that matches nothing if empty."""
    return f"^({'|'.join(names)})$" if names else "^$"


def permissions(user: BusUser, settings: Settings) -> dict[str, str]:
    """The user's configure/write/read regexes for ``settings``' namespace."""
    ns = re.escape(settings.bus_namespace)

    def name(plain: str) -> str:
        return ns + re.escape(plain)

    reply_queues = re.escape(reply_queue_prefix(settings, user.name)) + HEX
    own = [reply_queues] + [ns + pattern for pattern in user.own_queues]
    if user.downlink:
        own.append(ns + re.escape(f"downlink.{user.name}.") + HEX)
    served = [name(s.name) for s in user.serves]
    served_exchanges = [name(request_exchange(s.name)) for s in user.serves]
    configure = own + served + served_exchanges
    write = (own + served + [name(request_exchange(s.name)) for s in user.calls]
             + [name(e) for e in user.publishes] + ([name(REPLY_EXCHANGE)] if user.answers else []))
    read = (own + served + served_exchanges + [name(REPLY_EXCHANGE)]
            + ([name(DOWNLINK_EXCHANGE)] if user.downlink else []) + [name(e) for e in user.subscribes])
    return {"configure": _any(configure), "write": _any(write), "read": _any(read)}


def topic_permissions(user: BusUser, settings: Settings) -> list[dict[str, str]]:
    """Routing keys on the topic exchanges: on ``rpc.replies`` a user binds only its own reply queues
    (so it never receives another service's replies, whose queue names it may learn), and a gateway binds
    ``device.downlink`` by device id only (never ``#``)."""
    ns = re.escape(settings.bus_namespace)
    binds = [re.escape(reply_queue_prefix(settings, user.name)) + HEX] + [ns + p for p in user.own_queues]
    found = [{"exchange": settings.queue(REPLY_EXCHANGE), "write": "^.+$" if user.answers else "^$",
              "read": _any(binds)}]
    if user.downlink:
        found.append({"exchange": settings.queue(DOWNLINK_EXCHANGE), "write": "^$", "read": f"^{DEVICE_ID}$"})
    return found


def definitions(settings: Settings, passwords: dict[str, str], *, vhost: str = "/",
                admin: tuple[str, str] | None = None) -> dict[str, Any]:
    """RabbitMQ definitions (the JSON of ``rabbitmqctl import_definitions`` and ``load_definitions``) for the
    users in ``passwords`` (user name -> password), plus the bus's exchanges, queues and bindings."""
    users: list[dict[str, Any]] = []
    perms: list[dict[str, Any]] = []
    topics: list[dict[str, Any]] = []
    if admin is not None:
        users.append({"name": admin[0], "password": admin[1], "tags": "administrator"})
        perms.append({"user": admin[0], "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"})
    for user in USERS:
        if user.name not in passwords:
            continue
        users.append({"name": user.name, "password": passwords[user.name], "tags": ""})
        perms.append({"user": user.name, "vhost": vhost, **permissions(user, settings)})
        topics.extend({"user": user.name, "vhost": vhost, **topic} for topic in topic_permissions(user, settings))

    def exchange(name: str, kind: str) -> dict[str, Any]:
        return {"name": settings.queue(name), "vhost": vhost, "type": kind, "durable": True, "auto_delete": False,
                "internal": False, "arguments": {}}

    exchanges = [exchange(request_exchange(s.name), "direct") for s in SERVICES]
    exchanges += [exchange(REPLY_EXCHANGE, "topic")] + [exchange(e, "topic") for e in TOPIC_EXCHANGES]
    queues = [{"name": settings.queue(s.name), "vhost": vhost, "durable": True, "auto_delete": False,
               "arguments": service_queue_arguments(settings)} for s in SERVICES]
    bindings = [{"source": settings.queue(request_exchange(s.name)), "vhost": vhost,
                 "destination": settings.queue(s.name), "destination_type": "queue",
                 "routing_key": settings.queue(s.name), "arguments": {}} for s in SERVICES]
    return {"users": users, "vhosts": [{"name": vhost}], "permissions": perms, "topic_permissions": topics,
            "exchanges": exchanges, "queues": queues, "bindings": bindings}


def password_variable(user: str) -> str:
    return f"RABBITMQ_{user.upper()}_PASSWORD"


#: In :func:`compose_template`: replaced by the request queues' arguments (BUS_QUEUE_TYPE) at the broker's start.
QUEUE_ARGUMENTS = "__QUEUE_ARGUMENTS__"


def compose_template() -> str:
    """``deploy/rabbitmq/definitions.template.json``: the definitions of docker-compose.yml (empty
    BUS_NAMESPACE), with ``__VARIABLE__`` where ``deploy/rabbitmq/compose-entrypoint.sh`` puts the
    passwords of the environment (and the administrator RABBITMQ_USER) and the queues' arguments."""
    body = definitions(Settings(), {user.name: f"__{password_variable(user.name)}__" for user in USERS},
                       admin=("__RABBITMQ_USER__", "__RABBITMQ_PASSWORD__"))
    for queue in body["queues"]:
        queue["arguments"] = QUEUE_ARGUMENTS
    return json.dumps(body, indent=1) + "\n"


def passwords_from_environment(environ: dict[str, str] | os._Environ[str] = os.environ) -> dict[str, str]:
    return {user.name: environ[password_variable(user.name)] for user in USERS
            if environ.get(password_variable(user.name))}


def _settings() -> Settings:
    return Settings(bus_namespace=os.environ.get("BUS_NAMESPACE", ""),
                    bus_queue_type=os.environ.get("BUS_QUEUE_TYPE", "classic"))


def main(argv: list[str]) -> int:
    if argv == ["template"]:
        sys.stdout.write(compose_template())
        return 0
    if len(argv) != 2 or argv[0] not in ("render", "apply"):
        print(__doc__, file=sys.stderr)
        return 2
    vhost = os.environ.get("RABBITMQ_VHOST", "/")
    passwords = passwords_from_environment()
    if argv[0] == "render":
        admin = (os.environ["RABBITMQ_USER"], os.environ["RABBITMQ_PASSWORD"]) \
            if os.environ.get("RABBITMQ_USER") and os.environ.get("RABBITMQ_PASSWORD") else None
        body = definitions(_settings(), passwords, vhost=vhost, admin=admin)
        descriptor = os.open(argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(descriptor, "w") as out:
            json.dump(body, out, indent=1)
        print(f"definitions for {len(body['users'])} RabbitMQ users written to {argv[1]}")
        return 0
    body = definitions(_settings(), passwords, vhost=vhost)
    login = f"{os.environ['RABBITMQ_ADMIN_USERNAME']}:{os.environ['RABBITMQ_ADMIN_PASSWORD']}"
    request = urllib.request.Request(
        urllib.parse.urljoin(argv[1], "/api/definitions"), data=json.dumps(body).encode(), method="POST",
        headers={"content-type": "application/json",
                 "authorization": "Basic " + base64.b64encode(login.encode()).decode()})
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - the operator's URL
        print(f"definitions for {len(body['users'])} RabbitMQ users applied ({response.status})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
