"""HTTP long polls (``attributes/updates``, ``rpc``) over one RabbitMQ queue per device and kind.

An HTTP device has no connection that a gateway instance could hold: ThingsBoard's SDK polls
attributes and RPC on two threads, over a pool of connections that a load balancer may spread over
instances, and between two polls of a kind it has no poll open at all. The per-instance binding the
MQTT and CoAP sessions use (``DeviceLinks``: every instance holding the device gets every message)
would then either lose what arrives between two polls or, once held for the next poll, deliver it
twice when the next poll lands on another instance. So the HTTP gateway's polls share queues instead:

- ``http_gateway.rpc.<device id>`` and ``http_gateway.attributes.<device id>`` are declared and bound
  to ``device.downlink`` by the device id at every poll of either kind (each gets every message for
  the device; a poll takes its own kind and drops the other);
- a poll consumes its queue (prefetch 1, manual ack) from whichever instance it reached: RabbitMQ
  hands each message to one consumer, so a message is delivered to one poll once, whatever the
  number of instances; what reaches a poll that has just ended is requeued for the next one;
- between two polls the queue keeps what arrives; it is deleted QUEUE_EXPIRES (the default long poll,
  HTTP_LONG_POLL_DEFAULT_S) after its last poll ended, and messages in it expire with their own TTL
  (an RPC's deadline) or, without one, after DEVICE_RPC_MAX_TIMEOUT_S; at most QUEUE_MAX_LENGTH
  wait (the oldest are dropped).

So an HTTP device is online - its RPCs are routed, not refused as offline - from its first poll
until HTTP_LONG_POLL_DEFAULT_S after its last one, and an RPC that no poll takes before its deadline
(a device that polls attribute updates only, say) times out for its sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel
from provisioning_common.bus import Bus, RpcError
from provisioning_common.contract import DOWNLINK_ATTRIBUTES, DOWNLINK_EXCHANGE, DOWNLINK_REVOKED, DOWNLINK_RPC
from provisioning_common.device_link import Downlink, parse_downlink
from provisioning_common.settings import Settings

log = logging.getLogger(__name__)

#: Messages that wait in one device's queue of one kind; beyond this the oldest are dropped.
QUEUE_MAX_LENGTH = 100
KINDS = (DOWNLINK_RPC, DOWNLINK_ATTRIBUTES)


def queue_name(settings: Settings, kind: str, device_id: str) -> str:
    return settings.queue(f"http_gateway.{kind}.{device_id}")


@dataclass(eq=False)
class Poll:
    """One open long poll: its future gets the first message of its kind, or None when it ended."""

    device_id: str
    kind: str
    future: asyncio.Future[Downlink | None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    #: When the poll was opened (Unix time): a revocation from before it is not about the credentials it used.
    opened: float = field(default_factory=time.time)
    #: Delivered after the poll ended, before its consumer was cancelled: requeued then.
    late: list[AbstractIncomingMessage] = field(default_factory=list)
    #: The consumer is cancelled: anything still delivered (it was in flight) is requeued at once.
    cancelled: bool = False

    def end(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


class DevicePolls:
    """This process's open polls, at most one per device and kind (a newer one ends the older)."""

    def __init__(self, bus: Callable[[], Bus], settings: Settings) -> None:
        self._bus = bus
        self._settings = settings
        self._open: dict[tuple[str, str], Poll] = {}
        self._declaring: AbstractChannel | None = None
        self._consuming: AbstractChannel | None = None
        self._lock: asyncio.Lock | None = None
        self._arguments: dict[str, Any] = {
            "x-expires": int(settings.http_long_poll_default_s * 1000),
            "x-message-ttl": int(settings.device_rpc_max_timeout_s * 1000),
            "x-max-length": QUEUE_MAX_LENGTH,
        }

    def __len__(self) -> int:
        return len(self._open)

    def open(self, device_id: str, kind: str) -> Poll:
        """Register a poll; an older one of the same device and kind ends (its client gets 408)."""
        key = (device_id, kind)
        previous = self._open.get(key)
        if previous is not None:
            previous.end()
        poll = self._open[key] = Poll(device_id, kind)
        return poll

    def end_all(self) -> None:
        for poll in list(self._open.values()):
            poll.end()

    async def _channels(self) -> tuple[AbstractChannel, AbstractChannel]:
        """(declaring, consuming): a broker error in a declaration (say, a queue declared with other
        arguments) closes only the first, never the open polls' consumers. Reopened when closed."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._declaring is None or self._declaring.is_closed:
                self._declaring = await self._bus().open_channel()
            if self._consuming is None or self._consuming.is_closed:
                channel = await self._bus().open_channel()
                await channel.set_qos(prefetch_count=1)
                self._consuming = channel
            return self._declaring, self._consuming

    async def _declare(self, channel: AbstractChannel, device_id: str) -> None:
        """Both kinds' queues of a device, bound by its id. Not re-declared by aio-pika after a reconnect
        (``robust=False``: it would keep every queue ever declared): the next poll declares them again."""
        exchange = await self._bus().exchange(DOWNLINK_EXCHANGE)
        for kind in KINDS:
            name = queue_name(self._settings, kind, device_id)
            queue: AbstractQueue
            if isinstance(channel, AbstractRobustChannel):
                queue = await channel.declare_queue(name, arguments=self._arguments, robust=False)
            else:
                queue = await channel.declare_queue(name, arguments=self._arguments)
            await queue.bind(exchange, routing_key=device_id)

    async def run(self, poll: Poll, wait: Callable[[asyncio.Future[Any]], Any]) -> Downlink | None:
        """Consume the poll's queue until ``wait(poll.future)`` returns; the message it got, or None.

        Raises RpcError when the broker is unreachable (nothing was consumed)."""
        try:
            try:
                if not self._bus().is_connected:  # opening a channel would wait for the reconnection
                    raise RpcError("bus unavailable")
                declaring, consuming = await self._channels()
                # Both kinds' queues: what a poll of either kind makes the device online for must wait
                # in the queue of its own kind (an RPC sent before the first RPC poll, say).
                await self._declare(declaring, poll.device_id)
                queue = await consuming.get_queue(queue_name(self._settings, poll.kind, poll.device_id), ensure=False)

                async def on_message(message: AbstractIncomingMessage) -> None:
                    await self._deliver(poll, message)

                tag = await queue.consume(on_message)
            except RpcError:
                raise
            except Exception as exc:
                raise RpcError(f"bus unavailable: {type(exc).__name__}") from None
            try:
                if not poll.future.done():
                    await wait(poll.future)
            finally:
                poll.end()
                with contextlib.suppress(Exception):  # the channel may be gone: then so is the consumer
                    await queue.cancel(tag)
                poll.cancelled = True
                late, poll.late = poll.late, []
                for message in late:
                    await _requeue(message)
        finally:
            poll.end()
            if self._open.get((poll.device_id, poll.kind)) is poll:
                del self._open[(poll.device_id, poll.kind)]
        return poll.future.result()

    async def _deliver(self, poll: Poll, message: AbstractIncomingMessage) -> None:
        try:
            downlink = parse_downlink(message)
            if downlink is None:
                if message.type == poll.kind:  # logged by the queue of its kind only
                    log.warning("dropped a malformed %s message (type %r)", DOWNLINK_EXCHANGE, message.type)
                await message.ack()
            elif downlink.kind == DOWNLINK_REVOKED:
                # The device's credentials were revoked or replaced: a poll opened before that ends (401);
                # one opened since authenticated with what is valid now. Both kinds' queues get a copy.
                await message.ack()
                if downlink.revokes(poll.opened) and not poll.future.done():
                    poll.future.set_result(downlink)
            elif downlink.kind != poll.kind or downlink.expired():
                await message.ack()  # the other kind's queue has its own copy
            elif poll.cancelled:
                await _requeue(message)
            elif poll.future.done():
                poll.late.append(message)  # requeued once the consumer is cancelled
            else:
                poll.future.set_result(downlink)
                await message.ack()
        except Exception as exc:  # the channel went away: the broker requeues what was not acked
            log.debug("a poll's message could not be settled: %s", type(exc).__name__)


async def _requeue(message: AbstractIncomingMessage) -> None:
    with contextlib.suppress(Exception):  # on a closed channel the broker has requeued it already
        await message.nack(requeue=True)
