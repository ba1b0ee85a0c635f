"""Downlink routing: messages for a device reach the gateway instance that holds its session.

Each gateway process has one queue of its own (exclusive, deleted with its connection) bound to the
``device.downlink`` exchange by device id for as long as one of its sessions holds that device. A
message published there for a device therefore reaches every instance that holds it and nobody else;
for a device with no session it is unroutable, which a ``mandatory`` publisher sees (RPC: "device
offline"; attribute updates simply wait in Postgres for the device's next request). A gateway that
dies takes its queue with it: messages for its devices are never stranded where nobody reads them,
and the others' are untouched.

Sessions register a *sink* per device (:meth:`DeviceLinks.attach`); the first sink of a device binds
the queue, the last one to leave unbinds it. The gateway stays stateless apart from these sinks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractQueue

from .bus import DEADLINE_HEADER, Bus, RpcError
from .contract import DOWNLINK_ATTRIBUTES, DOWNLINK_EXCHANGE, DOWNLINK_REVOKED, DOWNLINK_RPC

log = logging.getLogger(__name__)

#: Messages a gateway's downlink queue hands over before it waits for acknowledgements.
DOWNLINK_PREFETCH = 512


@dataclass(frozen=True)
class Downlink:
    """One message for a device, as its session receives it."""

    #: ``contract.DOWNLINK_RPC``, ``DOWNLINK_ATTRIBUTES`` or ``DOWNLINK_REVOKED``.
    kind: str
    #: The JSON body, already checked to be a JSON object.
    body: dict[str, Any]
    #: Where a two-way RPC's answer goes (None: one-way, or not an RPC).
    reply_to: str | None = None
    correlation_id: str | None = None
    #: Unix time after which nobody waits for an answer (None: no limit given).
    deadline: float | None = None

    @property
    def two_way(self) -> bool:
        return self.kind == DOWNLINK_RPC and bool(self.reply_to and self.correlation_id)

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now if now is not None else time.time()) >= self.deadline

    def seconds_left(self, default: float) -> float:
        """How long the device may take to answer: until the deadline, or ``default`` without one."""
        return default if self.deadline is None else max(0.0, self.deadline - time.time())

    def revokes(self, since: float) -> bool:
        """Whether this is a ``revoked`` message that ends a session which logged in at ``since`` (Unix time):
        one that logged in after the revocation used credentials valid now (a re-provisioned device connecting
        with its new token at once) and stays. A message that does not say when (``revokedAt``) ends any."""
        if self.kind != DOWNLINK_REVOKED:
            return False
        value = self.body.get("revokedAt")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return True
        return float(value) >= since


#: A session's callback for the messages of its device; must not block (queue the work itself).
Sink = Callable[[Downlink], None]


@dataclass(eq=False)
class Attachment:
    """A session's registration for one device; hand it back to :meth:`DeviceLinks.detach`."""

    device_id: str
    sink: Sink
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


class DeviceLinks:
    """This gateway process's downlink queue and the sessions' sinks, by device id."""

    def __init__(self, bus: Bus, service: str) -> None:
        self._bus = bus
        self._service = service
        self._queue: AbstractQueue | None = None
        self._sinks: dict[str, dict[str, Attachment]] = {}
        #: Per device: serialises bind/unbind so a quick reconnect never ends unbound.
        self._locks: dict[str, asyncio.Lock] = {}
        self._started = asyncio.Lock()

    @property
    def bus(self) -> Bus:
        return self._bus

    async def _ensure_queue(self) -> AbstractQueue:
        async with self._started:
            if self._queue is None:
                channel = await self._bus.open_channel()
                await channel.set_qos(prefetch_count=DOWNLINK_PREFETCH)
                name = self._bus.settings.queue(f"downlink.{self._service}.{uuid.uuid4().hex[:12]}")
                # Exclusive: deleted with this process's connection (so never stranded), but not
                # auto-delete, which would also delete it when its consumer's channel closes on an error.
                queue = await channel.declare_queue(name, exclusive=True)
                await queue.consume(self._on_message)
                self._queue = queue
            return self._queue

    async def attach(self, device_id: str, sink: Sink) -> Attachment:
        """Deliver ``device_id``'s downlink messages to ``sink`` until :meth:`detach`.

        Returns once the binding exists: a message published after this reaches the sink.
        Raises :class:`~.bus.RpcError` when the broker is unreachable."""
        queue = await self._ensure_queue()
        attachment = Attachment(device_id, sink)
        lock = self._locks.setdefault(device_id, asyncio.Lock())
        async with lock:
            sinks = self._sinks.setdefault(device_id, {})
            first = not sinks
            sinks[attachment.id] = attachment
            if first:
                try:
                    exchange = await self._bus.exchange(DOWNLINK_EXCHANGE)
                    await queue.bind(exchange, routing_key=device_id)
                except Exception as exc:
                    sinks.pop(attachment.id, None)
                    if not sinks:
                        self._sinks.pop(device_id, None)
                    raise RpcError(f"bus unavailable: {type(exc).__name__}") from None
        return attachment

    async def detach(self, attachment: Attachment) -> None:
        """Stop delivering to this attachment; the last one of its device unbinds the queue."""
        device_id = attachment.device_id
        lock = self._locks.setdefault(device_id, asyncio.Lock())
        async with lock:
            sinks = self._sinks.get(device_id)
            if sinks is None or sinks.pop(attachment.id, None) is None:
                return
            if sinks:
                return
            del self._sinks[device_id]
            self._locks.pop(device_id, None)
            if self._queue is not None:
                # The connection may be gone (then so is the exclusive queue and its bindings).
                with contextlib.suppress(Exception):
                    exchange = await self._bus.exchange(DOWNLINK_EXCHANGE)
                    await _unbind(self._queue, exchange, device_id)

    @property
    def attached_devices(self) -> int:
        return len(self._sinks)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        async with message.process(ignore_processed=True):
            downlink = parse_downlink(message)
            if downlink is None:
                log.warning("dropped a malformed %s message (type %r)", DOWNLINK_EXCHANGE, message.type)
                return
            if downlink.expired():
                return
            for attachment in list(self._sinks.get(message.routing_key or "", {}).values()):
                try:
                    attachment.sink(downlink)
                except Exception:  # one session's failure never affects the others
                    log.exception("a session failed to take a downlink message")

    async def answer(self, downlink: Downlink, body: bytes) -> bool:
        """Send a device's answer to a two-way RPC back to whoever asked; False when nobody waits."""
        if not downlink.two_way or downlink.expired():
            return False
        assert downlink.reply_to is not None and downlink.correlation_id is not None
        await self._bus.reply(downlink.reply_to, downlink.correlation_id, body)
        return True


async def _unbind(queue: AbstractQueue, exchange: AbstractExchange, routing_key: str) -> None:
    """``queue.unbind``, in O(1): aio-pika's RobustQueue.unbind scans every binding it keeps for reconnects to
    forget the one removed, which made 10,000 sessions ending at once cost ~50 s of CPU (O(n²)) while new
    sessions waited for their bind. Unbind as a plain Queue, then forget the robust binding by the key that
    ``bind`` stored it under."""
    await aio_pika.Queue.unbind(cast(aio_pika.Queue, queue), exchange, routing_key)
    bindings = getattr(queue, "_bindings", None)
    if isinstance(bindings, dict):
        bindings.pop((exchange, routing_key), None)


def parse_downlink(message: AbstractIncomingMessage) -> Downlink | None:
    """A ``device.downlink`` message as a :class:`Downlink`, or None when it breaks the contract
    (unknown type, body not a JSON object, an RPC without a method)."""
    kind = message.type or ""
    if kind not in (DOWNLINK_RPC, DOWNLINK_ATTRIBUTES, DOWNLINK_REVOKED):
        return None
    try:
        body = json.loads(message.body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(body, dict):
        return None
    if kind == DOWNLINK_RPC and not (isinstance(body.get("method"), str) and body["method"]):
        return None
    deadline: float | None = None
    raw = (message.headers or {}).get(DEADLINE_HEADER)
    if raw is not None:
        with contextlib.suppress(TypeError, ValueError):
            deadline = float(raw.decode() if isinstance(raw, bytes) else str(raw))
    expiration = message.expiration
    if deadline is None and isinstance(expiration, (int, float)):
        deadline = time.time() + float(expiration)
    return Downlink(kind, body, message.reply_to, message.correlation_id, deadline)


#: How long a ``revoked`` message may wait in a device's queue (an HTTP poll's; sessions opened later ignore it).
REVOKED_MESSAGE_TTL_S = 60.0


async def end_sessions(bus: Bus, device_id: uuid.UUID | str) -> bool:
    """Tell every gateway to end the device's live sessions opened until now (its credentials were revoked or
    replaced: admin API revoke/rotate, re-provisioning): MQTT connections close (MQTT 5: DISCONNECT 0x87),
    CoAP observations end with 4.01, HTTP long polls with 401. False when the bus could not take the message
    (the credentials are dead all the same: those sessions then end at their next log-in)."""
    body = json.dumps({"revokedAt": time.time()}).encode()
    try:
        await bus.publish(DOWNLINK_EXCHANGE, str(device_id), body, type=DOWNLINK_REVOKED,
                          expiration=REVOKED_MESSAGE_TTL_S)
    except RpcError as exc:
        log.warning("credentials of device %s replaced, but its live sessions were not told: %s", device_id, exc)
        return False
    return True
