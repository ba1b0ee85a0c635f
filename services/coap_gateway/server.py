"""The CoAP gateway: one aiocoap server context on UDP ``COAP_PORT``, stateless, everything through ``TransportApi``.

Resources (ThingsBoard's ``CoapTransportResource`` tree, plus Innoway's path):

* ``POST /api/v1/provision``, ``/api/provision`` and ``/api/v1/<anything>/provision``: provisioning, JSON in
  either dialect, else ThingsBoard's protobuf ``ProvisionDeviceRequestMsg`` (answered in protobuf).
  SUCCESS → 2.01 Created; NOT_FOUND / FAILURE → 4.00 with the spec's §2 body; request that cannot be
  parsed → 4.00 with a JSON error body; core slow or unreachable → 5.03 (Max-Age 1) with the dialect's
  "Provisioning timed out" body.
* ``/api/v1/{token}/telemetry``, ``/attributes``, ``/rpc`` and ``/rpc/{id}``: ThingsBoard's device API after
  provisioning (telemetry, attributes, RPC, observations), in :mod:`.device_api`.

Anything else: 4.04 (unknown path) or 4.05 (other method), with a JSON error body. Bodies larger than
``MAX_BODY_BYTES`` → 4.13 with Size1, refused on the first block that crosses the limit, so nothing is
half-assembled past it. Block-wise transfer (RFC 7959) is aiocoap's: Block1 requests are reassembled
before they reach a handler, and answers over one block (1024 bytes) are served with Block2.
Retransmitted requests (same message id from the same endpoint) never reach a handler: aiocoap's
message layer drops them while the first is being answered and repeats its stored answer afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import socket
from collections.abc import Sequence
from typing import Any

import aiocoap
import aiocoap.error
import aiocoap.resource
from aiocoap.blockwise import Block1Spool, Block2Cache, _extract_block_key
from aiocoap.messagemanager import MessageManager
from aiocoap.numbers.codes import Code
from aiocoap.numbers.constants import TransportTuning
from aiocoap.numbers.contentformat import ContentFormat
from aiocoap.pipe import Pipe, error_to_message, run_driving_pipe
from provisioning_common.dialects import render_error
from provisioning_common.models import MSG_TIMEOUT, Dialect, ProvisionStatus, Transport
from provisioning_common.settings import Settings
from provisioning_common.transport_api import OutcomeKind, TransportApi

from .device_api import METHODS, DeviceApi, Route, Target, is_observation
from .malformed import MalformedDatagrams
from .state import ExchangeTable, InProgress, TransferTable, fit_to, source_ip

log = logging.getLogger(__name__)

JSON = ContentFormat.JSON
OCTETS = ContentFormat.OCTETSTREAM
#: How long the ACK of a confirmable request waits for its answer (ThingsBoard's piggyback_timeout).
PIGGYBACK_TIMEOUT_S = 0.5
#: RFC 7252 §5.9.3.4: a 5.03 carries Max-Age = seconds after which to retry (HTTP's Retry-After).
RETRY_AFTER_S = 1


def route(path: Sequence[str]) -> Target | None:
    """Which resource a Uri-Path names, with the device's token; ``None`` for an unknown path."""
    match tuple(path):
        case ("api", "v1", "provision") | ("api", "provision") | ("api", "v1", _, "provision"):
            return Target(Route.PROVISION)
        case ("api", "v1", token, "telemetry"):
            return Target(Route.TELEMETRY, token)
        # ThingsBoard reads the feature from the fourth segment and ignores what follows it, so
        # ".../attributes/updates" (its Edge documentation's observe path) is the attributes resource.
        case ("api", "v1", token, "attributes") | ("api", "v1", token, "attributes", _):
            return Target(Route.ATTRIBUTES, token)
        case ("api", "v1", token, "rpc"):
            return Target(Route.RPC, token)
        case ("api", "v1", token, "rpc", request_id):
            return Target(Route.RPC_REPLY, token, request_id)
    return None


def exceeds_limit(payload_size: int, block1: Any, size1: int | None, limit: int) -> bool:
    """Whether a request (or one Block1 block of it) takes the body past ``limit`` bytes.

    ``block1`` is the request's Block1 option (or ``None``); a block's end offset is what counts,
    so a transfer is refused on the first block that crosses the limit. Size1 (the size the client
    announces, RFC 7959 §4) lets an oversize transfer be refused on its first block.
    """
    if size1 is not None and size1 > limit:
        return True
    start = block1.start if block1 is not None else 0
    return start + payload_size > limit


#: How often the CoAP state tables drop what expired, and at most how often caps reached are reported.
SWEEP_INTERVAL_S = 10.0
STATE_SUMMARY_INTERVAL_S = 60.0


#: How long a stopping gateway keeps its socket open for the ACKs of its last separate responses.
SEPARATE_RESPONSE_ACK_GRACE_S = 1.0
#: The liveness check's CoAP pings: how many at most, and how long each waits for its RST. Together
#: below health.CHECK_TIMEOUT_S (2 s), so a lost datagram does not fail the probe on its own.
PING_ATTEMPTS = 3
PING_WAIT_S = 0.5
_WILDCARDS = ("", "0.0.0.0", "::")


def ping_target(bind_host: str, port: int) -> tuple[str, int]:
    """Where the gateway reaches its own listener: the bound address, or IPv4 loopback for a wildcard
    (udp6 binds ``::``/``0.0.0.0`` dual-stack, and ``::1`` may not exist where IPv6 is disabled)."""
    return ("127.0.0.1" if bind_host in _WILDCARDS else bind_host), port


class CoapGateway:
    """Renders CoAP requests through :class:`TransportApi`; holds no provisioning rule and no device state."""

    def __init__(self, api: TransportApi, settings: Settings) -> None:
        self._api = api
        self._settings = settings
        self._limit = settings.max_body_bytes
        # Bounded state (state.py): deduplication, block-wise transfers, requests in progress.
        tuning = TransportTuning()
        self.exchanges = ExchangeTable(tuning.EXCHANGE_LIFETIME, settings.coap_max_exchanges,
                                       settings.coap_max_exchanges_per_source)
        self.transfers_in = TransferTable(tuning.MAX_TRANSMIT_WAIT, settings.coap_max_blockwise_transfers,
                                          settings.coap_max_blockwise_transfers_per_source)
        self.transfers_out = TransferTable(tuning.MAX_TRANSMIT_WAIT, settings.coap_max_blockwise_transfers,
                                           settings.coap_max_blockwise_transfers_per_source)
        self.in_progress = InProgress(settings.coap_max_exchanges, settings.coap_max_exchanges_per_source)
        self._sweeper: asyncio.TimerHandle | None = None
        self._reported = (0, 0, 0, 0)
        self._reported_at = 0.0
        self._site = _Site(self)
        self.device_api = DeviceApi(api, settings, self._site.chunk)
        self._context: aiocoap.Context | None = None
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self.malformed = MalformedDatagrams()
        # Bodies rendered once; a Message is built per answer (aiocoap writes remote, token and mid into it).
        tb = Dialect.THINGSBOARD
        self._body_too_large = render_error(tb, f"Request body exceeds {self._limit} bytes")
        self._body_not_found = render_error(tb, "Unknown resource; POST /api/v1/provision, /api/provision, or"
                                                " /api/v1/{token}/telemetry, /attributes, /rpc, /rpc/{id}")
        self._body_method = {
            methods: render_error(tb, "Method not allowed; use " + " or ".join(sorted(str(m) for m in methods)))
            for methods in set(METHODS.values())
        }
        self._body_incomplete = render_error(tb, "Block-wise transfer out of order; restart it from block 0")
        self._body_no_payload = render_error(tb, "Missing payload")
        self._body_undecodable = render_error(
            tb, "Payload is neither a valid JSON object nor a valid ProvisionDeviceRequestMsg")
        self._body_closing = render_error(tb, MSG_TIMEOUT)

    # --- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        # An answer ready within this delay rides on the ACK (piggybacked) instead of costing an empty ACK,
        # a separate confirmable response and the client's ACK of it. aiocoap waits 100 ms; ThingsBoard's
        # coap.piggyback_timeout is 500 ms, well below a client's first retransmission (ACK_TIMEOUT, 2 s).
        # aiocoap builds the tuning of incoming requests itself, so the default is set for this process.
        TransportTuning.EMPTY_ACK_DELAY = PIGGYBACK_TIMEOUT_S
        # Malformed datagrams are counted and summarized instead of logged one by one (with tracebacks).
        self.malformed.install(asyncio.get_running_loop())
        # UDP only: aiocoap's default server transports would also open CoAP over TCP, TLS and WebSockets.
        self._context = await _Context.create_server_context(
            self._site, bind=(self._settings.bind_host, self._settings.coap_port), transports=["udp6"]
        )
        for interface in self._context.request_interfaces:
            manager = getattr(interface, "token_interface", None)
            if isinstance(manager, MessageManager):
                self.exchanges.install(manager, self.refusal)
        loop = asyncio.get_running_loop()
        self._reported_at = loop.time()
        self._sweeper = loop.call_later(SWEEP_INTERVAL_S, self._sweep)

    async def stop(self, drain_timeout: float) -> None:
        """Answer new requests 5.03, end the observations (5.03, to observe elsewhere), let the requests in
        progress finish (up to ``drain_timeout``), close the socket."""
        self._closing = True
        await self.device_api.close()
        had_work = self._in_flight > 0
        try:
            await asyncio.wait_for(self._idle.wait(), drain_timeout)
        except TimeoutError:
            log.warning("coap_gateway stopping with %d request(s) still in progress", self._in_flight)
        if had_work:
            # Answers that outlived the piggyback delay went out as separate confirmable messages; the
            # client ACKs them. Closed at once, the socket would bounce those ACKs (ICMP unreachable),
            # and the client's library fails its other exchanges with us: wait for the ACKs first.
            await asyncio.sleep(SEPARATE_RESPONSE_ACK_GRACE_S)
        if self._context is not None:
            await self._context.shutdown()
            self._context = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.malformed.uninstall()
        log.info("coap_gateway CoAP state: %s", self.state_summary())
        self.exchanges.clear()
        self.transfers_in.clear()
        self.transfers_out.clear()

    # --- bounded state ---------------------------------------------------------------------------

    def state_summary(self) -> str:
        """What the state tables hold now and did since start (logged at stop; tests and the bench read it)."""
        e, i, o, p = self.exchanges, self.transfers_in, self.transfers_out, self.in_progress
        return (f"requests={e.requests} refused_on_sight={e.refused_on_sight} duplicates={e.duplicates}"
                f" malformed={self.malformed.total}"
                f" exchanges_held={len(e)}/{e.max_total} exchanges_evicted={e.evicted}"
                f" transfers_held={len(i) + len(o)} transfers_evicted={i.evicted + o.evicted}"
                f" in_progress={p.total} refused_total={p.refused_total} refused_source={p.refused_source}")

    def _sweep(self) -> None:
        """Drop what expired; report caps reached (one WARNING per STATE_SUMMARY_INTERVAL_S at most)."""
        self.exchanges.expire()
        self.transfers_in.expire()
        self.transfers_out.expire()
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - self._reported_at >= STATE_SUMMARY_INTERVAL_S:
            counts = (self.exchanges.evicted, self.transfers_in.evicted + self.transfers_out.evicted,
                      self.in_progress.refused_total, self.in_progress.refused_source)
            delta = [new - old for new, old in zip(counts, self._reported, strict=True)]
            if any(delta):
                log.warning(
                    "CoAP state at its caps in the last %.0f s: %d requests forgotten before EXCHANGE_LIFETIME"
                    " (COAP_MAX_EXCHANGES %d, per source %d), %d block-wise transfers dropped"
                    " (COAP_MAX_BLOCKWISE_TRANSFERS %d, per source %d), %d requests refused while %d were in"
                    " progress, %d for their source", now - self._reported_at, delta[0], self.exchanges.max_total,
                    self.exchanges.max_per_source, delta[1], self.transfers_in.max_total,
                    self.transfers_in.max_per_source, delta[2], self.in_progress.max_total, delta[3])
            self._reported, self._reported_at = counts, now
        self._sweeper = loop.call_later(SWEEP_INTERVAL_S, self._sweep)

    async def listener_answers(self) -> bool:
        """Whether the UDP listener still reads: a CoAP ping (empty CON, RFC 7252 §4.3) gets its RST.

        For ``/live``: a listener the event loop stopped reading (as uvloop did after an ICMP error) answers
        nothing while the process looks healthy; only a restart cures that. A fresh socket and message id
        per attempt: aiocoap would drop a repeated ping as a duplicate. Costs one datagram each way.
        """
        loop = asyncio.get_running_loop()
        host, port = ping_target(self._settings.bind_host, self._settings.coap_port)
        family, _, _, _, address = (await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM))[0]
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect(address)  # only the listener's datagrams arrive; its ICMP refusal raises
            sent: set[bytes] = set()
            for _ in range(PING_ATTEMPTS):
                mid = secrets.token_bytes(2)
                sent.add(mid)
                try:
                    await loop.sock_sendall(sock, b"\x40\x00" + mid)
                    async with asyncio.timeout(PING_WAIT_S):
                        while True:
                            answer = await loop.sock_recv(sock, 64)
                            if answer[:2] == b"\x70\x00" and answer[2:4] in sent:  # RST, empty, one of ours
                                return True
                except TimeoutError:
                    continue
                except OSError:
                    return False
        return False

    # --- request handling ------------------------------------------------------------------------

    def precheck(self, request: aiocoap.Message) -> aiocoap.Message | None:
        """An immediate answer for an unknown path, a wrong method or an oversize body; ``None`` to go on.

        Runs on every datagram, before Block1 reassembly, so nothing is spooled for requests that will
        be refused anyway.
        """
        target = route(request.opt.uri_path)
        if target is None:
            return aiocoap.Message(code=Code.NOT_FOUND, payload=self._body_not_found, content_format=JSON)
        methods = METHODS[target.route]
        if request.code not in methods:
            return aiocoap.Message(code=Code.METHOD_NOT_ALLOWED, payload=self._body_method[methods],
                                   content_format=JSON)
        if exceeds_limit(len(request.payload), request.opt.block1, request.opt.size1, self._limit):
            return self.too_large()
        return None

    def refusal(self, request: aiocoap.Message) -> aiocoap.Message | None:
        """:meth:`precheck`'s answer, no larger than the request (:func:`fit_to`), for the message layer to send
        at once (state.ExchangeTable); None to process the request."""
        try:
            answer = self.precheck(request)
        except Exception:  # an odd request the regular path handles (and reports)
            return None
        return None if answer is None else fit_to(request, answer)

    def too_large(self) -> aiocoap.Message:
        return aiocoap.Message(code=Code.REQUEST_ENTITY_TOO_LARGE, payload=self._body_too_large,
                               content_format=JSON, size1=self._limit)

    def incomplete(self) -> aiocoap.Message:
        return aiocoap.Message(code=Code.REQUEST_ENTITY_INCOMPLETE, payload=self._body_incomplete,
                               content_format=JSON)

    async def handle(self, request: aiocoap.Message) -> aiocoap.Message:
        """Answer one complete (reassembled) request whose path and method passed :meth:`precheck`."""
        if self._closing:
            return aiocoap.Message(code=Code.SERVICE_UNAVAILABLE, payload=self._body_closing, content_format=JSON,
                                   max_age=RETRY_AFTER_S)
        if len(request.payload) > self._limit:
            return self.too_large()
        target = route(request.opt.uri_path)
        assert target is not None  # checked by precheck
        source = source_ip(request.remote)
        refused = self.in_progress.enter(source)
        if refused is not None:
            # COAP_MAX_EXCHANGES requests in progress (5.03), or COAP_MAX_EXCHANGES_PER_SOURCE of this
            # source's (4.29): retry in a second, no body.
            code = Code.SERVICE_UNAVAILABLE if refused == "total" else Code.TOO_MANY_REQUESTS
            return aiocoap.Message(code=code, max_age=RETRY_AFTER_S)
        self._in_flight += 1
        self._idle.clear()
        try:
            if target.route is Route.PROVISION:
                return await self._provision(request)
            return await self.device_api.handle(request, target)
        finally:
            self.in_progress.leave(source)
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _provision(self, request: aiocoap.Message) -> aiocoap.Message:
        payload = request.payload
        if not payload:
            # ThingsBoard checks for a payload before parsing (CTR): a parse error, not an empty protobuf.
            return aiocoap.Message(code=Code.BAD_REQUEST, payload=self._body_no_payload, content_format=JSON)
        outcome = await self._api.provision(payload, transport=Transport.COAP, source_address=source_ip(request.remote),
                                            protobuf_fallback=True)
        content_format = OCTETS if outcome.dialect is Dialect.PROTOBUF else JSON
        if outcome.kind is OutcomeKind.ANSWERED:
            if outcome.result is not None and outcome.result.retry_after_s is not None:
                # A rate limit (README "Rate limits"): 4.29 Too Many Requests (RFC 8516), Max-Age = retry after.
                return aiocoap.Message(code=Code.TOO_MANY_REQUESTS, payload=outcome.body, content_format=content_format,
                                       max_age=max(1, math.ceil(outcome.result.retry_after_s)))
            success = outcome.result is not None and outcome.result.status is ProvisionStatus.SUCCESS
            return aiocoap.Message(code=Code.CREATED if success else Code.BAD_REQUEST, payload=outcome.body,
                                   content_format=content_format)
        if outcome.kind is OutcomeKind.BAD_REQUEST:
            if outcome.dialect is Dialect.PROTOBUF:
                # Neither JSON nor protobuf: say so in JSON rather than with a bare protobuf FAILURE.
                return aiocoap.Message(code=Code.BAD_REQUEST, payload=self._body_undecodable, content_format=JSON)
            return aiocoap.Message(code=Code.BAD_REQUEST, payload=outcome.body, content_format=JSON)
        return aiocoap.Message(code=Code.SERVICE_UNAVAILABLE, payload=outcome.body, content_format=content_format,
                               max_age=RETRY_AFTER_S)


class _Site(aiocoap.resource.Resource, aiocoap.resource.PathCapable):  # type: ignore[misc]  # aiocoap is untyped
    """The server context's one resource: sees the whole Uri-Path and drives block-wise transfer itself."""

    def __init__(self, gateway: CoapGateway) -> None:
        super().__init__()
        self._gateway = gateway
        # aiocoap's reassembly and answer chunking, on the gateway's bounded tables (state.py).
        self._block1 = _Spool(gateway.transfers_in)
        self._block2 = Block2Cache()
        self._block2._completes = gateway.transfers_out

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        return True

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        return self._gateway.precheck(request) or await self._gateway.handle(request)

    async def chunk(self, request: aiocoap.Message, response: aiocoap.Message) -> aiocoap.Message:
        """``response`` as it goes out for ``request``: whole, or its first Block2 block when it is over one
        block (the whole kept in the Block2 cache for the client's requests for the next blocks)."""

        async def ready() -> aiocoap.Message:
            return response

        return await self._block2.extract_or_insert(request, ready)

    async def render_to_pipe(self, pipe: Pipe) -> None:
        # aiocoap's Resource._render_to_pipe, with the refusals moved before reassembly and a gap in
        # the blocks answered 4.08 (aiocoap would let its ValueError become a 5.00).
        request = pipe.request
        early = self._gateway.precheck(request)
        if early is not None:
            _respond(pipe, fit_to(request, early))
            # The same answer every time: nothing to remember it for (a retransmission is answered again).
            self._gateway.exchanges.forget(request.remote, request.mid)
            return
        target = route(request.opt.uri_path)
        if target is not None and is_observation(request, target):
            # A long-lived answer: notifications until the client cancels it (this task is then cancelled).
            await self._gateway.device_api.observe(pipe, target, source_ip(request.remote))
            return
        try:
            # Raises ContinueException (2.31 Continue) until the last block, IncompleteException (4.08)
            # for a block without its predecessors; aiocoap renders both.
            request = self._block1.feed_and_take(request)
        except ValueError:
            _respond(pipe, fit_to(request, self._gateway.incomplete()))
            self._gateway.exchanges.forget(request.remote, request.mid)
            return
        except aiocoap.error.BadRequest:
            # A block whose size does not match its Block1 option: 4.00, no body.
            _respond(pipe, aiocoap.Message(code=Code.BAD_REQUEST))
            self._gateway.exchanges.forget(request.remote, request.mid)
            return
        response = await self._block2.extract_or_insert(request, lambda: self._gateway.handle(request))
        if response.mtype is not None or response.mid is not None:
            # aiocoap's Block2 cache hands back the whole cached answer itself when a later block is asked
            # for in a size that holds it all; sent once already, it keeps its type and message id, so aiocoap
            # would warn per request and answer a NON request with an ACK. A fresh copy is a new message.
            response = response.copy(mid=None)
            response.mtype = None
        response.opt.block1 = request.opt.block1
        if response.code in (Code.TOO_MANY_REQUESTS, Code.SERVICE_UNAVAILABLE):
            # Refusals without a look (rate limits, wrong-token limit, busy): what a forged source draws.
            response = fit_to(request, response)
        _respond(pipe, response)


class _Context(aiocoap.Context):  # type: ignore[misc]  # aiocoap is untyped
    """aiocoap's server context, whose render task per request is not named after the request: formatting
    it (``repr``, the client's address through ``ipaddress``) was a fifth of the CPU a garbage datagram costs."""

    def render_to_pipe(self, pipe: Pipe) -> None:
        run_driving_pipe(error_to_message(pipe, self.log), self._render_to_pipe(pipe))


class _Spool(Block1Spool):  # type: ignore[misc]  # aiocoap is untyped
    """aiocoap's Block1 reassembly on a bounded table; a transfer is dropped at its last block (aiocoap kept
    it MAX_TRANSMIT_WAIT longer: a retransmitted last block is a duplicate, answered from the exchange table)."""

    def __init__(self, table: TransferTable) -> None:
        self._assemblies = table

    def feed_and_take(self, req: aiocoap.Message) -> aiocoap.Message:
        assembled = super().feed_and_take(req)
        if req.opt.block1 is not None:
            self._assemblies.pop(_extract_block_key(req))
        return assembled


def _respond(pipe: Pipe, response: aiocoap.Message) -> None:
    pipe.add_response(response, is_last=True)
    # add_response has sent the answer (aiocoap's pipe callbacks run synchronously). aiocoap keeps every
    # answer for EXCHANGE_LIFETIME (247 s) to replay it to retransmissions, with a reference to its request;
    # dropping that reference keeps ~40% less memory per request (~1.6 instead of ~2.8 KB) and no provision
    # secret in memory for four minutes. Replays and retransmissions only need the answer itself.
    response.request = None
