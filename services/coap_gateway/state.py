"""Bounded CoAP state: what aiocoap keeps per request and per block-wise transfer, capped per source and in all.

A CoAP port takes datagrams from anyone, before any authentication, and UDP source addresses are forgeable.
aiocoap (0.4.17) keeps, unbounded:

* for every request, its message deduplication entry (``MessageManager._recent_messages``): (remote,
  message id) → the answer, for EXCHANGE_LIFETIME (247 s), with one event-loop timer each: ~2.1 KB per
  4-byte request (10,000 datagrams → +21 MB);
* for every block-wise transfer, ``Block1Spool``'s reassembly (the first block, ~4.6 KB) and ``Block2Cache``'s
  chunked answers, each for 93 to 186 s after its last block (``TimeoutDict``, MAX_TRANSMIT_WAIT), with no cap.

Here both are replaced by tables with caps (README "CoAP", settings ``COAP_MAX_EXCHANGES``,
``COAP_MAX_EXCHANGES_PER_SOURCE``, ``COAP_MAX_BLOCKWISE_TRANSFERS``, ``COAP_MAX_BLOCKWISE_TRANSFERS_PER_SOURCE``):

* :class:`ExchangeTable`, the deduplication: an entry per request for EXCHANGE_LIFETIME, holding the encoded
  answer (bytes, not the answer's ``Message`` with its request) and no timer (expired entries go in insertion
  order, which is expiry order). A source at its cap forgets its own oldest entry first, a full table its
  oldest; forgetting only means that a retransmission that old would be processed again. Requests the gateway
  refuses without looking further (unknown path, wrong method, oversize, out-of-order block: answers that
  are the same every time) are forgotten as soon as they are answered: garbage leaves nothing behind.
* :class:`TransferTable`, the block-wise tables (aiocoap's ``TimeoutDict`` interface): a transfer idle for
  MAX_TRANSMIT_WAIT is dropped; a source at its cap loses its least recently active transfer, a full table
  the least recently active of all (its next block is answered 4.08, and the client starts over). A finished
  Block1 transfer is dropped at its last block (aiocoap kept it 93 s more).

Nothing is ever refused because a table is full: a flood from forged sources evicts old entries, and a
legitimate device's request is processed as always. Requests in progress (waiting for the core or the
credentials service) are capped separately by the gateway (:class:`InProgress`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from aiocoap.numbers.types import ACK, CON, NON, RST

Clock = Callable[[], float]


def source_ip(remote: Any) -> str:
    """The client's IP address (IPv4-mapped IPv6 addresses as plain IPv4), for per-address limits."""
    sockaddr = getattr(remote, "sockaddr", None)
    if not sockaddr:
        return ""
    host = str(sockaddr[0])
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def datagram_size(message: Any) -> int:
    """The size of a received request on the wire (reassembled: all its blocks), for :func:`fit_to`
    (aiocoap's ``encode`` is for outgoing messages only)."""
    payload = len(message.payload)
    try:
        options = len(message.opt.encode())
    except Exception:  # an odd option aiocoap decoded but would not encode: count what is sure
        options = 0
    return 4 + len(message.token or b"") + options + (1 + payload if payload else 0)


def fit_to(request: Any, response: Any) -> Any:
    """No error body larger than the request (a forged source must not make us a reflector): a 4.xx / 5.xx
    whose body is larger than ``request`` goes out without it (ThingsBoard answers most errors without one).
    For the answers given before a request reaches a resource (unknown path, wrong method, oversize, blocks
    out of order): what garbage draws."""
    if response.code is not None and response.code.class_ >= 4 and response.payload \
            and len(response.payload) > datagram_size(request):
        response.payload = b""
        response.opt.content_format = None
    return response


class _Replay:
    """A stored answer, encoded once: what udp6's ``send`` needs (``remote`` and ``encode()``), ~100 bytes."""

    __slots__ = ("remote", "_data")

    def __init__(self, remote: Any, data: bytes) -> None:
        self.remote = remote
        self._data = data

    def encode(self) -> bytes:
        return self._data


class _Entry:
    __slots__ = ("expires", "source", "replay")

    def __init__(self, expires: float, source: str) -> None:
        self.expires = expires
        self.source = source
        self.replay: _Replay | None = None


class _Capped:
    """Entries in an :class:`OrderedDict` (oldest first) and, per source, the keys each holds (oldest first).

    Every entry has ``expires`` (a ``clock`` time) and ``source``; entries are kept in the order they expire
    (a fixed lifetime, renewed by moving an entry to the end), so :meth:`expire` stops at the first live one."""

    def __init__(self, max_total: int, max_per_source: int, clock: Clock = time.monotonic) -> None:
        self.max_total = max_total
        self.max_per_source = max_per_source
        self._clock = clock
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._sources: dict[str, OrderedDict[Hashable, None]] = {}
        #: Entries dropped before their time because a cap was reached (since start).
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def sources(self) -> int:
        return len(self._sources)

    def held_by(self, source: str) -> int:
        return len(self._sources.get(source, ()))

    def _make_room(self, source: str) -> OrderedDict[Hashable, None]:
        """Evict what the caps ask for before one more entry of ``source``; its key list."""
        keys = self._sources.get(source)
        if keys is not None and len(keys) >= self.max_per_source:
            self._remove(next(iter(keys)))
            self.evicted += 1
        if len(self._entries) >= self.max_total:
            self._remove(next(iter(self._entries)))
            self.evicted += 1
        keys = self._sources.get(source)
        if keys is None:
            keys = self._sources[source] = OrderedDict()
        return keys

    def _remove(self, key: Hashable) -> Any:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        keys = self._sources.get(entry.source)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self._sources[entry.source]
        return entry

    def clear(self) -> None:
        self._entries.clear()
        self._sources.clear()

    def expire(self, now: float | None = None) -> None:
        now = self._clock() if now is None else now
        entries = self._entries
        while entries:
            key, entry = next(iter(entries.items()))
            if entry.expires > now:
                return
            self._remove(key)


class ExchangeTable(_Capped):
    """Message deduplication (RFC 7252 §4.5) for aiocoap's ``MessageManager``, bounded: see the module doc."""

    def __init__(self, lifetime_s: float, max_total: int, max_per_source: int, clock: Clock = time.monotonic) -> None:
        super().__init__(max_total, max_per_source, clock)
        self.lifetime_s = lifetime_s
        self._send: Callable[[Any], None] | None = None
        self._next_mid: Callable[[], int] | None = None
        #: The answer to a request refused on sight (unknown path, wrong method, ...), or None: see install.
        self._refusal: Callable[[Any], Any] | None = None
        #: New requests seen, retransmissions recognized, and requests refused on sight, since start.
        self.requests = 0
        self.duplicates = 0
        self.refused_on_sight = 0

    def install(self, manager: Any, refusal: Callable[[Any], Any] | None = None) -> None:
        """Take over ``manager``'s deduplication (its ``_recent_messages`` and per-message timers stay unused).

        ``refusal(request)``: an answer for a request that needs no resource, or None. Such requests are
        answered right here, as aiocoap would (piggybacked on the ACK of a CON, a NON for a NON), and
        go no further: no deduplication entry, no render task (garbage costs a third of the CPU)."""
        manager._deduplicate_message = self.deduplicate
        manager._store_response_for_duplicates = self.store_answer
        self._send = manager.message_interface.send
        self._next_mid = manager._next_message_id
        self._refusal = refusal

    def deduplicate(self, message: Any) -> bool:
        """True for a retransmission (dropped; a CON whose answer is stored gets it again) or a request
        answered on sight, else remember it (False: aiocoap goes on with it)."""
        if self._refusal is not None and (message.mtype is CON or message.mtype is NON):
            answer = self._refusal(message)
            if answer is not None:
                self.refused_on_sight += 1
                self._answer(message, answer)
                return True
        now = self._clock()
        self.expire(now)
        key = (message.remote, message.mid)
        entry = self._entries.get(key)
        if entry is not None:
            self.duplicates += 1
            if message.mtype is CON and entry.replay is not None and self._send is not None:
                self._send(entry.replay)
            return True
        self.requests += 1
        source = source_ip(message.remote)
        keys = self._make_room(source)
        self._entries[key] = _Entry(now + self.lifetime_s, source)
        keys[key] = None
        return False

    def _answer(self, request: Any, answer: Any) -> None:
        no_response = request.opt.no_response or 0  # RFC 7967: answers of this class not wanted
        suppressed = no_response & (1 << answer.code.class_ - 1) != 0
        if suppressed:
            if request.mtype is NON:
                return
            answer = answer.__class__(code=0)  # an empty ACK
        answer.token = request.token if not suppressed else b""
        answer.remote = request.remote  # the listener joins no multicast group: a unicast answer
        if request.mtype is CON:
            answer.mtype, answer.mid = ACK, request.mid
        else:
            answer.mtype, answer.mid = NON, self._next_mid() if self._next_mid is not None else 0
        if self._send is not None:
            self._send(answer)

    def store_answer(self, message: Any) -> None:
        """Keep the ACK (piggybacked answer or empty ACK) or RST sent for a remembered request, encoded."""
        if message.mtype is not ACK and message.mtype is not RST:
            return  # a separate response has a message id of its own: nothing to replay it for
        entry = self._entries.get((message.remote, message.mid))
        if entry is not None:
            entry.replay = _Replay(message.remote, message.encode())

    def forget(self, remote: Any, mid: int | None) -> None:
        """Drop a request's entry: its answer is the same every time, so a retransmission is simply answered."""
        self._remove((remote, mid))


class TransferTable(_Capped):
    """Drop-in for aiocoap's ``TimeoutDict`` in ``Block1Spool`` / ``Block2Cache``: an entry lives ``idle_s``
    after its last use, least recently used first out when a cap is reached. Keys are aiocoap's block keys,
    whose first item is the remote's ``blockwise_key`` ``(sockaddr, pktinfo)``."""

    def __init__(self, idle_s: float, max_total: int, max_per_source: int, clock: Clock = time.monotonic) -> None:
        super().__init__(max_total, max_per_source, clock)
        self.idle_s = idle_s

    @staticmethod
    def _source(key: Any) -> str:
        try:
            host = str(key[0][0][0])
        except (TypeError, IndexError, KeyError):
            return ""
        return host[7:] if host.startswith("::ffff:") and "." in host else host

    def __getitem__(self, key: Hashable) -> Any:
        now = self._clock()
        self.expire(now)
        entry = self._entries[key]  # KeyError: unknown (or expired, or evicted) transfer
        self._touch(key, entry, now)
        return entry.value

    def __setitem__(self, key: Hashable, value: Any) -> None:
        now = self._clock()
        self.expire(now)
        entry = self._entries.get(key)
        if entry is not None:
            entry.value = value
            self._touch(key, entry, now)
            return
        source = self._source(key)
        keys = self._make_room(source)
        self._entries[key] = _Transfer(now + self.idle_s, source, value)
        keys[key] = None

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def pop(self, key: Hashable) -> Any:
        entry = self._remove(key)
        return None if entry is None else entry.value

    def _touch(self, key: Hashable, entry: _Transfer, now: float) -> None:
        entry.expires = now + self.idle_s
        self._entries.move_to_end(key)
        keys = self._sources.get(entry.source)
        if keys is not None:
            keys.move_to_end(key)


class _Transfer:
    __slots__ = ("expires", "source", "value")

    def __init__(self, expires: float, source: str, value: Any) -> None:
        self.expires = expires
        self.source = source
        self.value = value


class InProgress:
    """Requests being handled (waiting for the core, the credentials service or the bus), per source and in
    all; :meth:`enter` says whether one more may start."""

    def __init__(self, max_total: int, max_per_source: int) -> None:
        self.max_total = max_total
        self.max_per_source = max_per_source
        self.total = 0
        self._per_source: dict[str, int] = {}
        #: Requests refused because a cap was reached (since start).
        self.refused_total = 0
        self.refused_source = 0

    def enter(self, source: str) -> str | None:
        """Count one more request of ``source``; ``None`` when it may start, else which cap refused it
        (``"total"`` or ``"source"``)."""
        if self.total >= self.max_total:
            self.refused_total += 1
            return "total"
        held = self._per_source.get(source, 0)
        if held >= self.max_per_source:
            self.refused_source += 1
            return "source"
        self._per_source[source] = held + 1
        self.total += 1
        return None

    def leave(self, source: str) -> None:
        self.total -= 1
        held = self._per_source.get(source, 0) - 1
        if held > 0:
            self._per_source[source] = held
        else:
            self._per_source.pop(source, None)
