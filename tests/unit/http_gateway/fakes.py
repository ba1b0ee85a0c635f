"""Stand-ins for the bus side of the HTTP gateway's device API (no RabbitMQ): a TransportApi whose
links record attachments and answers, and a bus that records forwarded replies and claimed tags."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiormq.exceptions
from provisioning_common.bus import RpcError
from provisioning_common.device_link import Downlink
from provisioning_common.models import AttributesQuery, AttributesSnapshot, AuthenticateRequest, AuthenticateResult

#: token -> device id
TOKENS = {"token-a": "device-a", "token-b": "device-b"}


class FakeQueue:
    def __init__(self, name: str) -> None:
        self.name = name
        self.callback: Any = None

    async def consume(self, callback: Any, no_ack: bool = False) -> str:
        self.callback = callback
        return "tag"


class FakeChannel:
    def __init__(self, bus: FakeBus) -> None:
        self.bus = bus
        self.closed = False

    async def declare_queue(self, name: str, **kwargs: Any) -> FakeQueue:
        if name in self.bus.taken:
            raise aiormq.exceptions.ChannelLockedResource("RESOURCE_LOCKED")
        self.bus.taken.add(name)
        queue = self.bus.queues[name] = FakeQueue(name)
        return queue

    async def close(self) -> None:
        self.closed = True


@dataclass
class FakeBus:
    taken: set[str] = field(default_factory=set)
    queues: dict[str, FakeQueue] = field(default_factory=dict)
    replies: list[tuple[str, str, bytes]] = field(default_factory=list)
    down: bool = False

    async def open_channel(self) -> FakeChannel:
        if self.down:
            raise ConnectionError("down")
        return FakeChannel(self)

    async def reply(self, reply_to: str, correlation_id: str, body: bytes) -> None:
        if self.down:
            raise RpcError("bus unavailable")
        self.replies.append((reply_to, correlation_id, body))


class FakeLinks:
    def __init__(self, bus: FakeBus) -> None:
        self.bus = bus
        self.sinks: dict[str, list[Any]] = {}
        self.attached = asyncio.Event()
        self.answers: list[tuple[Downlink, bytes]] = []
        self.detached = 0

    async def attach(self, device_id: str, sink: Any) -> tuple[str, Any]:
        self.sinks.setdefault(device_id, []).append(sink)
        self.attached.set()
        return (device_id, sink)

    async def detach(self, attachment: tuple[str, Any]) -> None:
        device_id, sink = attachment
        self.sinks[device_id].remove(sink)
        if not self.sinks[device_id]:
            del self.sinks[device_id]
        self.detached += 1

    def deliver(self, device_id: str, downlink: Downlink) -> int:
        sinks = list(self.sinks.get(device_id, []))
        for sink in sinks:
            sink(downlink)
        return len(sinks)

    async def wait_attached(self, device_id: str, count: int = 1) -> None:
        while len(self.sinks.get(device_id, [])) < count:
            self.attached.clear()
            await asyncio.wait_for(self.attached.wait(), 5)

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
