"""Server-side RPC ids for HTTP devices that stay valid across gateway instances.

ThingsBoard's long poll ``GET /api/v1/{token}/rpc`` hands the device ``{"id": n, "method", "params"}``;
the device answers later with ``POST /api/v1/{token}/rpc/{n}``, a separate request that a load
balancer may send to another instance. ThingsBoard's id is a Java ``int`` that its HTTP SDK and
firmware echo back as a decimal, so the id cannot carry the asker's ``reply_to`` and
``correlation_id`` themselves. Instead:

- each instance that hands out RPCs owns a *tag* (1..1023), claimed as an exclusive queue
  ``http_gateway.rpc.<tag>`` (the broker lets one connection own it; a taken tag is retried with another);
- an id is ``tag << 21 | sequence``: positive, never 0 (the SDK leaves out a falsy id), below 2**31;
- the issuing instance keeps each two-way RPC (device, reply_to, correlation_id, deadline) in a
  bounded map (MAX_PENDING, oldest first out; an entry ends at its RPC's deadline);
- an answer that reaches the issuing instance is resolved there; one that reaches another instance is
  forwarded to the tag's queue (default exchange, correlation id ``<device id>/<request id>``) and
  resolved by the issuer. The answering device must be the one the RPC went to: an answer to
  another device's RPC is dropped like an unknown id.

Unknown, expired, foreign and repeated ids are answered 200 and dropped, as by ThingsBoard (its HTTP
transport hands the reply to the core, which ignores an id it does not wait for). If the issuing
instance dies, its pending RPCs die with it: their askers time out, as for a device that never answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import aiormq.exceptions
from aio_pika.abc import AbstractIncomingMessage
from provisioning_common.bus import RpcError
from provisioning_common.device_link import DeviceLinks, Downlink
from provisioning_common.settings import Settings

log = logging.getLogger(__name__)

TAG_BITS = 10
SEQ_BITS = 21
MAX_TAG = (1 << TAG_BITS) - 1
SEQ_MASK = (1 << SEQ_BITS) - 1
#: Two-way RPCs one instance keeps waiting for their device's answer; beyond this the oldest is dropped
#: (its asker then times out). Well below 2**SEQ_BITS, so a sequence number is never reused while pending.
MAX_PENDING = 10_000
#: Random tags tried before giving up (each taken one costs a channel round trip).
TAG_ATTEMPTS = 32


def queue_name(settings: Settings, tag: int) -> str:
    return settings.queue(f"http_gateway.rpc.{tag}")


def tag_of(request_id: int) -> int:
    return request_id >> SEQ_BITS


@dataclass(frozen=True)
class Pending:
    device_id: str
    downlink: Downlink
    #: Unix time after which nobody waits for the answer.
    expires: float


class ServerRpcIds:
    """This instance's tag, the ids it issued, and the answers forwarded to it."""

    def __init__(self, links: Callable[[], DeviceLinks], settings: Settings, *, max_pending: int = MAX_PENDING) -> None:
        self._links = links
        self._settings = settings
        self._max_pending = max_pending
        self._pending: OrderedDict[int, Pending] = OrderedDict()
        self._tag: int | None = None
        self._sequence = secrets.randbelow(SEQ_MASK + 1)
        self._lock: asyncio.Lock | None = None

    @property
    def tag(self) -> int | None:
        return self._tag

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        """Claim a tag and consume its queue (once). Raises RpcError when the broker is unreachable."""
        if self._tag is not None:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._tag is None:
                self._tag = await self._claim_tag()

    async def _claim_tag(self) -> int:
        bus = self._links().bus
        for _ in range(TAG_ATTEMPTS):
            tag = 1 + secrets.randbelow(MAX_TAG)
            try:
                channel = await bus.open_channel()
            except Exception as exc:
                raise RpcError(f"bus unavailable: {type(exc).__name__}") from None
            try:
                queue = await channel.declare_queue(queue_name(self._settings, tag), exclusive=True, auto_delete=True)
                await bus.bind_replies(queue)  # other instances forward answers with bus.reply (rpc.replies)
                await queue.consume(self._on_forwarded, no_ack=True)
            except aiormq.exceptions.ChannelLockedResource:  # another instance owns this tag
                with contextlib.suppress(Exception):
                    await channel.close()
                continue
            except Exception as exc:
                with contextlib.suppress(Exception):
                    await channel.close()
                raise RpcError(f"bus unavailable: {type(exc).__name__}") from None
            log.info("server-side RPC ids of this instance: tag %d", tag)
            return tag
        raise RpcError(f"no free RPC id tag after {TAG_ATTEMPTS} attempts")

    def issue(self, device_id: str, downlink: Downlink, now: float | None = None) -> int:
        """The id the device answers with; a two-way RPC is kept until answered, expired or pushed out.
        :meth:`start` must have succeeded."""
        assert self._tag is not None, "start() first"
        self._sequence = (self._sequence + 1) & SEQ_MASK
        request_id = (self._tag << SEQ_BITS) | self._sequence
        if downlink.two_way:
            now = time.time() if now is None else now
            self._purge(now)
            expires = now + downlink.seconds_left(self._settings.device_rpc_max_timeout_s)
            self._pending.pop(request_id, None)
            self._pending[request_id] = Pending(device_id, downlink, expires)
        return request_id

    def _purge(self, now: float) -> None:
        """Drop expired entries from the front, and the oldest ones beyond the bound."""
        while self._pending:
            first = next(iter(self._pending.values()))
            if len(self._pending) < self._max_pending and first.expires > now:
                return
            self._pending.popitem(last=False)

    async def answer(self, device_id: str, request_id: int, body: bytes) -> None:
        """A device's answer to ``request_id``: to the asker, through the issuing instance if it is another.
        Unknown ids are dropped. Raises RpcError when the broker cannot take it (the device may retry)."""
        tag = tag_of(request_id)
        if request_id <= 0 or not 1 <= tag <= MAX_TAG:
            log.debug("RPC answer to an id no instance issued")
            return
        if tag == self._tag:
            await self.resolve(device_id, request_id, body)
            return
        # Dropped by the broker when no instance owns that tag any more.
        await self._links().bus.reply(queue_name(self._settings, tag), f"{device_id}/{request_id}", body)

    async def resolve(self, device_id: str, request_id: int, body: bytes) -> bool:
        """Answer the asker of ``request_id`` if this instance issued it to ``device_id`` and it still waits."""
        entry = self._pending.get(request_id)
        if entry is None or entry.device_id != device_id:
            log.debug("RPC answer to an unknown or foreign id")
            return False
        del self._pending[request_id]
        if entry.expires <= time.time():
            return False
        try:
            return await self._links().answer(entry.downlink, body)
        except RpcError:
            self._pending[request_id] = entry  # the device may send it again
            raise

    async def _on_forwarded(self, message: AbstractIncomingMessage) -> None:
        device_id, _, raw_id = (message.correlation_id or "").rpartition("/")
        if not device_id or not raw_id.isdigit():
            log.warning("dropped a malformed forwarded RPC answer")
            return
        try:
            await self.resolve(device_id, int(raw_id), bytes(message.body))
        except RpcError as exc:
            log.warning("a forwarded RPC answer could not be passed on: %s", exc)
