"""RPC and events over RabbitMQ: the one place that knows about correlation ids and reply queues.

A caller (:meth:`Bus.call`) publishes a pydantic model to a service's durable queue with
``reply_to`` = this process's own reply queue and a fresh ``correlation_id``, then awaits the
matching reply. The message carries a TTL equal to the caller's timeout, so nothing is
processed after the caller gave up. A service (:meth:`Bus.serve`) consumes its queue with a
prefetch window, validates each body into the handler's model, and replies before it acks, so a
crash between the two redelivers the request (at-least-once; handlers are idempotent by
``message_id``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    ExchangeType,
)
from pydantic import BaseModel, ValidationError

from .models import RpcFailure
from .settings import Settings

log = logging.getLogger(__name__)

Req = TypeVar("Req", bound=BaseModel)
Resp = TypeVar("Resp", bound=BaseModel)

#: Header set on a reply whose body is an :class:`RpcFailure` instead of the handler's model.
ERROR_HEADER = "x-rpc-error"

# Queue and exchange names (prefixed with BUS_NAMESPACE): the bus-level contract between services.
CORE_SERVICE = "provisioning_core"
CREDENTIALS_SERVICE = "credentials"
TELEMETRY_EXCHANGE = "device.telemetry"


class RpcError(RuntimeError):
    """The remote handler failed; the message is the remote's (secret-free) description."""


class RpcTimeout(RpcError):
    """No reply within the timeout: the service is slow, down, or the request expired in its queue."""


@dataclass(frozen=True)
class Handler(Generic[Req]):
    """One RPC entry point of a service: validates the body into ``model`` and awaits ``func``."""

    model: type[Req]
    func: Callable[[Req], Awaitable[BaseModel]]


class Bus:
    """One robust connection per process: a confirmed publishing channel and a private reply queue."""

    def __init__(self, settings: Settings, connection: AbstractRobustConnection) -> None:
        self._settings = settings
        self._connection = connection
        self._channel: AbstractChannel | None = None
        self._reply_queue_name = settings.queue(f"reply.{uuid.uuid4().hex}")
        self._pending: dict[str, asyncio.Future[AbstractIncomingMessage]] = {}
        self._declared: set[str] = set()
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._exchanges: dict[str, AbstractExchange] = {}
        self._reply_consumer_started = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @classmethod
    async def connect(cls, settings: Settings) -> "Bus":
        connection = await aio_pika.connect_robust(
            settings.rabbitmq_url.get_secret_value(), client_properties={"connection_name": "provisioning"}
        )
        bus = cls(settings, connection)
        bus._channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        return bus

    @property
    def is_connected(self) -> bool:
        return self._connection.connected.is_set() and self._channel is not None and not self._channel.is_closed

    @property
    def channel(self) -> AbstractChannel:
        assert self._channel is not None, "Bus.connect() first"
        return self._channel

    # --- queues ------------------------------------------------------------------------

    async def _declare_service_queue(self, service: str, channel: AbstractChannel | None = None) -> AbstractQueue:
        """Declare a service's request queue with identical arguments on every side.

        Callers declare it too, so that requests wait for a service that is starting instead
        of being dropped as unroutable.
        """
        args: dict[str, Any] = {"x-queue-type": self._settings.bus_queue_type}
        if self._settings.bus_queue_type == "quorum":
            args["x-delivery-limit"] = 5
        queue = await (channel or self.channel).declare_queue(
            self._settings.queue(service), durable=True, arguments=args
        )
        self._declared.add(service)
        return queue

    async def _ensure_reply_consumer(self) -> None:
        if self._reply_consumer_started:
            return
        self._reply_consumer_started = True
        queue = await self.channel.declare_queue(self._reply_queue_name, exclusive=True, auto_delete=True)
        await queue.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message)

    # --- caller side -------------------------------------------------------------------

    async def call(
        self,
        service: str,
        method: str,
        payload: BaseModel,
        response_model: type[Resp],
        *,
        timeout: float | None = None,
        message_id: str | None = None,
    ) -> Resp:
        """Send ``payload`` to ``service.method`` and return its validated reply.

        Raises :class:`RpcTimeout` after ``timeout`` seconds (default ``PROVISION_TIMEOUT_S``)
        and :class:`RpcError` when the remote failed or the bus is unreachable.
        """
        timeout = timeout if timeout is not None else self._settings.provision_timeout_s
        await self._ensure_reply_consumer()
        if service not in self._declared:
            await self._declare_service_queue(service)
        body = payload.model_dump_json().encode()
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[AbstractIncomingMessage] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        message = aio_pika.Message(
            body,
            content_type="application/json",
            type=method,
            correlation_id=correlation_id,
            message_id=message_id or correlation_id,
            reply_to=self._reply_queue_name,
            expiration=timeout,
            # Transient: a request lives at most ``timeout`` seconds, after which its caller has
            # answered the device anyway; writing it to disk would only cost broker time.
            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
        )
        try:
            async with asyncio.timeout(timeout):
                await self.channel.default_exchange.publish(
                    message, routing_key=self._settings.queue(service), mandatory=True
                )
                reply = await future
        except TimeoutError:
            raise RpcTimeout(f"{service}.{method} did not answer within {timeout:g}s") from None
        except RpcError:
            raise
        except Exception as exc:  # connection lost, channel closed, unroutable
            raise RpcError(f"bus unavailable: {type(exc).__name__}") from None
        finally:
            self._pending.pop(correlation_id, None)
        if reply.headers.get(ERROR_HEADER):
            raise RpcError(RpcFailure.model_validate_json(reply.body).error)
        return response_model.model_validate_json(reply.body)

    async def publish_event(self, exchange_name: str, routing_key: str, body: bytes) -> None:
        """Publish to a durable topic exchange (declared once), with publisher confirms.

        Raises :class:`RpcError` when the broker cannot take it."""
        exchange = self._exchanges.get(exchange_name)
        if exchange is None:
            exchange = await self.channel.declare_exchange(
                self._settings.queue(exchange_name), ExchangeType.TOPIC, durable=True
            )
            self._exchanges[exchange_name] = exchange
        try:
            # Not mandatory: an event nobody subscribed to is dropped, as on any topic exchange.
            await exchange.publish(
                aio_pika.Message(body, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=routing_key,
                mandatory=False,
            )
        except Exception as exc:
            raise RpcError(f"bus unavailable: {type(exc).__name__}") from None

    # --- service side ------------------------------------------------------------------

    async def serve(self, service: str, handlers: dict[str, Handler[Any]]) -> None:
        """Consume ``service``'s queue and dispatch each message to ``handlers[message.type]``.

        Uses its own channel so that its prefetch window does not throttle this process's calls.
        Replies are not confirmed: one lost with the connection leaves its request unacked, so
        the request is redelivered and its answer replayed.
        """
        channel = await self._connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=self._settings.bus_prefetch)
        queue = await self._declare_service_queue(service, channel)

        async def on_message(message: AbstractIncomingMessage) -> None:
            self._in_flight += 1
            self._idle.clear()
            try:
                await self._handle(channel, handlers, service, message)
            finally:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.set()

        tag = await queue.consume(on_message)
        self._consumers.append((queue, tag))

    async def _handle(
        self,
        channel: AbstractChannel,
        handlers: dict[str, Handler[Any]],
        service: str,
        message: AbstractIncomingMessage,
    ) -> None:
        handler = handlers.get(message.type or "")
        headers: dict[str, Any] = {}
        try:
            if handler is None:
                raise RpcError(f"{service} has no method {message.type!r}")
            request = handler.model.model_validate_json(message.body)
            reply: BaseModel = await handler.func(request)
        except ValidationError as exc:
            reply, headers = RpcFailure(error=f"invalid {message.type} request: {exc.error_count()} errors"), {
                ERROR_HEADER: 1
            }
        except RpcError as exc:
            reply, headers = RpcFailure(error=str(exc)), {ERROR_HEADER: 1}
        except asyncio.CancelledError:
            # Shutting down mid-request: leave it unacked so another instance gets it.
            raise
        except Exception as exc:
            log.exception("%s.%s failed", service, message.type)
            reply, headers = RpcFailure(error=f"{type(exc).__name__}"), {ERROR_HEADER: 1}
        if message.reply_to:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    reply.model_dump_json().encode(),
                    content_type="application/json",
                    correlation_id=message.correlation_id,
                    headers=headers,
                ),
                routing_key=message.reply_to,
            )
        await message.ack()

    async def stop_consuming(self, drain_timeout: float = 10.0) -> None:
        """Stop taking new requests and wait (bounded) for the ones in progress to be answered."""
        for queue, tag in self._consumers:
            try:
                await queue.cancel(tag)
            except Exception:  # pragma: no cover - connection already gone
                pass
        self._consumers.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), drain_timeout)
        except TimeoutError:
            log.warning("%d requests still in flight at shutdown; they will be redelivered", self._in_flight)

    async def close(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.cancel()
        await self._connection.close()
