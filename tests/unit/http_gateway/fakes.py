"""Stand-ins for the bus side of the HTTP gateway's device API (no RabbitMQ): a small broker with what the
gateway uses of aio-pika (queues bound by routing key, consumers with prefetch 1 and manual acks, exclusive
queues, the default exchange for replies), and a TransportApi whose other calls are recorded."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import aiormq.exceptions
from provisioning_common.bus import RpcError
from provisioning_common.contract import DOWNLINK_ATTRIBUTES, DOWNLINK_RPC
from provisioning_common.device_link import Downlink
from provisioning_common.models import AttributesQuery, AttributesSnapshot, AuthenticateRequest, AuthenticateResult

#: token -> device id
TOKENS = {"token-a": "device-a", "token-b": "device-b"}


@dataclass
class Incoming:
    """What a consumer gets (the attributes parse_downlink reads), settled with ack/nack."""

    body: bytes
    type: str
    routing_key: str
    reply_to: str | None = None
    correlation_id: str | None = None
    expiration: float | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    queue: FakeQueue | None = None
    consumer: str | None = None
    settled: str = ""

    async def ack(self) -> None:
        self._settle("ack")

    async def nack(self, requeue: bool = True) -> None:
        self._settle("nack")
        if requeue and self.queue is not None:
            self.queue.messages.appendleft(self)
            self.queue.dispatch()

    def _settle(self, how: str) -> None:
        assert not self.settled, "settled twice"
        self.settled = how
        if self.queue is not None and self.consumer in self.queue.consumers:
            self.queue.consumers[self.consumer][1] = 0
            self.queue.dispatch()

    def fresh(self) -> Incoming:
        return Incoming(self.body, self.type, self.routing_key, self.reply_to, self.correlation_id, self.expiration,
                        self.headers)


class FakeQueue:
    _tags = itertools.count()

    def __init__(self, broker: FakeBus, name: str, arguments: dict[str, Any] | None) -> None:
        self.broker, self.name, self.arguments = broker, name, arguments or {}
        self.messages: deque[Incoming] = deque()
        #: consumer tag -> [callback, unacked]
        self.consumers: dict[str, list[Any]] = {}
        self.changed = asyncio.Event()

    async def bind(self, exchange: Any, routing_key: str) -> None:
        self.broker.bindings.setdefault(routing_key, set()).add(self.name)

    async def consume(self, callback: Any, no_ack: bool = False) -> str:
        tag = f"ctag-{next(self._tags)}"
        self.consumers[tag] = [callback, 0]
        self.changed.set()
        self.dispatch()
        return tag

    async def cancel(self, tag: str) -> None:
        self.consumers.pop(tag, None)
        self.changed.set()

    def dispatch(self) -> None:
        for tag, state in list(self.consumers.items()):
            if not self.messages:
                return
            if state[1] == 0:
                message = self.messages.popleft().fresh()
                message.queue, message.consumer = self, tag
                state[1] = 1
                self.broker.tasks.add(asyncio.get_running_loop().create_task(state[0](message)))

    async def wait_consumers(self, count: int) -> None:
        while len(self.consumers) != count:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 5)


class FakeChannel:
    def __init__(self, bus: FakeBus) -> None:
        self.bus = bus
        self.is_closed = False

    async def set_qos(self, prefetch_count: int = 0) -> None:
        assert prefetch_count == 1
        self.prefetch = prefetch_count

    async def declare_queue(self, name: str, *, exclusive: bool = False, auto_delete: bool = False,
                            arguments: dict[str, Any] | None = None) -> FakeQueue:
        if exclusive:
            if name in self.bus.taken:
                raise aiormq.exceptions.ChannelLockedResource("RESOURCE_LOCKED")
            self.bus.taken.add(name)
        if name not in self.bus.queues:
            self.bus.queues[name] = FakeQueue(self.bus, name, arguments)
        return self.bus.queues[name]

    async def get_queue(self, name: str, ensure: bool = True) -> FakeQueue:
        assert not ensure
        return self.bus.queues[name]

    async def close(self) -> None:
        self.is_closed = True


@dataclass
class FakeBus:
    taken: set[str] = field(default_factory=set)
    queues: dict[str, FakeQueue] = field(default_factory=dict)
    bindings: dict[str, set[str]] = field(default_factory=dict)
    replies: list[tuple[str, str, bytes]] = field(default_factory=list)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    down: bool = False

    @property
    def is_connected(self) -> bool:
        return not self.down

    async def open_channel(self) -> FakeChannel:
        if self.down:
            raise ConnectionError("down")
        return FakeChannel(self)

    async def exchange(self, name: str) -> str:
        return name

    async def bind_replies(self, queue: FakeQueue) -> None:
        pass

    async def reply(self, reply_to: str, correlation_id: str, body: bytes) -> None:
        if self.down:
            raise RpcError("bus unavailable")
        self.replies.append((reply_to, correlation_id, body))

    def publish(self, device_id: str, downlink: Downlink) -> int:
        """A downlink message for ``device_id``, to every queue bound for it; the number of queues."""
        names = self.bindings.get(device_id, set())
        for name in names:
            queue = self.queues[name]
            queue.messages.append(Incoming(
                json.dumps(downlink.body).encode(), downlink.kind, device_id, downlink.reply_to,
                downlink.correlation_id,
                None if downlink.deadline is None else max(0.001, downlink.deadline - time.time())))
            queue.dispatch()
        return len(names)

    def queue(self, kind: str, device_id: str) -> FakeQueue:
        return self.queues[f"unit.http_gateway.{kind}.{device_id}"]

    async def wait_polling(self, kind: str, device_id: str, count: int = 1) -> None:
        name = f"unit.http_gateway.{kind}.{device_id}"
        for _ in range(500):
            if name in self.queues:
                break
            await asyncio.sleep(0.01)
        await self.queues[name].wait_consumers(count)


class FakeLinks:
    def __init__(self, bus: FakeBus) -> None:
        self.bus = bus
        self.answers: list[tuple[Downlink, bytes]] = []

    async def answer(self, downlink: Downlink, body: bytes) -> bool:
        if not downlink.two_way or downlink.expired():
            return False
        self.answers.append((downlink, body))
        return True


class FakeApi:
    def __init__(self) -> None:
        self.bus = FakeBus()
        self.links = FakeLinks(self.bus)
        self.queries: list[AttributesQuery] = []
        self.saved: list[tuple[str, dict[str, Any]]] = []
        self.telemetry: list[tuple[str, bytes]] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.rpc_answer: bytes | None = b'{"result":4}'
        self.snapshot = AttributesSnapshot(client={"fw": "1.0"}, shared={"interval": 5})
        self.save_error: RpcError | None = None

    async def authenticate(self, request: AuthenticateRequest) -> AuthenticateResult:
        if self.bus.down:
            raise RpcError("bus unavailable")
        device = TOKENS.get(request.token)
        return AuthenticateResult(authenticated=device is not None, device_id=device)

    async def authenticate_token(self, token: str) -> AuthenticateResult:
        return await self.authenticate(AuthenticateRequest(token=token))

    async def get_attributes(self, query: AttributesQuery) -> AttributesSnapshot:
        self.queries.append(query)
        return self.snapshot

    async def save_client_attributes(self, device_id: str, values: dict[str, Any]) -> None:
        if self.save_error is not None:
            raise self.save_error
        self.saved.append((device_id, values))

    async def publish_telemetry(self, device_id: str, payload: bytes) -> None:
        self.telemetry.append((device_id, payload))

    async def client_rpc(self, device_id: str, call: dict[str, Any], *, max_payload_size: int) -> bytes | None:
        self.calls.append((device_id, call))
        return self.rpc_answer


__all__ = ["DOWNLINK_ATTRIBUTES", "DOWNLINK_RPC", "FakeApi", "TOKENS"]
