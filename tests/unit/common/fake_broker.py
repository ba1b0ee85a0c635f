"""An in-memory stand-in for RabbitMQ: what the Bus uses of aio_pika (queues by name, a consumer each,
exchanges that route by routing key = queue name, as the Bus binds them), so that calls, replies and
one-way messages make real round trips in unit tests."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from provisioning_common import bus as bus_module
from provisioning_common.bus import Bus
from provisioning_common.settings import Settings


class Delivered:
    """What a consumer gets (the attributes of aio_pika's incoming message that the Bus reads)."""

    def __init__(self, message: Any, broker: Broker | None = None, routing_key: str = "") -> None:
        self.message, self.broker, self.routing_key = message, broker, routing_key
        self.body, self.type, self.headers = message.body, message.type, message.headers
        self.reply_to, self.correlation_id, self.message_id = (
            message.reply_to, message.correlation_id, message.message_id)
        self.acked = False

    async def ack(self) -> None:
        self.acked = True

    async def nack(self, requeue: bool = True) -> None:
        """Like RabbitMQ: a requeued message is delivered again."""
        if self.broker is not None and requeue:
            self.broker.requeued += 1
            self.broker.deliver(self.routing_key, self.message)


class Broker:
    def __init__(self) -> None:
        self.consumers: dict[str, Callable[[Any], Awaitable[None]]] = {}
        self.waiting: dict[str, list[Any]] = {}
        self.declared: list[str] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = 0  # connections closed
        self.requeued = 0

    def deliver(self, routing_key: str, message: Any) -> None:
        consumer = self.consumers.get(routing_key)
        if consumer is None:
            self.waiting.setdefault(routing_key, []).append(message)
            return
        task = asyncio.create_task(consumer(Delivered(message, self, routing_key)))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class _Queue:
    _tags = itertools.count()

    def __init__(self, broker: Broker, name: str) -> None:
        self.broker, self.name = broker, name

    async def consume(self, callback: Callable[[Any], Awaitable[None]], no_ack: bool = False) -> str:
        self.broker.consumers[self.name] = callback
        for message in self.broker.waiting.pop(self.name, []):
            self.broker.deliver(self.name, message)
        return f"tag-{next(self._tags)}"

    async def cancel(self, tag: str) -> None:
        self.broker.consumers.pop(self.name, None)

    async def bind(self, exchange: Any, routing_key: str = "") -> None:
        pass


class _Exchange:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def publish(self, message: Any, routing_key: str, mandatory: bool = True) -> None:
        self.broker.deliver(routing_key, message)


class _Published:
    """A message the Bus published with bare AMQP properties (``Bus._publish_properties``), as aio_pika names them."""

    def __init__(self, body: bytes, properties: Any) -> None:
        self.body, self.type, self.headers = body, properties.message_type, properties.headers or {}
        self.reply_to, self.correlation_id, self.message_id = (
            properties.reply_to, properties.correlation_id, properties.message_id)


class _Underlay:
    """aiormq's channel under a channel: ``basic_publish`` routes like the exchanges (routing key = queue name)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def basic_publish(self, body: bytes, *, exchange: str = "", routing_key: str = "", properties: Any = None,
                            mandatory: bool = False) -> None:
        self.broker.deliver(routing_key, _Published(body, properties))


class _Channel:
    is_closed = False

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.default_exchange = _Exchange(broker)

    async def get_underlay_channel(self) -> _Underlay:
        return _Underlay(self.broker)

    async def declare_queue(self, name: str, **_: Any) -> _Queue:
        self.broker.declared.append(name)
        return _Queue(self.broker, name)

    async def declare_exchange(self, name: str, *_: Any, **__: Any) -> _Exchange:
        return _Exchange(self.broker)

    async def get_exchange(self, name: str, ensure: bool = True) -> _Exchange:
        return _Exchange(self.broker)

    async def close(self) -> None:
        pass

    async def set_qos(self, **_: Any) -> None:
        pass


class _Connected:
    def is_set(self) -> bool:
        return True


class _Connection:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.close_callbacks: set[Any] = set()
        self.connected = _Connected()

    async def channel(self, **_: Any) -> _Channel:
        return _Channel(self.broker)

    async def close(self) -> None:
        self.broker.closed += 1


def install(monkeypatch: pytest.MonkeyPatch) -> tuple[Broker, dict[str, Any]]:
    """From now on Bus.connect talks to a new in-memory broker; the dict gets connect_robust's keywords."""
    shared, seen = Broker(), {}

    async def connect_robust(url: str, **kwargs: Any) -> _Connection:
        seen.update(kwargs)
        return _Connection(shared)

    monkeypatch.setattr(bus_module.aio_pika, "connect_robust", connect_robust)
    return shared, seen


async def connect(name: str = "unit_tests", **settings: Any) -> Bus:
    return await Bus.connect(Settings(bus_namespace="unit.", provision_timeout_s=5, **settings), name)
