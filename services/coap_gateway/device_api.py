"""ThingsBoard's CoAP device API after provisioning: telemetry, attributes, RPC, and observations.

Paths and codes follow ThingsBoard's CoAP device API and its ``CoapTransportResource`` /
``DefaultCoapClientContext``; ``{token}`` is the device's access token:

* ``POST /api/v1/{token}/telemetry``: JSON object or array → 2.01, forwarded to ``device.telemetry``.
* ``POST /api/v1/{token}/attributes``: client attributes (a JSON object) → 2.01 once stored.
* ``GET /api/v1/{token}/attributes?clientKeys=a,b&sharedKeys=c`` → 2.05 ``{"client": {...}, "shared": {...}}``
  (a scope with nothing found left out); nothing found at all → 4.04 without a body (ThingsBoard).
* ``GET /api/v1/{token}/attributes`` with Observe (any value but 1; also ``.../attributes/updates``):
  shared-attribute updates. The first answer is 2.05 with every shared attribute as ``{"key": value}``
  (ThingsBoard answers an observation with its shared attributes); each later update is a notification
  ``{"key": value}`` and/or ``{"deleted": ["key", ...]}`` (updates that arrive together are merged into one).
* ``GET /api/v1/{token}/rpc`` with Observe: server-side RPCs. The first answer is 2.03 Valid without a body
  (ThingsBoard); each RPC is a notification ``{"id": n, "method": ..., "params": ...}``. An RPC for a
  device that observes only its attributes here waits (until its deadline) for its RPC observation, as
  ThingsBoard's device actor keeps it for the device's subscription. ``GET .../rpc`` without Observe → 4.00
  (ThingsBoard).
* ``POST /api/v1/{token}/rpc/{id}``: the device's answer (JSON) to RPC ``id`` → 2.01, handed to whoever
  asked. An id this device was not sent, or whose caller stopped waiting, or another device's → 2.01 and
  nothing is forwarded (ThingsBoard accepts the answer and its device actor drops it); an id that is not a
  number → 4.00 (ThingsBoard's "invalid URL").
* ``POST /api/v1/{token}/rpc``: client-side RPC ``{"method": ..., "params": ...}`` → 2.05 with the backend's
  answer (``device.rpc``); ``getSessionLimits`` is answered by the gateway with the limits below. No answer
  within ``DEVICE_CLIENT_RPC_TIMEOUT_S`` (or no backend bound) → 5.04 Gateway Timeout (ThingsBoard leaves
  the request unanswered, so the device waits for its own time-out).
* ``GET`` with Observe = 1 (RFC 7641 §3.6, deregistration) → 2.02 Deleted, the observation ends
  (ThingsBoard answers a cancelled observation 2.02).

Refusals: unknown token → 4.01; a body that is not what the path takes (not JSON, not an object, no
``method``...) → 4.00 with ``{"errorMsg": ..., "status": "FAILURE"}``, nothing stored or forwarded; bus or
credentials service unreachable → 5.03 with Max-Age 1. Every request with a token counts against the
token's ``DEVICE_MESSAGES_RATE_LIMIT`` (ThingsBoard notation, e.g. ``100:1,3000:60``); over it → 4.29 Too
Many Requests (RFC 8516) with Max-Age 1 (ThingsBoard's CoAP transport answers its rate-limit error 5.00;
its HTTP transport 429).

Observations (RFC 7641). While one lives, the device is attached to this process's downlink queue
(``TransportApi.links``), so RPCs and shared-attribute updates published for it reach this gateway; it is
detached when the observation ends: Observe = 1, an RST to a notification, a confirmable notification
never acknowledged (the client vanished: aiocoap gives up after its retransmissions and ends it), or the
gateway stopping (then each observer gets 5.03 with Max-Age 1, to observe again elsewhere). Notifications
go out as the observing request went (CON or NON), as in ThingsBoard; a notification over one block
(1024 bytes) goes out as its first Block2 block, the client fetches the rest (RFC 7959 §2.6).

Bounds (everything a device or an operator can grow):

* per device, one observation of each kind per gateway process: a new one replaces the old, which ends
  with 2.02 Deleted (ThingsBoard's ``registerFeatureObservation``);
* :data:`MAX_OBSERVATIONS_PER_SOURCE` per client IP address (→ 4.29) and :data:`MAX_OBSERVATIONS` in all
  (→ 5.03 with Max-Age :data:`FULL_RETRY_S`);
* unanswered two-way RPCs per device: ``DEVICE_MAX_INFLIGHT``; one more is not sent to the device (its
  caller gets no answer, i.e. times out), and each is forgotten at its caller's deadline (or after
  ``DEVICE_RPC_DEFAULT_TIMEOUT_S`` when it names none, at most ``DEVICE_RPC_MAX_TIMEOUT_S``);
* RPCs held for a device's RPC observation: ``DEVICE_MAX_INFLIGHT`` per device (more are dropped);
* client-side RPCs waiting for the backend per device: ``DEVICE_MAX_INFLIGHT`` (→ 4.29);
* rate-limit state: :data:`MAX_RATE_LIMITED_TOKENS` tokens, least recently used forgotten first.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import json
import logging
import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import aiocoap
from aiocoap.numbers.codes import Code
from aiocoap.numbers.contentformat import ContentFormat
from aiocoap.pipe import Pipe
from provisioning_common.bus import RpcError
from provisioning_common.contract import DOWNLINK_ATTRIBUTES, DOWNLINK_REVOKED, DOWNLINK_RPC
from provisioning_common.device_api import (
    DeviceApiError,
    RateLimit,
    attributes_query,
    parse_attributes,
    parse_rpc_call,
    parse_rpc_response,
    render_attributes,
    render_server_rpc,
)
from provisioning_common.device_auth import CLIENT_SOURCE, TooManyFailures
from provisioning_common.device_link import Attachment, Downlink
from provisioning_common.dialects import render_error
from provisioning_common.models import AttributesQuery, Dialect
from provisioning_common.settings import Settings
from provisioning_common.transport_api import TransportApi, is_json_document
from pydantic import ValidationError

from .state import fit_to

log = logging.getLogger(__name__)

JSON = ContentFormat.JSON
#: Observations this gateway process holds at once; one more → 5.03 (Max-Age FULL_RETRY_S).
MAX_OBSERVATIONS = 20_000
#: Observations from one client IP address (many devices behind one NAT share it); one more → 4.29.
MAX_OBSERVATIONS_PER_SOURCE = 1_000
#: Max-Age of the 5.03 that refuses an observation when the gateway holds MAX_OBSERVATIONS.
FULL_RETRY_S = 60
#: Tokens whose rate-limit buckets are kept (least recently used forgotten: it then starts full again).
MAX_RATE_LIMITED_TOKENS = 50_000
#: RFC 7641 §4.4: the Observe option is a 24-bit sequence number.
OBSERVE_MODULO = 1 << 24
#: Longest RPC request id in a path, and the largest id handed out (ThingsBoard's ids are Java ints).
MAX_ID_DIGITS = 10
MAX_RPC_ID = 2**31 - 1
#: RFC 7252 §5.9.3.4 / RFC 8516: Max-Age of a 5.03 or 4.29 = seconds after which to retry.
RETRY_AFTER_S = 1


class Route(enum.Enum):
    PROVISION = "provision"
    TELEMETRY = "telemetry"
    ATTRIBUTES = "attributes"
    RPC = "rpc"
    RPC_REPLY = "rpc_reply"


class Target(NamedTuple):
    """What a Uri-Path names: the resource, the device's token, and an RPC reply's request id."""

    route: Route
    token: str = ""
    request_id: str = ""


#: The methods each resource takes; any other → 4.05.
METHODS: dict[Route, frozenset[Code]] = {
    Route.PROVISION: frozenset({Code.POST}),
    Route.TELEMETRY: frozenset({Code.POST}),
    Route.ATTRIBUTES: frozenset({Code.GET, Code.POST}),
    Route.RPC: frozenset({Code.GET, Code.POST}),
    Route.RPC_REPLY: frozenset({Code.POST}),
}


def is_observation(request: aiocoap.Message, target: Target) -> bool:
    """A GET registering an observation: ThingsBoard takes any Observe value but 1 (deregister) as one."""
    return (target.route in (Route.ATTRIBUTES, Route.RPC) and request.code is Code.GET
            and request.opt.observe is not None and request.opt.observe != 1)


def query_value(query: tuple[str, ...], name: str) -> str | None:
    """The value of ``name=value`` among Uri-Query options (the last one wins, as in ThingsBoard)."""
    value = None
    prefix = name + "="
    for item in query:
        if item.startswith(prefix):
            value = item[len(prefix):]
    return value


def _error(code: Code, message: str, **options: Any) -> aiocoap.Message:
    return aiocoap.Message(code=code, payload=render_error(Dialect.THINGSBOARD, message), content_format=JSON,
                           **options)


def _source(remote: Any) -> str:
    """The client's IP address (IPv4-mapped IPv6 as plain IPv4); empty when unknown."""
    sockaddr = getattr(remote, "sockaddr", None)
    if not sockaddr:
        return ""
    host = str(sockaddr[0])
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def unavailable() -> aiocoap.Message:
    return aiocoap.Message(code=Code.SERVICE_UNAVAILABLE, max_age=RETRY_AFTER_S)


# --- server-side RPCs sent and not answered yet ------------------------------------------------------------


@dataclass
class _Pending:
    downlink: Downlink
    timer: asyncio.TimerHandle


class RpcLedger:
    """The two-way RPCs sent to devices and not answered yet, by device and request id.

    Ids come from one counter per gateway process (1 .. 2**31 - 1, ThingsBoard's ids are Java ints, then
    round again), so an id is not reused for another RPC while an old answer may still arrive. Each entry is
    forgotten at its caller's deadline. The device's answer must reach the instance that sent the RPC: the
    UDP load balancer keeps client-IP affinity (deploy/k8s/base/coap-gateway.yaml)."""

    def __init__(self, max_per_device: int, default_timeout_s: float, max_timeout_s: float) -> None:
        self._max = max_per_device
        self._default = default_timeout_s
        self._longest = max_timeout_s
        self._ids = itertools.count()
        self._pending: dict[str, dict[int, _Pending]] = {}

    def add(self, device_id: str, downlink: Downlink) -> int | None:
        """The id the device sees this RPC under; None when the device holds too many unanswered."""
        pending = self._pending.get(device_id)
        if downlink.two_way and pending is not None and len(pending) >= self._max:
            return None
        request_id = next(self._ids) % MAX_RPC_ID + 1
        if downlink.two_way:
            wait = min(downlink.seconds_left(self._default), self._longest)
            timer = asyncio.get_running_loop().call_later(wait, self._forget, device_id, request_id)
            self._pending.setdefault(device_id, {})[request_id] = _Pending(downlink, timer)
        return request_id

    def take(self, device_id: str, request_id: int) -> Downlink | None:
        """The RPC ``device_id`` was sent as ``request_id``, now answered; None if there is none (any more)."""
        pending = self._pending.get(device_id)
        entry = pending.pop(request_id, None) if pending is not None else None
        if entry is None:
            return None
        entry.timer.cancel()
        if not pending:
            del self._pending[device_id]
        return entry.downlink

    def put_back(self, device_id: str, request_id: int, downlink: Downlink) -> None:
        """An answer that could not be passed on: keep waiting for another (until the deadline)."""
        if downlink.expired():
            return
        wait = min(downlink.seconds_left(self._default), self._longest)
        timer = asyncio.get_running_loop().call_later(wait, self._forget, device_id, request_id)
        self._pending.setdefault(device_id, {})[request_id] = _Pending(downlink, timer)

    def _forget(self, device_id: str, request_id: int) -> None:
        pending = self._pending.get(device_id)
        if pending is not None and pending.pop(request_id, None) is not None and not pending:
            del self._pending[device_id]

    def unanswered(self, device_id: str) -> int:
        return len(self._pending.get(device_id, ()))

    def clear(self) -> None:
        for pending in self._pending.values():
            for entry in pending.values():
                entry.timer.cancel()
        self._pending.clear()


# --- observations ------------------------------------------------------------------------------------------


class Feature(enum.Enum):
    ATTRIBUTES = "attributes"
    RPC = "rpc"


@dataclass(eq=False)
class _Observation:
    """One observing request: what its device's downlink queue handed over and is not notified yet."""

    feature: Feature
    device_id: str
    source: str
    task: asyncio.Task[Any] | None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set to end the observation with this code (2.02 when replaced, 5.03 when the gateway stops).
    end_code: Code | None = None
    #: Attribute updates not notified yet, merged: key → value, and deleted keys (in order).
    updated: dict[str, Any] = field(default_factory=dict)
    deleted: dict[str, None] = field(default_factory=dict)
    #: RPC notifications not sent yet, and the last RPC taken (each reaches every sink of the device).
    rpcs: deque[bytes] = field(default_factory=deque)
    last_rpc: Downlink | None = None
    #: When its request authenticated (Unix time): a revocation after it ends the observation (Downlink.revokes).
    since: float = field(default_factory=time.time)

    def end(self, code: Code) -> None:
        self.end_code = code
        self.wake.set()

    def merge(self, body: dict[str, Any]) -> None:
        """Apply a shared-attribute update (``{"k": v}`` and/or ``{"deleted": [...]}``) to what is pending."""
        for key, value in body.items():
            if key == "deleted" and isinstance(value, list):
                for name in value:
                    if isinstance(name, str):
                        self.updated.pop(name, None)
                        self.deleted[name] = None
            else:
                self.updated[key] = value
                self.deleted.pop(key, None)
        self.wake.set()

    def take_notifications(self) -> list[bytes]:
        if self.feature is Feature.RPC:
            taken = list(self.rpcs)
            self.rpcs.clear()
            return taken
        if not self.updated and not self.deleted:
            return []
        body: dict[str, Any] = dict(self.updated)
        if self.deleted:
            body["deleted"] = list(self.deleted)
        self.updated, self.deleted = {}, {}
        return [json.dumps(body, separators=(",", ":")).encode()]


#: Turns an answer into what goes on the wire for ``request``: the answer itself, or its first Block2 block
#: (the rest kept for the client's follow-up requests). The gateway's Block2 cache.
Chunker = Callable[[aiocoap.Message, aiocoap.Message], Awaitable[aiocoap.Message]]


class DeviceApi:
    """The device API's resources for one gateway process; its only state is the live observations, the
    unanswered RPCs and the rate-limit buckets (all bounded)."""

    def __init__(self, api: TransportApi, settings: Settings, chunk: Chunker) -> None:
        self._api = api
        self._settings = settings
        self._limit = settings.max_body_bytes
        self._chunk = chunk
        self._rate_spec = settings.device_messages_rate_limit
        self._rates: OrderedDict[str, RateLimit] = OrderedDict()
        self._observations: dict[tuple[str, Feature], _Observation] = {}
        self._per_source: Counter[str] = Counter()
        self._ledger = RpcLedger(settings.device_max_inflight, settings.device_rpc_default_timeout_s,
                                 settings.device_rpc_max_timeout_s)
        self._client_rpcs: Counter[str] = Counter()
        #: RPCs for devices that observe their attributes but not (yet) their RPCs, by device.
        self._held: dict[str, deque[Downlink]] = {}
        self._detaching: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def observations(self) -> int:
        return len(self._observations)

    @property
    def ledger(self) -> RpcLedger:
        return self._ledger

    # --- shared steps ------------------------------------------------------------------------------

    def allow(self, token: str) -> bool:
        """Count one message against ``token``'s rate limit; False when over it."""
        if not self._rate_spec:
            return True
        bucket = self._rates.get(token)
        if bucket is None:
            bucket = self._rates[token] = RateLimit(self._rate_spec)
            if len(self._rates) > MAX_RATE_LIMITED_TOKENS:
                self._rates.popitem(last=False)
        else:
            self._rates.move_to_end(token)
        return bucket.allow()

    @staticmethod
    def too_many(message: str = "Too many requests; see getSessionLimits") -> aiocoap.Message:
        return _error(Code.TOO_MANY_REQUESTS, message, max_age=RETRY_AFTER_S)

    async def _device(self, token: str) -> str | aiocoap.Message:
        """The device owning ``token``, or the refusal to answer (4.01 unknown, 5.03 unreachable)."""
        try:
            auth = await self._api.authenticate_token(token)
        except TooManyFailures as exc:
            # AUTH_FAILURES_PER_MINUTE unknown tokens from this address: CoAP's only, a forged UDP source holds
            # back no other transport (each gateway process counts its own).
            return _error(Code.TOO_MANY_REQUESTS, "Too many failed authentication attempts from this address",
                          max_age=max(1, math.ceil(exc.retry_after_s)))
        except RpcError:
            return unavailable()
        if not auth.authenticated or not auth.device_id:
            return aiocoap.Message(code=Code.UNAUTHORIZED)
        return auth.device_id

    # --- one-shot requests -------------------------------------------------------------------------

    async def handle(self, request: aiocoap.Message, target: Target) -> aiocoap.Message:
        """Answer a (reassembled) request to a token path whose method passed the gateway's precheck."""
        CLIENT_SOURCE.set(_source(request.remote))  # for the wrong-token limiter (issue 13)
        if not self.allow(target.token):
            return self.too_many()
        if request.code is Code.GET:
            if request.opt.observe == 1:
                return await self._deregister(target)
            if target.route is Route.ATTRIBUTES:
                return await self._get_attributes(request, target.token)
            return _error(Code.BAD_REQUEST, "GET /api/v1/{token}/rpc needs the Observe option")
        match target.route:
            case Route.TELEMETRY:
                return await self._telemetry(request.payload, target.token)
            case Route.ATTRIBUTES:
                return await self._post_attributes(request.payload, target.token)
            case Route.RPC:
                return await self._client_rpc(request.payload, target.token)
            case Route.RPC_REPLY:
                return await self._rpc_reply(request.payload, target)
        raise AssertionError(target.route)  # pragma: no cover - the precheck lets nothing else through

    async def _telemetry(self, payload: bytes, token: str) -> aiocoap.Message:
        if not is_json_document(payload):
            return _error(Code.BAD_REQUEST, "Telemetry must be a JSON object or array")
        device = await self._device(token)
        if isinstance(device, aiocoap.Message):
            return device
        try:
            await self._api.publish_telemetry(device, payload)
        except RpcError:
            return unavailable()
        return aiocoap.Message(code=Code.CREATED)

    async def _post_attributes(self, payload: bytes, token: str) -> aiocoap.Message:
        try:
            values = parse_attributes(payload)
        except DeviceApiError as exc:
            return _error(Code.BAD_REQUEST, str(exc))
        device = await self._device(token)
        if isinstance(device, aiocoap.Message):
            return device
        try:
            await self._api.save_client_attributes(device, values)
        except ValidationError:
            return _error(Code.BAD_REQUEST, "too many attributes in one message")
        except RpcError:
            return unavailable()
        return aiocoap.Message(code=Code.CREATED)

    async def _get_attributes(self, request: aiocoap.Message, token: str) -> aiocoap.Message:
        query = request.opt.uri_query
        device = await self._device(token)
        if isinstance(device, aiocoap.Message):
            return device
        try:
            attributes = attributes_query(device, query_value(query, "clientKeys"), query_value(query, "sharedKeys"))
        except (DeviceApiError, ValidationError) as exc:
            reason = str(exc) if isinstance(exc, DeviceApiError) else "too many attribute keys"
            return _error(Code.BAD_REQUEST, reason)
        try:
            snapshot = await self._api.get_attributes(attributes)
        except RpcError:
            return unavailable()
        if not snapshot.client and not snapshot.shared:
            return aiocoap.Message(code=Code.NOT_FOUND)  # ThingsBoard: nothing found is 4.04, without a body
        return aiocoap.Message(code=Code.CONTENT, payload=render_attributes(snapshot), content_format=JSON)

    async def _client_rpc(self, payload: bytes, token: str) -> aiocoap.Message:
        try:
            call = parse_rpc_call(payload)
        except DeviceApiError as exc:
            return _error(Code.BAD_REQUEST, str(exc))
        device = await self._device(token)
        if isinstance(device, aiocoap.Message):
            return device
        if self._client_rpcs[device] >= self._settings.device_max_inflight:
            return self.too_many("Too many client-side RPCs waiting for an answer")
        self._client_rpcs[device] += 1
        try:
            answer = await self._api.client_rpc(device, call, max_payload_size=self._limit)
        finally:
            self._client_rpcs[device] -= 1
            if not self._client_rpcs[device]:
                del self._client_rpcs[device]
        if answer is None:
            return _error(Code.GATEWAY_TIMEOUT, "No answer to the RPC from the backend")
        return aiocoap.Message(code=Code.CONTENT, payload=answer, content_format=JSON)

    async def _rpc_reply(self, payload: bytes, target: Target) -> aiocoap.Message:
        raw = target.request_id
        if not (raw.isascii() and raw.isdigit() and len(raw) <= MAX_ID_DIGITS):
            return _error(Code.BAD_REQUEST, "The RPC request id in the path must be a number")
        try:
            body = parse_rpc_response(payload)
        except DeviceApiError as exc:
            return _error(Code.BAD_REQUEST, str(exc))
        device = await self._device(target.token)
        if isinstance(device, aiocoap.Message):
            return device
        request_id = int(raw)
        downlink = self._ledger.take(device, request_id)
        if downlink is None:
            # Never sent to this device, answered already, or its caller stopped waiting: ThingsBoard
            # accepts such an answer (2.01) and drops it.
            log.debug("RPC answer from %s for request %d that nobody waits for", device, request_id)
            return aiocoap.Message(code=Code.CREATED)
        try:
            await self._api.links.answer(downlink, body)
        except RpcError:
            self._ledger.put_back(device, request_id, downlink)
            return unavailable()
        return aiocoap.Message(code=Code.CREATED)

    async def _deregister(self, target: Target) -> aiocoap.Message:
        """Observe = 1 (RFC 7641 §3.6). aiocoap has already ended the observation the same client started
        with the same token (a new request on a token replaces the old one); this only answers it."""
        device = await self._device(target.token)
        if isinstance(device, aiocoap.Message):
            return device
        return aiocoap.Message(code=Code.DELETED)

    # --- observations ------------------------------------------------------------------------------

    async def observe(self, pipe: Pipe, target: Target, source: str) -> None:
        """Serve one observation on ``pipe`` until the client cancels it or it is ended; runs in aiocoap's
        render task, which aiocoap cancels when the client loses interest (RST, Observe = 1, gone)."""
        request = pipe.request
        CLIENT_SOURCE.set(source)  # for the wrong-token limiter (issue 13)
        feature = Feature.ATTRIBUTES if target.route is Route.ATTRIBUTES else Feature.RPC
        refusal = None
        if self._closing:
            refusal = unavailable()
        elif not self.allow(target.token):
            refusal = self.too_many()
        if refusal is not None:
            pipe.add_response(fit_to(request, refusal), is_last=True)
            return
        device = await self._device(target.token)
        if isinstance(device, aiocoap.Message):
            pipe.add_response(fit_to(request, device), is_last=True)
            return
        key = (device, feature)
        previous = self._observations.get(key)
        replaces_own = previous is not None and previous.source == source
        if previous is None and len(self._observations) >= MAX_OBSERVATIONS:
            pipe.add_response(fit_to(request, _error(Code.SERVICE_UNAVAILABLE, "Too many observations on this gateway",
                                                     max_age=FULL_RETRY_S)), is_last=True)
            return
        if not replaces_own and self._per_source[source] >= MAX_OBSERVATIONS_PER_SOURCE:
            pipe.add_response(fit_to(request, self.too_many("Too many observations from this address")), is_last=True)
            return
        observation = _Observation(feature, device, source, asyncio.current_task())
        self._register(key, observation)
        attachment: Attachment | None = None
        try:
            try:
                attachment = await self._api.links.attach(device, self._sink(observation))
                first = await self._first_answer(observation)
            except RpcError:
                pipe.add_response(unavailable(), is_last=True)
                return
            sequence = 0
            first.opt.observe = sequence
            pipe.add_response(await self._chunk(request, first), is_last=False)
            while True:
                await observation.wake.wait()
                observation.wake.clear()
                if observation.end_code is not None:
                    ending = aiocoap.Message(code=observation.end_code)
                    if observation.end_code is Code.SERVICE_UNAVAILABLE:
                        ending.opt.max_age = RETRY_AFTER_S
                    pipe.add_response(ending, is_last=True)
                    return
                for payload in observation.take_notifications():
                    sequence = (sequence + 1) % OBSERVE_MODULO
                    notification = aiocoap.Message(code=Code.CONTENT, payload=payload, content_format=JSON,
                                                   observe=sequence)
                    pipe.add_response(await self._chunk(request, notification), is_last=False)
        finally:
            self._unregister(key, observation)
            if attachment is not None:
                # In its own task: this one may be cancelled (the client lost interest) while detaching.
                task = asyncio.create_task(self._api.links.detach(attachment))
                self._detaching.add(task)
                task.add_done_callback(self._detaching.discard)

    async def _first_answer(self, observation: _Observation) -> aiocoap.Message:
        if observation.feature is Feature.RPC:
            return aiocoap.Message(code=Code.VALID)  # ThingsBoard: 2.03, no body
        snapshot = await self._api.get_attributes(
            AttributesQuery(device_id=observation.device_id, client_keys=None, shared_keys=[]))
        return aiocoap.Message(code=Code.CONTENT, payload=json.dumps(snapshot.shared, separators=(",", ":")).encode(),
                               content_format=JSON)

    def _register(self, key: tuple[str, Feature], observation: _Observation) -> None:
        previous = self._observations.get(key)
        if previous is not None:
            self._unregister(key, previous)
            if previous.task is None or not previous.task.cancelling():
                previous.end(Code.DELETED)  # ThingsBoard: the replaced observation gets 2.02
        self._observations[key] = observation
        self._per_source[observation.source] += 1
        if observation.feature is Feature.RPC:
            for downlink in self._held.pop(observation.device_id, ()):
                if not downlink.expired():
                    self._route_rpc(observation.device_id, downlink)

    def _unregister(self, key: tuple[str, Feature], observation: _Observation) -> None:
        if self._observations.get(key) is not observation:
            return
        del self._observations[key]
        self._per_source[observation.source] -= 1
        if self._per_source[observation.source] <= 0:
            del self._per_source[observation.source]
        device_id = observation.device_id
        if (device_id, Feature.ATTRIBUTES) not in self._observations and (device_id, Feature.RPC) not in \
                self._observations:
            self._held.pop(device_id, None)  # no session of the device here any more

    def _sink(self, observation: _Observation) -> Callable[[Downlink], None]:
        """DeviceLinks' callback for one observation (never blocks). Shared-attribute updates go to the
        attributes observation that received them; an RPC goes to the device's RPC observation, whichever
        of the device's observations received it."""
        device_id = observation.device_id

        def sink(downlink: Downlink) -> None:
            if downlink.kind == DOWNLINK_REVOKED:
                if downlink.revokes(observation.since):
                    observation.end(Code.UNAUTHORIZED)  # its credentials were revoked or replaced
            elif downlink.kind == DOWNLINK_RPC:
                self._route_rpc(device_id, downlink)
            elif (downlink.kind == DOWNLINK_ATTRIBUTES and observation.feature is Feature.ATTRIBUTES
                  and observation.end_code is None):
                observation.merge(downlink.body)

        return sink

    def _route_rpc(self, device_id: str, downlink: Downlink) -> None:
        """Send an RPC to the device's RPC observation; hold it (until its deadline) while the device only
        observes its attributes, as ThingsBoard's device actor keeps an RPC for the device's subscription."""
        observation = self._observations.get((device_id, Feature.RPC))
        if observation is None or observation.end_code is not None:
            held = self._held.setdefault(device_id, deque())
            while held and held[0].expired():
                held.popleft()
            if len(held) >= self._settings.device_max_inflight:
                log.debug("RPC %r for %s dropped: %d held for its RPC observation", downlink.body.get("method"),
                          device_id, len(held))
                return
            held.append(downlink)
            return
        if observation.last_rpc is downlink:
            return  # the same message through the device's other observation (DeviceLinks calls every sink)
        observation.last_rpc = downlink
        request_id = self._ledger.add(device_id, downlink)
        if request_id is None:
            log.debug("RPC %r for %s not sent: %d RPCs unanswered (DEVICE_MAX_INFLIGHT)",
                      downlink.body.get("method"), device_id, self._settings.device_max_inflight)
            return
        observation.rpcs.append(render_server_rpc(downlink, request_id))
        observation.wake.set()

    async def close(self) -> None:
        """The gateway stops: end every observation with 5.03 (Max-Age 1) and detach its device."""
        self._closing = True
        tasks = [o.task for o in self._observations.values() if o.task is not None]
        for observation in list(self._observations.values()):
            observation.end(Code.SERVICE_UNAVAILABLE)
        if tasks:
            # Each ends as soon as it runs: it sends its 5.03 and schedules its detach.
            await asyncio.wait(tasks, timeout=5)
        if self._detaching:
            await asyncio.wait(set(self._detaching), timeout=5)
        self._ledger.clear()
        self._held.clear()
