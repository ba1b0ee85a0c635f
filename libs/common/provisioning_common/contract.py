"""The bus contract: every service, RPC method and exchange, declared once.

Callers and servers take a method from here, never restate it (like a nameko ``@rpc`` entry point
and its ``ServiceRpc`` proxy naming the same thing)::

    result = await bus.call(PROVISION, request)            # -> ProvisionResult, to mypy as well
    bus.send_reliably(ABANDON, request)                     # one-way: no reply
    await bus.serve(CORE, [PROVISION.handler(core.provision), ...])

A :class:`Service` is a queue (its name, prefixed with ``BUS_NAMESPACE``); :meth:`Rpc.handler` only
accepts a function of the declared request and reply types (checked by mypy), and
:meth:`Service.entry_points` - which ``Bus.serve`` calls before it consumes anything - refuses a
handler of another service, a method served twice, a method left unserved, and a handler whose
annotations contradict its declaration (for code mypy does not see).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeAlias, TypeVar

from pydantic import BaseModel

from .events import ProvisionEvent
from .models import (
    AttributesQuery,
    AttributesSaved,
    AttributesSnapshot,
    AuthenticateRequest,
    AuthenticateResult,
    ClientAttributesUpdate,
    IssueCertificateRequest,
    IssueCertificateResult,
    MintTokensRequest,
    MintTokensResult,
    PrepareCredentialsRequest,
    PrepareCredentialsResult,
    PrepareManyRequest,
    PrepareManyResult,
    ProvisionRequest,
    ProvisionResult,
    VerifyChainRequest,
    VerifyChainResult,
    X509ChainProvisionRequest,
)

Req = TypeVar("Req", bound=BaseModel)
Resp = TypeVar("Resp", bound=BaseModel)


class ContractError(TypeError):
    """A service's handlers do not match its declared methods (raised at start, before consuming)."""


@dataclass(frozen=True, eq=False)
class Service:
    """A service's request queue and the methods it must serve; declare methods with :meth:`rpc`
    and :meth:`one_way`."""

    name: str
    methods: dict[str, Method] = field(default_factory=dict, repr=False)

    def rpc(self, name: str, request: type[Req], reply: type[Resp], *, batched: bool = False) -> Rpc[Req, Resp]:
        return self._declare(Rpc(self, name, request, reply, batched))

    def one_way(self, name: str, request: type[Req]) -> OneWay[Req]:
        return self._declare(OneWay(self, name, request))

    def _declare(self, method: M) -> M:
        if method.name in self.methods:
            raise ContractError(f"{self.name}.{method.name} is declared twice")
        self.methods[method.name] = method
        return method

    def entry_points(self, handlers: Iterable[Handler]) -> dict[str, Handler]:
        """``handlers`` by method name, once checked to serve exactly this service's methods."""
        served: dict[str, Handler] = {}
        for handler in handlers:
            method = handler.method
            if method.service is not self:
                raise ContractError(f"{method} is not a method of {self.name}")
            if method.name in served:
                raise ContractError(f"{method} has two handlers")
            _check_annotations(handler)
            served[method.name] = handler
        missing = sorted(set(self.methods) - set(served))
        if missing:
            raise ContractError(f"{self.name} does not serve {', '.join(missing)}")
        return served


@dataclass(frozen=True, eq=False)
class Rpc(Generic[Req, Resp]):
    """A request/reply method: ``await bus.call(rpc, request)`` returns a ``reply``."""

    service: Service
    name: str
    request: type[Req]
    reply: type[Resp]
    #: Concurrent calls may travel together, several requests in one message and their answers in one
    #: message back (``BUS_CALL_BATCH_MAX``; :mod:`.bus`): for the hot methods, whose per-message cost on
    #: the bus is most of what a call costs.
    batched: bool = False

    def handler(self, func: Callable[[Req], Awaitable[Resp]]) -> Handler:
        return Handler(self, func)

    def __str__(self) -> str:
        return f"{self.service.name}.{self.name}"


@dataclass(frozen=True, eq=False)
class OneWay(Generic[Req]):
    """A method without reply (``bus.send_reliably``); whatever its handler returns is dropped."""

    service: Service
    name: str
    request: type[Req]

    def handler(self, func: Callable[[Req], Awaitable[object]]) -> Handler:
        return Handler(self, func)

    def __str__(self) -> str:
        return f"{self.service.name}.{self.name}"


Method: TypeAlias = Rpc[Any, Any] | OneWay[Any]
M = TypeVar("M", bound=Method)


@dataclass(frozen=True)
class Handler:
    """One served method; made by :meth:`Rpc.handler` / :meth:`OneWay.handler`, which type-check ``func``."""

    method: Method
    func: Callable[[Any], Awaitable[object]]

    @property
    def replies(self) -> bool:
        return isinstance(self.method, Rpc)


def _check_annotations(handler: Handler) -> None:
    """Refuse a handler whose own annotations say it takes another request or returns another reply.

    What mypy checks statically, for code it does not see (tests, an untyped wrapper). A handler
    without annotations, or annotated with type variables, passes: there is nothing to contradict.
    """
    method, func = handler.method, handler.func
    try:
        signature = inspect.signature(func)
        signature.bind(None)
    except TypeError:
        raise ContractError(f"the handler of {method} must take one argument, the request") from None
    except ValueError:  # no signature (a builtin): nothing to check
        return
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # noqa: BLE001 - unresolvable annotations: nothing to check against
        return
    parameters = list(signature.parameters.values())
    takes = hints.get(parameters[0].name) if parameters else None
    if isinstance(takes, type) and not issubclass(method.request, takes):
        raise ContractError(f"the handler of {method} takes {takes.__name__}, not {method.request.__name__}")
    returns = hints.get("return")
    if isinstance(method, Rpc) and isinstance(returns, type) and not issubclass(returns, method.reply):
        raise ContractError(f"the handler of {method} returns {returns.__name__}, not {method.reply.__name__}")


# --- the services -----------------------------------------------------------------------------

#: provisioning-core: the provisioning rules (every transport's request ends here).
CORE = Service("provisioning_core")
PROVISION = CORE.rpc("provision", ProvisionRequest, ProvisionResult, batched=True)
#: A TLS client presented a chain whose leaf is unknown: the X509_CERTIFICATE_CHAIN strategy.
PROVISION_X509_CHAIN = CORE.rpc("provision_x509_chain", X509ChainProvisionRequest, ProvisionResult)
#: A gateway answered "timed out" without the core's answer: undo what the request committed.
ABANDON = CORE.one_way("abandon", ProvisionRequest)
#: A gateway answered "timed out" (no answer in time, or none possible): the TIMED_OUT provisioning event,
#: which the core stores and publishes with the others (README "Provisioning events"). No secret in it.
REPORT_TIMEOUT = CORE.one_way("report_timeout", ProvisionEvent)

#: credentials, the part the gateways and broker_auth call: checking a device's login.
CREDENTIALS = Service("credentials")
AUTHENTICATE = CREDENTIALS.rpc("authenticate", AuthenticateRequest, AuthenticateResult, batched=True)

#: credentials.internal: hashing and minting credentials, and the device CA (signing). Served by the same
#: process on a queue of its own, whose exchange only provisioning-core and admin-api may write to (their
#: RabbitMQ users; README, "Bus permissions"): a gateway's account cannot get a certificate signed.
CREDENTIALS_INTERNAL = Service("credentials.internal")
PREPARE = CREDENTIALS_INTERNAL.rpc("prepare", PrepareCredentialsRequest, PrepareCredentialsResult)
MINT_TOKENS = CREDENTIALS_INTERNAL.rpc("mint_tokens", MintTokensRequest, MintTokensResult)
#: PREPARE for a batch of rows (bulk import): the same checks, one round trip.
PREPARE_MANY = CREDENTIALS_INTERNAL.rpc("prepare_many", PrepareManyRequest, PrepareManyResult)
VERIFY_CHAIN = CREDENTIALS_INTERNAL.rpc("verify_chain", VerifyChainRequest, VerifyChainResult)
ISSUE_CERTIFICATE = CREDENTIALS_INTERNAL.rpc("issue_certificate", IssueCertificateRequest, IssueCertificateResult)

#: device_api: a provisioned device's attributes in Postgres, for the gateways (served by the
#: provisioning-core process, on its own queue so that device traffic never queues provisioning).
DEVICE_API = Service("device_api")
GET_ATTRIBUTES = DEVICE_API.rpc("get_attributes", AttributesQuery, AttributesSnapshot)
#: Stores the client attributes a device published, then announces them on ATTRIBUTES_EXCHANGE.
SAVE_CLIENT_ATTRIBUTES = DEVICE_API.rpc("save_client_attributes", ClientAttributesUpdate, AttributesSaved)

#: Every RPC service, for the bus's permission model (``provisioning_common.bus_permissions``).
SERVICES = (CORE, CREDENTIALS, CREDENTIALS_INTERNAL, DEVICE_API)


def request_exchange(service: str) -> str:
    """The direct exchange a service's requests are published to (before ``BUS_NAMESPACE``): one per
    service, so that RabbitMQ's write permission on it says who may call that service."""
    return f"rpc.{service}"


#: Replies (and answers to ``Bus.ask``) go through this topic exchange, routing key = the reply queue's
#: name, to which each process binds its own reply queue: nobody needs the default exchange, which would
#: reach every queue. A topic exchange so that RabbitMQ's topic permissions can say whose reply queues a
#: user may bind (read) - a user's own, never ``#``.
REPLY_EXCHANGE = "rpc.replies"

# --- device data on the bus: what the operator's backend consumes and produces (README, "Device data
# on RabbitMQ"). Every exchange is a durable topic exchange (named with BUS_NAMESPACE in front) and every
# routing key is the device id; bodies are the device's own JSON, unchanged. ----------------------------

#: Uplink: telemetry a device published (a JSON object or array), from the gateways.
TELEMETRY_EXCHANGE = "device.telemetry"
#: Uplink: client attributes a device published (a JSON object), once stored, from device_api.
ATTRIBUTES_EXCHANGE = "device.attributes"
#: Uplink: a device's client-side RPC, ``{"method": ..., "params": ...}``, with ``reply_to`` and
#: ``correlation_id`` set: the backend answers by publishing any JSON to REPLY_EXCHANGE (or, where its
#: user may write it, the default exchange) with routing key ``reply_to`` and the same ``correlation_id``;
#: the device receives that body.
RPC_REQUEST_EXCHANGE = "device.rpc"
#: Downlink, to devices: the message's AMQP ``type`` says what it is (DOWNLINK_*). The gateway
#: instance holding the device's session has its queue bound by the device id while the session
#: lives, so a message published ``mandatory`` comes back unroutable when the device is offline.
DOWNLINK_EXCHANGE = "device.downlink"
#: A server-side RPC, ``{"method": ..., "params": ...}``: two-way when ``reply_to`` and
#: ``correlation_id`` are set (the device's answer is published there), one-way otherwise. An
#: ``expiration`` (ms) or ``x-deadline`` header (Unix time) bounds how long the device may take.
DOWNLINK_RPC = "rpc"
#: Shared attributes changed: ``{"key": value, ...}``, or ``{"deleted": ["key", ...]}``.
DOWNLINK_ATTRIBUTES = "attributes"
#: The device's credentials were revoked or replaced (admin API): every live session of the device ends at
#: once (MQTT: DISCONNECT 0x87 / connection closed; CoAP observations: 4.01; HTTP long polls: 401). Body ``{}``.
DOWNLINK_REVOKED = "revoked"

#: Provisioning events (README "Provisioning events"): one JSON message per provisioning decision
#: (``ProvisionEvent.wire()``), routing key ``<outcome>.<transport>`` (e.g. ``NOT_FOUND.HTTP``,
#: ``X509_REFUSED.MQTT``), published by provisioning-core once the event is stored; the admin API's live
#: stream and the operator's own systems bind queues to it. A durable topic exchange like the ones above.
EVENTS_EXCHANGE = "provisioning.events"
