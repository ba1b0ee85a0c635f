"""RPC and events over RabbitMQ: the one place that knows about correlation ids and reply queues.

Every method is declared once in :mod:`.contract` (service, name, request and reply models). A
caller (:meth:`Bus.call`) publishes the request to the method's service's direct exchange
(``rpc.<service>``, which routes to the service's durable queue) with ``reply_to`` = this process's
own reply queue and a fresh ``correlation_id``, then awaits the matching reply, validated into the
declared reply model. A service (:meth:`Bus.serve`) consumes its queue with a prefetch window,
validates each body into the declared request model, and replies before it acks, so a crash between
the two redelivers the request (at-least-once; handlers are idempotent by ``message_id``). Each
process connects under its own service name, which the broker's management UI shows.

Least privilege (README, "Bus permissions"): nothing is published to the default exchange, which
reaches every queue. Requests go to one exchange per service, so RabbitMQ's write permission on it
says who may call that service; replies go to the ``rpc.replies`` topic exchange, routing key = the
reply queue's name (``reply.<service>.<random>``), to which each process binds its own reply queue.
Queues and exchanges a process does not own are only looked up (passive declarations need no
permission) and declared only when missing - on a development broker, where every process may; a
deployment declares them beforehand (``provisioning_common.bus_permissions``), so a request sent
while its service is starting waits in the service's queue either way.

Deadlines (like nameko's call context, in headers): every request carries an absolute
``x-deadline`` (Unix time). The serving side refuses a request already past it, runs the
handler with that deadline as :func:`current_deadline` (so nested calls get the *remaining*
time, never a fresh one, and the handler can refuse to commit past it), and answers
``deadline_exceeded`` when it runs out. The original caller waits ``BUS_REPLY_GRACE_S`` longer
than the deadline it set, so the service's own answer - success or "too late" - reaches it
before it gives up; a device is never told "timed out" while its work may still commit.

Request ids travel the same way: a call made while a request id is in force
(:func:`provisioning_common.context.current_request_id`) carries it as ``x-request-id``, and the
serving side handles the message with it in force, so every service's log lines of one device's
request carry the id its gateway gave it. Every call and every handled message is counted and timed
per service and method (:mod:`.metrics`: ``provisioning_rpc_*``), time-outs apart.

Batches (issue 18): the per-message work of AMQP - framing, publisher confirms, deliveries, acks, on the
caller, the broker and the service alike - is most of what a call costs. Calls of a method the contract
declares ``batched`` (provision, authenticate) that are made while one of its messages is being published
travel together: one message (header ``x-batch``) whose body is a JSON array of the requests, each with
its own correlation id, deadline and request id (:class:`BatchedRequest`); a lone call still goes alone, at
once, as a plain message. The service handles each request of a batch on its own, as if it had come alone
(its own deadline and request id in force, its own metrics), and answers those that finish together in
one message (a JSON array of :class:`BatchedReply`), so a slow request never holds up its neighbours'
answers; it acks the batch once every answer is out (a redelivered batch replays each request's answer).

When the connection drops, callers fail at once (no waiting out the time-out), and a reply the
broker cannot deliver (its caller vanished) is reported to the service through
``on_undelivered`` so that it can undo work nobody was told about.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated, Any, NamedTuple, TypeVar

import aio_pika
import aiormq.exceptions
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    ExchangeType,
)
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from . import metrics
from .batching import Batcher
from .context import REQUEST_ID_HEADER, current_request_id, new_request_id, reset_request_id, set_request_id
from .contract import REPLY_EXCHANGE, Handler, OneWay, Rpc, Service, request_exchange
from .models import RpcFailure
from .outage import OutageLog
from .settings import Settings

log = logging.getLogger(__name__)

Req = TypeVar("Req", bound=BaseModel)
Resp = TypeVar("Resp", bound=BaseModel)

#: Header set on a reply whose body is an :class:`RpcFailure` instead of the handler's model.
ERROR_HEADER = "x-rpc-error"
#: Header of every request: the absolute deadline (Unix time, seconds) of the whole call chain.
DEADLINE_HEADER = "x-deadline"
#: Header of a message whose body is a JSON array of requests (or of their replies): how many.
BATCH_HEADER = "x-batch"
#: The most requests one batch message may hold (a longer one is dropped, with a warning).
BATCH_MAX = 256
#: ``reply_to`` of RabbitMQ's direct reply-to: answered on the default exchange, which needs write on
#: ``amq.default`` (a development broker's guest); with least privilege, answer through REPLY_EXCHANGE.
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
#: ``RpcFailure.code`` values a caller acts on.
CODE_DEADLINE = "deadline_exceeded"
CODE_UNAVAILABLE = "unavailable"

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("rpc_deadline", default=None)

JSON = "application/json"
#: AMQP delivery mode 1: a request lives at most its deadline, writing it to disk only costs broker time.
_TRANSIENT = int(aio_pika.DeliveryMode.NOT_PERSISTENT)


def current_deadline() -> float | None:
    """The deadline (Unix time) of the request being handled in this task, if any."""
    return _deadline.get()


def remaining(default: float) -> float:
    """Seconds left before :func:`current_deadline` (``default`` outside a request)."""
    deadline = _deadline.get()
    return default if deadline is None else deadline - time.time()



class RpcError(RuntimeError):
    """The remote handler failed; the message is the remote's (secret-free) description."""


class RpcTimeout(RpcError):
    """No reply within the timeout: the service is slow, down, or the request expired in its queue."""


class DeadlineExceeded(RpcTimeout):
    """The request's deadline passed; a handler raises it to answer "too late" (nothing committed)."""


class ConnectionLost(RpcError):
    """The bus connection dropped (or was down) while the call was out: its outcome is unknown."""


def outcome_unknown(exc: RpcError) -> bool:
    """Whether the remote may have done the work although the caller got no answer (no reply in
    time, or the connection dropped) - as opposed to an answer that said nothing was done."""
    return isinstance(exc, ConnectionLost) or type(exc) is RpcTimeout


class NoRoute(RpcError):
    """A ``mandatory`` message came back: no queue is bound for its routing key (nobody listens)."""


def type_name(exc: BaseException) -> str:
    return type(exc).__name__


class Unavailable(RpcError):
    """A dependency (database, another service) is down; the caller gets a clear "retry later"."""


#: One-way messages (:meth:`Bus.send_reliably`) kept while the broker is unreachable; past this the
#: oldest are dropped, with a warning. Each is a few hundred bytes.
OUTBOX_MAX = 10_000

#: Called with (request, reply) when a reply could not be delivered because its caller is gone.
UndeliveredHook = Callable[[BaseModel, BaseModel], Awaitable[None]]


class BatchedRequest(BaseModel):
    """One request of a batch message: what a plain message carries in its properties and body."""

    model_config = ConfigDict(frozen=True)

    #: Its correlation id, by which the caller matches the answer.
    id: str = Field(min_length=1, max_length=128)
    #: Its deadline (Unix time; ``x-deadline`` of a plain message).
    dl: float | None = None
    #: Its request id (``x-request-id``).
    rid: str | None = None
    #: The request's JSON (the method's request model), as a string.
    b: str


class BatchedReply(BaseModel):
    """One answer of a batch reply."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(min_length=1, max_length=128)
    #: The body is an :class:`RpcFailure` (``x-rpc-error`` of a plain reply).
    err: bool = False
    #: The reply's JSON, as a string.
    b: str


_BATCH_REQUESTS: TypeAdapter[list[BatchedRequest]] = TypeAdapter(
    Annotated[list[BatchedRequest], Field(min_length=1, max_length=BATCH_MAX)])
_BATCH_REPLIES: TypeAdapter[list[BatchedReply]] = TypeAdapter(list[BatchedReply])


class _Outgoing(NamedTuple):
    """A call waiting for its batch message."""

    correlation_id: str
    message_id: str
    deadline: float
    request_id: str | None
    body: bytes


class _Answer(NamedTuple):
    """What handling one request gave: the validated request, the reply (an RpcFailure when ``failed``), and
    whether a one-way message must be tried again later (a dependency was down)."""

    request: BaseModel | None
    reply: BaseModel | None
    failed: bool
    retry: bool = False


class _Serving(NamedTuple):
    """What every message a :meth:`Bus.serve` consumer takes is handled with."""

    #: The consuming channel (replies are published and acks sent on it).
    channel: AbstractChannel
    #: The full name of the replies exchange.
    replies: str
    handlers: dict[str, Handler]
    service: str
    on_undelivered: UndeliveredHook | None


#: A reply as its caller reads it: whether it is an RpcFailure, and its JSON.
_Reply = tuple[bool, bytes | str]


def service_queue_arguments(settings: Settings) -> dict[str, Any]:
    """The arguments of every service's request queue: identical wherever it is declared (the services,
    callers on a development broker, and a deployment's definitions), or RabbitMQ refuses the declaration."""
    args: dict[str, Any] = {"x-queue-type": settings.bus_queue_type}
    if settings.bus_queue_type == "quorum":
        args["x-delivery-limit"] = 5
    return args


def reply_queue_prefix(settings: Settings, service_name: str) -> str:
    """Reply queues of a process connected as ``service_name`` are named this + a random hex string."""
    return settings.queue(f"reply.{service_name}." if service_name else "reply.")


class Bus:
    """One robust connection per process: a confirmed publishing channel and a private reply queue."""

    def __init__(self, settings: Settings, connection: AbstractRobustConnection, service_name: str = "") -> None:
        self._settings = settings
        self._connection = connection
        self._channel: AbstractChannel | None = None
        self._reply_queue_name = reply_queue_prefix(settings, service_name) + uuid.uuid4().hex
        self._pending: dict[str, asyncio.Future[_Reply]] = {}
        #: Per batched method called: the batcher of its outgoing calls.
        self._outgoing: dict[tuple[str, str], Batcher[_Outgoing, None]] = {}
        #: Per service called: (request exchange, routing key), once its route is known to exist.
        self._routes: dict[str, tuple[str, str]] = {}
        #: Queues and exchanges known to exist (looked up, or declared), by name.
        self._declared: set[str] = set()
        self._declaring: dict[str, asyncio.Lock] = {}
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._exchanges: dict[str, AbstractExchange] = {}
        self._reply_consumer_started = False
        self._reply_consumer_lock = asyncio.Lock()
        self._direct_reply_channel: AbstractChannel | None = None
        self._in_flight = 0
        #: Requests handled at once by this process's services: BUS_PREFETCH, whether they came alone or in
        #: batches (the prefetch window counts messages, and a batch message holds up to BATCH_MAX requests).
        self._handling = asyncio.Semaphore(settings.bus_prefetch)
        self._idle = asyncio.Event()
        self._idle.set()
        self._outage = OutageLog(log, "RabbitMQ")
        self._closing = False
        #: (service, method, body, request id) of each one-way message waiting to be sent.
        self._outbox: collections.deque[tuple[str, str, bytes, str | None]] = collections.deque()
        self._outbox_wakeup = asyncio.Event()
        self._outbox_task: asyncio.Task[None] | None = None
        self._outbox_overflow = OutageLog(log, "bus outbox")
        connection.close_callbacks.add(self._on_connection_lost)
        if hasattr(connection, "reconnect_callbacks"):
            connection.reconnect_callbacks.add(self._on_reconnected)

    @classmethod
    async def connect(cls, settings: Settings, service_name: str) -> Bus:
        """Connect as ``service_name`` (the connection name RabbitMQ's management UI shows)."""
        connection = await aio_pika.connect_robust(
            settings.rabbitmq_url.get_secret_value(),
            client_properties={"connection_name": service_name},
            reconnect_interval=settings.bus_reconnect_interval_s,
        )
        bus = cls(settings, connection, service_name)
        bus._channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        return bus

    def _on_connection_lost(self, *_: Any) -> None:
        """Fail every caller at once: their replies would go to a reply queue that is gone."""
        if self._closing:
            return
        metrics.BUS_DISCONNECTS.inc()
        self._outage.failed("connection lost")
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ConnectionLost("bus connection lost"))

    def _on_reconnected(self, *_: Any) -> None:
        metrics.BUS_RECONNECTS.inc()
        self._outage.recovered()

    @property
    def is_connected(self) -> bool:
        return self._connection.connected.is_set() and self._channel is not None and not self._channel.is_closed

    @property
    def settings(self) -> Settings:
        return self._settings

    async def open_channel(self) -> AbstractChannel:
        """Another channel on this connection (restored with it), e.g. for a consumer with its own prefetch."""
        return await self._connection.channel()

    @property
    def channel(self) -> AbstractChannel:
        assert self._channel is not None, "Bus.connect() first"
        return self._channel

    # --- queues ------------------------------------------------------------------------

    async def _on_temporary_channel(self, action: Callable[[AbstractChannel], Awaitable[None]]) -> None:
        """Run ``action`` on a channel of its own, closed afterwards: a failed lookup or a refused
        declaration closes that channel (AMQP), never the ones publishing and consuming."""
        channel = await self._connection.channel()
        try:
            await action(channel)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def _ensure(
        self,
        key: str,
        look_up: Callable[[AbstractChannel], Awaitable[None]],
        declare: Callable[[AbstractChannel], Awaitable[None]],
    ) -> None:
        """Make sure what ``key`` names exists: looked up (passive declarations: no permission needed),
        declared only when missing. Once per process; the broker keeps durable ones across restarts.

        Raises :class:`RpcError` when it is missing and this user may not declare it."""
        if key in self._declared:
            return
        lock = self._declaring.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self._declared:
                return
            try:
                await self._on_temporary_channel(look_up)
            except aiormq.exceptions.ChannelNotFoundEntity:
                try:
                    await self._on_temporary_channel(declare)
                except aiormq.exceptions.ChannelAccessRefused:
                    raise RpcError(f"{key} is not declared, and this RabbitMQ user may not declare it "
                                   "(a deployment declares the bus's queues and exchanges beforehand)") from None
            self._declared.add(key)

    async def _declare_service_route(self, channel: AbstractChannel, service: str) -> AbstractQueue:
        """A service's durable request queue, its direct exchange, and the binding between them, declared
        with identical arguments everywhere (:func:`service_queue_arguments`)."""
        name = self._settings.queue(service)
        queue = await channel.declare_queue(name, durable=True, arguments=service_queue_arguments(self._settings))
        exchange = await channel.declare_exchange(
            self._settings.queue(request_exchange(service)), ExchangeType.DIRECT, durable=True
        )
        await queue.bind(exchange, routing_key=name)
        return queue

    async def _ensure_service_route(self, service: str) -> None:
        """A caller's side: the service's exchange and queue exist (requests wait in the queue for a
        service that is starting instead of being dropped as unroutable)."""
        queue_name = self._settings.queue(service)
        exchange_name = self._settings.queue(request_exchange(service))

        async def look_up(channel: AbstractChannel) -> None:
            await channel.declare_queue(queue_name, passive=True)
            await channel.declare_exchange(exchange_name, passive=True)

        async def declare(channel: AbstractChannel) -> None:
            await self._declare_service_route(channel, service)

        await self._ensure(exchange_name, look_up, declare)

    async def _ensure_exchange(self, full_name: str, kind: ExchangeType) -> AbstractExchange:
        """A durable exchange this process uses but does not own, as an exchange of the publishing channel."""
        exchange = self._exchanges.get(full_name)
        if exchange is not None:
            return exchange

        async def look_up(channel: AbstractChannel) -> None:
            await channel.declare_exchange(full_name, passive=True)

        async def declare(channel: AbstractChannel) -> None:
            await channel.declare_exchange(full_name, kind, durable=True)

        await self._ensure(full_name, look_up, declare)
        exchange = await self.channel.get_exchange(full_name, ensure=False)
        self._exchanges[full_name] = exchange
        return exchange

    async def _request_exchange(self, service: str) -> AbstractExchange:
        await self._ensure_service_route(service)
        name = self._settings.queue(request_exchange(service))
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = self._exchanges[name] = await self.channel.get_exchange(name, ensure=False)
        return exchange

    async def reply_exchange(self) -> AbstractExchange:
        """``rpc.replies`` (contract.REPLY_EXCHANGE), where every answer goes, routing key = its ``reply_to``."""
        return await self._ensure_exchange(self._settings.queue(REPLY_EXCHANGE), ExchangeType.TOPIC)

    async def bind_replies(self, queue: AbstractQueue) -> None:
        """Make ``queue`` reachable by :meth:`reply` (and services' replies): bound to ``rpc.replies`` by its name."""
        await queue.bind(await self.reply_exchange(), routing_key=queue.name)

    async def _ensure_reply_consumer(self) -> None:
        if self._reply_consumer_started:
            return
        async with self._reply_consumer_lock:  # concurrent first calls wait until replies can reach us
            if self._reply_consumer_started:
                return
            queue = await self.channel.declare_queue(self._reply_queue_name, exclusive=True, auto_delete=True)
            await self.bind_replies(queue)
            await queue.consume(self._on_reply, no_ack=True)
            self._reply_consumer_started = True

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        headers = message.headers or {}
        if headers.get(BATCH_HEADER):
            try:
                replies = _BATCH_REPLIES.validate_json(message.body)
            except ValidationError:
                log.warning("dropped a malformed batch reply (%d bytes)", len(message.body))
                return
            for reply in replies:
                future = self._pending.pop(reply.id, None)
                if future is not None and not future.done():
                    future.set_result((reply.err, reply.b))
            return
        future = self._pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result((bool(headers.get(ERROR_HEADER)), message.body))

    # --- caller side -------------------------------------------------------------------

    async def call(
        self,
        rpc: Rpc[Req, Resp],
        payload: Req,
        *,
        timeout: float | None = None,
        message_id: str | None = None,
        deadline: float | None = None,
    ) -> Resp:
        """Send ``payload`` to ``rpc`` and return its reply, validated into ``rpc.reply``.

        The request's deadline is ``deadline`` (Unix time) if given; inside a handler it is the
        handled request's own deadline (shortened to ``timeout`` if that is sooner); otherwise now
        + ``timeout`` (default ``PROVISION_TIMEOUT_S``). A caller that sets a new deadline waits
        ``BUS_REPLY_GRACE_S`` past it for the service's answer; a nested call waits only until the
        deadline, since its own caller needs an answer by then.

        Raises :class:`RpcTimeout` (:class:`DeadlineExceeded` when the service answered that the
        deadline passed), :class:`Unavailable` when the service reports a dependency down, and
        :class:`RpcError` when the remote failed or the bus is unreachable.
        """
        started = time.perf_counter()
        outcome = "error"
        try:
            reply = await self._call(rpc, payload, timeout=timeout, message_id=message_id, deadline=deadline)
            outcome = "ok"
            return reply
        except DeadlineExceeded:
            outcome = "deadline"
            raise
        except RpcTimeout:
            outcome = "timeout"
            raise
        except Unavailable:
            outcome = "unavailable"
            raise
        except ConnectionLost:
            outcome = "connection_lost"
            raise
        finally:
            service, method = rpc.service.name, rpc.name
            metrics.series(metrics.RPC_CLIENT_SECONDS, service, method).observe(time.perf_counter() - started)
            metrics.series(metrics.RPC_CLIENT_CALLS, service, method, outcome).inc()

    async def _call(
        self, rpc: Rpc[Req, Resp], payload: Req, *, timeout: float | None, message_id: str | None,
        deadline: float | None,
    ) -> Resp:
        service, method = rpc.service.name, rpc.name
        now = time.time()
        inherited = _deadline.get()
        if deadline is None:
            own = now + (timeout if timeout is not None else self._settings.provision_timeout_s)
            deadline = own if inherited is None else min(inherited, own)
        grace = self._settings.bus_reply_grace_s if inherited is None else 0.0
        budget = deadline - now
        if budget <= 0:
            raise DeadlineExceeded(f"{service}.{method}: deadline already passed")
        correlation_id = new_request_id()  # also the default message id
        call = _Outgoing(correlation_id, message_id or correlation_id, deadline, current_request_id(),
                         payload.model_dump_json().encode())
        future: asyncio.Future[_Reply] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        try:
            async with asyncio.timeout(budget + grace):
                if not self._reply_consumer_started:
                    await self._ensure_reply_consumer()
                route = self._routes.get(service) or await self._route(service)
                if rpc.batched and self._settings.bus_call_batch_max > 1:
                    await self._batcher(rpc, route).submit(call)
                else:
                    await self._publish_calls(method, route, [call])
                failed, body = await future
        except TimeoutError:
            raise RpcTimeout(f"{service}.{method} did not answer within {budget + grace:.3g}s") from None
        except RpcError:
            raise
        except Exception as exc:  # connection lost, channel closed, unroutable
            raise ConnectionLost(f"bus unavailable: {type(exc).__name__}") from None
        finally:
            self._pending.pop(correlation_id, None)
            _retrieved(future)
        if failed:
            failure = RpcFailure.model_validate_json(body)
            if failure.code == CODE_DEADLINE:
                raise DeadlineExceeded(failure.error)
            if failure.code == CODE_UNAVAILABLE:
                raise Unavailable(failure.error)
            raise RpcError(failure.error)
        return rpc.reply.model_validate_json(body)

    def _batcher(self, rpc: Rpc[Any, Any], route: tuple[str, str]) -> Batcher[_Outgoing, None]:
        key = (rpc.service.name, rpc.name)
        batcher = self._outgoing.get(key)
        if batcher is None:
            batcher = self._outgoing[key] = Batcher(
                functools.partial(self._publish_calls, rpc.name, route),
                max_batch=self._settings.bus_call_batch_max, name=f"call.{rpc}")
        return batcher

    async def _publish_calls(self, method: str, route: tuple[str, str], calls: list[_Outgoing]) -> list[None]:
        """Publish ``calls`` of ``method``: one plain message for one call, else one batch message.

        A call that ended while it waited for its batch (its caller gave up, or the connection dropped and
        failed it) is not sent: nobody would read its answer, and its caller may already have said "timed
        out". A publish that outlasts the calls' deadlines (a broker that stopped confirming) fails them
        rather than holding up every later batch."""
        calls_left = [call for call in calls if call.correlation_id in self._pending]
        if calls_left:
            async with asyncio.timeout(max(call.deadline for call in calls_left) - time.time()
                                       + self._settings.bus_reply_grace_s):
                await self._publish_calls_now(method, route, calls_left)
        return [None] * len(calls)

    async def _publish_calls_now(self, method: str, route: tuple[str, str], calls: list[_Outgoing]) -> None:
        if len(calls) == 1:
            [call] = calls
            correlation_id, message_id, deadline = call.correlation_id, call.message_id, call.deadline
            headers = _call_headers(deadline, call.request_id)
            body = call.body
        else:
            correlation_id = message_id = new_request_id()
            deadline = max(call.deadline for call in calls)
            headers = {DEADLINE_HEADER: f"{deadline:.6f}", BATCH_HEADER: len(calls)}
            body = _batch_body(calls)
        # The AMQP properties themselves, not an aio_pika.Message: its validated, lockable attributes cost ten
        # times as much to build as the properties it would be turned into (the hot path of every provision).
        properties = aiormq.spec.Basic.Properties(
            content_type=JSON,
            message_type=method,
            correlation_id=correlation_id,
            message_id=message_id,
            reply_to=self._reply_queue_name,
            headers=headers,
            # Nothing is taken from the queue after the (last) deadline (the handler checks each too).
            expiration=_expiration(max(deadline - time.time(), 0.001)),
            # Transient: a request lives at most ``timeout`` seconds, after which its caller has
            # answered the device anyway; writing it to disk would only cost broker time.
            delivery_mode=_TRANSIENT,
        )
        await self._publish_properties(route[0], route[1], body, properties)

    async def _route(self, service: str) -> tuple[str, str]:
        """``service``'s request exchange and routing key, its route made sure of (once per process)."""
        await self._request_exchange(service)
        route = self._routes[service] = (self._settings.queue(request_exchange(service)), self._settings.queue(service))
        return route

    async def _publish_properties(
        self, exchange: str, routing_key: str, body: bytes, properties: aiormq.spec.Basic.Properties,
        channel: AbstractChannel | None = None,
    ) -> None:
        """What aio_pika's ``Exchange.publish`` does on ``channel`` (default: the publishing channel; mandatory,
        confirmed), given the AMQP properties, without building an ``aio_pika.Message`` (requests and replies):
        raises what it raises (a closed channel, a lost connection, ``PublishError``)."""
        channel = channel or self.channel
        if channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        underlay = await channel.get_underlay_channel()
        await underlay.basic_publish(body, exchange=exchange, routing_key=routing_key, properties=properties,
                                     mandatory=True)

    def send_reliably(self, message: OneWay[Req], payload: Req) -> None:
        """Queue a one-way ``message`` that must arrive even across a broker outage.

        It is published persistent, with publisher confirms, by a background task that retries
        until the broker takes it (no reply, no deadline: the handler's answer is dropped). Used to
        tell the core that a device was answered "timed out" (``abandon``), whenever that can be
        said again. Bounded by :data:`OUTBOX_MAX`; lost if this process dies first.
        """
        if len(self._outbox) >= OUTBOX_MAX:
            self._outbox.popleft()
            self._outbox_overflow.failed(f"more than {OUTBOX_MAX} one-way messages waiting; dropping the oldest")
        self._outbox.append((message.service.name, message.name, payload.model_dump_json().encode(),
                             current_request_id()))
        self._outbox_wakeup.set()
        if self._outbox_task is None or self._outbox_task.done():
            self._outbox_task = asyncio.create_task(self._drain_outbox(), context=contextvars.Context())

    @property
    def one_way_backlog(self) -> int:
        """One-way messages queued by :meth:`send_reliably` and not yet taken by the broker."""
        return len(self._outbox)

    async def _drain_outbox(self) -> None:
        while not self._closing:
            await self._outbox_wakeup.wait()
            self._outbox_wakeup.clear()
            while self._outbox and not self._closing:
                service, method, body, request_id = self._outbox[0]
                try:
                    exchange = await self._request_exchange(service)
                    await exchange.publish(
                        aio_pika.Message(body, content_type="application/json", type=method,
                                         message_id=uuid.uuid4().hex, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                         headers={REQUEST_ID_HEADER: request_id} if request_id else {}),
                        routing_key=self._settings.queue(service),
                        mandatory=True,
                    )
                except Exception:  # broker away: try again after the reconnect interval
                    await asyncio.sleep(self._settings.bus_reconnect_interval_s)
                    continue
                self._outbox.popleft()
            if not self._outbox:
                self._outbox_overflow.recovered()

    async def _flush_outbox(self, timeout: float) -> None:
        """Give queued one-way messages a bounded chance to leave before the process stops."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self._outbox and self._outbox_task is not None and not self._outbox_task.done() and loop.time() < end:
            await asyncio.sleep(0.05)
        if self._outbox:
            log.warning("%d one-way messages (abandoned requests) not sent before stopping", len(self._outbox))

    async def exchange(self, name: str) -> AbstractExchange:
        """A durable topic exchange of the device-data contract (``contract.*_EXCHANGE``): looked up once,
        declared only when missing (a deployment declares them; a development broker lets us)."""
        return await self._ensure_exchange(self._settings.queue(name), ExchangeType.TOPIC)

    async def publish_event(self, exchange_name: str, routing_key: str, body: bytes) -> None:
        """Publish to a durable topic exchange (declared once), with publisher confirms.

        Not mandatory: an event nobody subscribed to is dropped, as on any topic exchange.
        Raises :class:`RpcError` when the broker cannot take it."""
        await self.publish(exchange_name, routing_key, body, persistent=True)

    async def publish(
        self,
        exchange_name: str,
        routing_key: str,
        body: bytes,
        *,
        type: str | None = None,  # noqa: A002 - the AMQP property's name
        headers: dict[str, Any] | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        expiration: float | None = None,
        mandatory: bool = False,
        persistent: bool = False,
    ) -> None:
        """Publish one message to a contract exchange, with publisher confirms.

        ``mandatory``: raise :class:`NoRoute` when no queue is bound for ``routing_key`` (for
        ``device.downlink``: the device has no session). ``expiration`` (seconds): the broker drops
        the message if it is still queued then. Raises :class:`RpcError` when the broker cannot take it.
        """
        exchange = await self.exchange(exchange_name)
        message = aio_pika.Message(
            body,
            content_type="application/json",
            type=type,
            headers=headers or {},
            reply_to=reply_to,
            correlation_id=correlation_id,
            expiration=expiration,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT,
        )
        try:
            await exchange.publish(message, routing_key=routing_key, mandatory=mandatory)
        except aiormq.exceptions.PublishError:
            raise NoRoute(f"nothing bound to {exchange_name} for this key") from None
        except Exception as exc:
            raise RpcError(f"bus unavailable: {type_name(exc)}") from None

    async def ask(
        self,
        exchange_name: str,
        routing_key: str,
        body: bytes,
        *,
        timeout: float,
        type: str | None = None,  # noqa: A002 - the AMQP property's name
        headers: dict[str, Any] | None = None,
    ) -> bytes:
        """Publish a request to a contract exchange and wait for the one answer to it.

        The message carries this process's reply queue as ``reply_to``, a fresh ``correlation_id``,
        an ``x-deadline`` header and an ``expiration``: whoever handles it (a gateway for a device's
        server-side RPC, the operator's backend for a client-side RPC) publishes the answer body to
        ``rpc.replies`` with routing key ``reply_to`` and the same ``correlation_id`` (:meth:`reply`).
        Raises :class:`NoRoute` when nothing is bound for ``routing_key``, :class:`RpcTimeout` when no
        answer came within ``timeout``, :class:`ConnectionLost` when the bus dropped meanwhile.
        """
        if timeout <= 0:
            raise RpcTimeout("no time left")
        await self._ensure_reply_consumer()
        correlation_id = new_request_id()  # also the default message id
        future: asyncio.Future[_Reply] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        deadline = time.time() + timeout
        try:
            async with asyncio.timeout(timeout):
                await self.publish(
                    exchange_name,
                    routing_key,
                    body,
                    type=type,
                    headers={**(headers or {}), **_call_headers(deadline, current_request_id())},
                    reply_to=self._reply_queue_name,
                    correlation_id=correlation_id,
                    expiration=timeout,
                    mandatory=True,
                )
                _, answer = await future
        except TimeoutError:
            raise RpcTimeout(f"no answer on {exchange_name} within {timeout:.3g}s") from None
        finally:
            self._pending.pop(correlation_id, None)
            _retrieved(future)
        return answer.encode() if isinstance(answer, str) else bytes(answer)

    async def reply(self, reply_to: str, correlation_id: str, body: bytes) -> None:
        """Answer a message that asked (:meth:`ask`, or :meth:`call`'s protocol) on its ``reply_to``:
        published to ``rpc.replies`` with routing key ``reply_to`` (the asker bound its queue there).

        A ``reply_to`` of RabbitMQ's direct reply-to (``amq.rabbitmq.reply-to...``) can only be answered
        on the default exchange, which least-privilege users may not write: that is tried on a channel of
        its own, so a refusal closes only that one (and the answer is dropped, with a warning).
        Dropped silently when the asker is gone (its reply queue no longer exists): it stopped waiting.
        Raises :class:`RpcError` when the broker cannot take it."""
        message = aio_pika.Message(body, content_type="application/json", correlation_id=correlation_id)
        try:
            if reply_to.startswith(DIRECT_REPLY_TO):
                await self._reply_direct(message, reply_to)
                return
            exchange = await self.reply_exchange()
            await exchange.publish(message, routing_key=reply_to, mandatory=True)
        except aiormq.exceptions.PublishError:
            return
        except RpcError:
            raise
        except Exception as exc:
            raise RpcError(f"bus unavailable: {type_name(exc)}") from None

    async def _reply_direct(self, message: aio_pika.Message, reply_to: str) -> None:
        channel = self._direct_reply_channel
        if channel is None or channel.is_closed:
            channel = self._direct_reply_channel = await self._connection.channel()
        try:
            await channel.default_exchange.publish(message, routing_key=reply_to)
        except aiormq.exceptions.ChannelAccessRefused:
            self._direct_reply_channel = None
            with contextlib.suppress(Exception):
                await channel.close()
            log.warning("an answer to a direct reply-to (amq.rabbitmq.reply-to) was dropped: this RabbitMQ user "
                        "may not write to the default exchange; ask with a reply queue bound to %s instead",
                        self._settings.queue(REPLY_EXCHANGE))

    # --- service side ------------------------------------------------------------------

    async def serve(
        self, service: Service, handlers: Iterable[Handler], *, on_undelivered: UndeliveredHook | None = None
    ) -> None:
        """Consume ``service``'s queue and dispatch each message to the handler of its method.

        ``handlers`` must serve exactly the methods the contract declares for ``service``, else
        :class:`~.contract.ContractError` is raised before anything is consumed.

        Uses its own channel so that its prefetch window does not throttle this process's calls.
        Replies are published mandatory with publisher confirms: a reply the broker cannot route
        (the caller's reply queue is gone: it died or its connection dropped) is handed to
        ``on_undelivered`` instead of being logged, body and all, by the AMQP library. A reply lost
        with our own connection leaves its request unacked, so it is redelivered and replayed.
        """
        entry_points = service.entry_points(handlers)
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=self._settings.bus_prefetch)
        queue = await self._declare_service_route(channel, service.name)
        self._declared.add(self._settings.queue(request_exchange(service.name)))
        await self.reply_exchange()  # publishing a reply to a missing exchange would close this channel
        serving = _Serving(channel, self._settings.queue(REPLY_EXCHANGE), entry_points, service.name, on_undelivered)

        async def on_message(message: AbstractIncomingMessage) -> None:
            self._in_flight += 1
            self._idle.clear()
            # The caller's request id (an invalid one is dropped) is in force while this message is handled.
            headers = message.headers or {}
            token = set_request_id(headers.get(REQUEST_ID_HEADER))
            try:
                if headers.get(BATCH_HEADER):
                    await self._handle_batch(serving, message)
                else:
                    await self._handle(serving, message)
            finally:
                reset_request_id(token)
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.set()

        tag = await queue.consume(on_message)
        self._consumers.append((queue, tag))

    async def _answer(
        self, handler: Handler | None, service: str, method: str | None, body: bytes | str, deadline: float | None
    ) -> _Answer:
        """Handle one request (a plain message's, or one of a batch): its reply, or the failure its caller is told."""
        request: BaseModel | None = None
        reply: BaseModel | None = None
        token = _deadline.set(deadline)
        started = time.perf_counter()
        outcome = "error"
        try:
            if handler is None:
                raise RpcError(f"{service} has no method {method!r}")
            if deadline is not None and time.time() >= deadline:
                raise DeadlineExceeded(f"{service}.{method}: deadline passed before it was handled")
            request = handler.method.request.model_validate_json(body)
            # Not cancelled at the deadline: a write cancelled mid-commit would leave its outcome
            # unknown. Handlers check the deadline themselves, and the database refuses to commit
            # past it, so a late handler ends with a clear "too late" (or undoes what it did).
            answer = await handler.func(request)
            if handler.replies:
                if not isinstance(answer, BaseModel):
                    raise TypeError(f"{handler.method} returned {type(answer).__name__}")
                reply = answer
            outcome = "ok"
            return _Answer(request, reply, failed=False)
        except ValidationError as exc:
            outcome = "invalid"
            return _Answer(request, RpcFailure(error=f"invalid {method} request: {exc.error_count()} errors"), True)
        except DeadlineExceeded:
            outcome = "deadline"
            return _Answer(request, RpcFailure(error="deadline exceeded", code=CODE_DEADLINE), True)
        except Unavailable as exc:
            outcome = "unavailable"
            if handler is not None and not handler.replies:
                # A one-way message (an abandon) that a dependency outage kept from being done:
                # nobody waits for it, so try again once the outage may be over instead of losing it.
                return _Answer(request, None, True, retry=True)
            return _Answer(request, RpcFailure(error=str(exc), code=CODE_UNAVAILABLE), True)
        except RpcError as exc:
            return _Answer(request, RpcFailure(error=str(exc)), True)
        except asyncio.CancelledError:
            # Shutting down mid-request: leave it unacked so another instance gets it.
            raise
        except Exception as exc:
            log.exception("%s.%s failed", service, method)
            return _Answer(request, RpcFailure(error=f"{type(exc).__name__}"), True)
        finally:
            _deadline.reset(token)
            # Only declared methods are labels: a message naming another method counts as "unknown".
            labels = (service, method if handler is not None and method else "unknown")
            metrics.series(metrics.RPC_SERVER_SECONDS, *labels).observe(time.perf_counter() - started)
            metrics.series(metrics.RPC_SERVER_CALLS, *labels, outcome).inc()

    async def _handle(self, serving: _Serving, message: AbstractIncomingMessage) -> None:
        """A plain message: one request, answered alone, then acked."""
        async with self._handling:
            answer = await self._answer(serving.handlers.get(message.type or ""), serving.service, message.type,
                                        message.body, _header_deadline(message))
        if answer.retry:
            await asyncio.sleep(self._settings.bus_reconnect_interval_s)
            with contextlib.suppress(Exception):  # the channel is gone: the broker redelivers it anyway
                await message.nack(requeue=True)
            return
        if message.reply_to and answer.reply is not None:  # None: a one-way method was handled
            try:
                # Always rpc.replies, never the default exchange (a forged reply_to cannot make a
                # service write where its user may not, which would close its consuming channel).
                properties = aiormq.spec.Basic.Properties(
                    content_type=JSON, correlation_id=message.correlation_id,
                    message_id=message.message_id, headers={ERROR_HEADER: 1} if answer.failed else {},
                )
                await self._publish_properties(serving.replies, message.reply_to,
                                               answer.reply.model_dump_json().encode(), properties, serving.channel)
            except aiormq.exceptions.PublishError:
                # Returned unroutable: the caller's reply queue is gone, nobody will read this answer.
                await self._undelivered(answer, serving)
            except Exception as exc:  # our connection dropped: leave the request unacked (redelivered)
                self._outage.failed(f"reply not sent ({type(exc).__name__})")
                return
        await self._ack(message)

    async def _handle_batch(self, serving: _Serving, message: AbstractIncomingMessage) -> None:
        """A batch message: each request handled on its own, concurrently; the answers that are ready together
        leave in one message; acked once all are out."""
        handler, service = serving.handlers.get(message.type or ""), serving.service
        try:
            requests = _BATCH_REQUESTS.validate_json(message.body)
        except ValidationError:
            requests = []
        if handler is None or not handler.replies or not requests or not message.reply_to:
            # Only a caller that is not this bus's makes one: nobody to answer (no correlation ids to answer by).
            log.warning("%s: dropped a batch message of %r that is not a batch of requests to answer", service,
                        message.type)
            await self._ack(message)
            return
        answers: Batcher[tuple[str, bool, str], bool] = Batcher(
            functools.partial(self._publish_replies, serving, message.reply_to, message.correlation_id),
            max_batch=len(requests), name=f"reply.{service}")

        async def one(request: BatchedRequest) -> None:
            token = set_request_id(request.rid)
            try:
                async with self._handling:
                    answer = await self._answer(handler, service, message.type, request.b, request.dl)
            finally:
                reset_request_id(token)
            assert answer.reply is not None  # a method that replies (checked above)
            if not await answers.submit((request.id, answer.failed, answer.reply.model_dump_json())):
                await self._undelivered(answer, serving)

        outcomes = await asyncio.gather(*(one(request) for request in requests), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            if isinstance(outcome, BaseException):  # our connection dropped: leave the batch unacked (redelivered)
                self._outage.failed(f"reply not sent ({type(outcome).__name__})")
                return
        await self._ack(message)

    async def _publish_replies(
        self, serving: _Serving, reply_to: str, correlation_id: str | None, answers: list[tuple[str, bool, str]],
    ) -> list[bool]:
        """Publish answers of one batch in one message; per answer, whether it could be routed to its caller."""
        body = _BATCH_REPLIES.dump_json([BatchedReply.model_construct(id=id_, err=failed, b=reply)
                                         for id_, failed, reply in answers])
        properties = aiormq.spec.Basic.Properties(content_type=JSON, correlation_id=correlation_id,
                                                  headers={BATCH_HEADER: len(answers)})
        try:
            await self._publish_properties(serving.replies, reply_to, body, properties, serving.channel)
        except aiormq.exceptions.PublishError:
            return [False] * len(answers)
        return [True] * len(answers)

    @staticmethod
    async def _undelivered(answer: _Answer, serving: _Serving) -> None:
        """An answer came back unroutable (its caller is gone): let the service undo what nobody was told."""
        hook = serving.on_undelivered
        if hook is not None and answer.request is not None and answer.reply is not None and not answer.failed:
            await _quietly(hook(answer.request, answer.reply), serving.service)

    async def _ack(self, message: AbstractIncomingMessage) -> None:
        try:
            await message.ack()
        except Exception as exc:  # the channel is gone; the broker redelivers the request
            self._outage.failed(f"ack not sent ({type(exc).__name__})")

    async def stop_consuming(self, drain_timeout: float = 10.0) -> None:
        """Stop taking new requests and wait (bounded) for the ones in progress to be answered."""
        for queue, tag in self._consumers:
            with contextlib.suppress(Exception):  # the connection is already gone
                await queue.cancel(tag)
        self._consumers.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), drain_timeout)
        except TimeoutError:
            log.warning("%d requests still in flight at shutdown; they will be redelivered", self._in_flight)

    async def close(self) -> None:
        await self._flush_outbox(timeout=2.0)
        self._closing = True
        if self._outbox_task is not None:
            self._outbox_task.cancel()
        for future in self._pending.values():
            if not future.done():
                future.cancel()
        await self._connection.close()


def _expiration(seconds: float) -> str:
    """An AMQP ``expiration`` (milliseconds, as a string), as aio_pika encodes a number of seconds."""
    return str(int(seconds * 1000))


def _call_headers(deadline: float, request_id: str | None) -> dict[str, Any]:
    """The call context of a request: its deadline, and the request id in force when it was made (if any)."""
    headers: dict[str, Any] = {DEADLINE_HEADER: f"{deadline:.6f}"}
    if request_id is not None:
        headers[REQUEST_ID_HEADER] = request_id
    return headers


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a reply future's exception as seen: a lost connection fails every pending call's future, also of
    calls that end another way (their publish failed too), and asyncio would log each as never retrieved."""
    if future.done() and not future.cancelled():
        future.exception()


def _batch_body(calls: list[_Outgoing]) -> bytes:
    """A batch message's body: the JSON array of :class:`BatchedRequest`."""
    return _BATCH_REQUESTS.dump_json([
        BatchedRequest.model_construct(id=call.correlation_id, dl=call.deadline, rid=call.request_id,
                                       b=call.body.decode())
        for call in calls
    ])


def _header_deadline(message: AbstractIncomingMessage) -> float | None:
    raw = (message.headers or {}).get(DEADLINE_HEADER)
    if raw is None:
        return None
    try:
        return float(raw.decode() if isinstance(raw, bytes) else str(raw))
    except (TypeError, ValueError):
        return None


async def _quietly(awaitable: Awaitable[None], service: str) -> None:
    try:
        await awaitable
    except Exception as exc:
        log.warning("%s: could not undo the work of an undelivered reply: %s", service, type(exc).__name__)
