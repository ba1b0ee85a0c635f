"""ThingsBoard's HTTP device API (``/api/v1/{token}/...``), after provisioning.

Paths, parameters and status codes follow ThingsBoard's ``DeviceApiController`` and its HTTP device
API documentation; the payload rules are :mod:`provisioning_common.device_api`, shared with the
MQTT and CoAP gateways.

=====================================  ==========================================================
``POST /telemetry``                    JSON object or array -> ``device.telemetry``; 200
``POST /attributes``                   client attributes (JSON object) stored; 200
``GET /attributes?clientKeys&sharedKeys``  200 ``{"client": {...}, "shared": {...}}``
``GET /attributes/updates?timeout=ms`` long poll: 200 with the first shared-attribute update, or 408
``GET /rpc?timeout=ms``                long poll: 200 ``{"id", "method", "params"}``, or 408
``POST /rpc/{id}``                     the device's answer to server-side RPC ``id``; 200
``POST /rpc``                          client-side RPC: 200 with the backend's answer, or 408
=====================================  ==========================================================

Every request: 413 when the body is over MAX_BODY_BYTES, 401 for an unknown token (empty body, as
ThingsBoard), 429 over DEVICE_MESSAGES_RATE_LIMIT (per device, ThingsBoard's error body), 400 for a
body or parameter the device API does not accept, 503 + Retry-After when the bus or a service
behind it is down. Unknown and foreign RPC ids get ThingsBoard's 200 and are dropped
(:mod:`.server_rpc`).

Long polls: a device is attached to this process's downlink queue (``TransportApi.links``) while at
least one of its polls is open here, and only then; ``timeout`` is in milliseconds (0 or absent:
HTTP_LONG_POLL_DEFAULT_S, capped at HTTP_LONG_POLL_MAX_S; negative: 408 at once). One poll per device
and kind (attributes, rpc) per process: a newer poll ends the older one with 408, which ThingsBoard's
SDK answers by polling again. A message that arrives while the device is attached but has no poll of
that kind open (ThingsBoard's SDK polls attributes and RPC on two threads, so one of them is often
between two polls) is held for the next poll of its kind (HOLD_MAX per kind, until its deadline); when
the device's last poll here ends, the attachment and what it held go: the device is offline again (an
RPC's publisher sees it unroutable; an attribute update waits in Postgres for the device's next request).
A client that disconnects releases its poll at once; on SIGTERM every poll and client-side RPC still
waiting is answered 408, so that the graceful shutdown does not wait for them.

Limitation (several instances): a device whose polls are spread over two instances at once (e.g. its
attribute poll on one and its RPC poll on another) is attached on both, and both receive its messages;
one that arrives while the device's RPC poll is open on one instance and was just closed on the other
can be held there too and delivered twice. With one instance, or a device that polls one instance at a
time, every message is delivered once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from fastapi import APIRouter, Request, Response
from provisioning_common.bus import RpcError
from provisioning_common.contract import DOWNLINK_ATTRIBUTES, DOWNLINK_RPC
from provisioning_common.device_api import (
    DeviceApiError,
    RateLimit,
    attributes_query,
    parse_attributes,
    parse_rate,
    parse_rpc_call,
    parse_rpc_response,
    render_attribute_update,
    render_attributes,
    render_server_rpc,
)
from provisioning_common.device_link import Attachment, DeviceLinks, Downlink
from provisioning_common.dialects import render_error
from provisioning_common.models import AuthenticateRequest, Dialect
from provisioning_common.settings import Settings
from provisioning_common.transport_api import TransportApi, is_json_document

from .body import JSON, read_body
from .server_rpc import ServerRpcIds

log = logging.getLogger(__name__)

#: Devices whose rate-limit buckets are kept; past this the one idle longest is forgotten (its bucket
#: would have refilled by then anyway, unless more than this many devices send at once).
RATE_LIMIT_DEVICES = 20_000
#: ThingsBoard's ``ThingsboardErrorCode.TOO_MANY_REQUESTS``.
TB_TOO_MANY_REQUESTS = 33
#: Messages a device's slot keeps, per kind, for its next poll of that kind (oldest dropped first).
HOLD_MAX = 16
KINDS = (DOWNLINK_ATTRIBUTES, DOWNLINK_RPC)
#: Java's int range: ThingsBoard's RPC ids are ``Integer`` path variables (anything else is 400).
INT_MIN, INT_MAX = -(2**31), 2**31 - 1


class RateLimits:
    """One :class:`RateLimit` per device (ThingsBoard's ``"cap:secs,..."``), at most ``size`` of them."""

    def __init__(self, spec: str, size: int = RATE_LIMIT_DEVICES) -> None:
        self._spec = spec
        self._enabled = bool(parse_rate(spec))
        self._size = size
        self._limits: OrderedDict[str, RateLimit] = OrderedDict()

    def allow(self, key: str) -> bool:
        if not self._enabled:
            return True
        limit = self._limits.get(key)
        if limit is None:
            limit = self._limits[key] = RateLimit(self._spec)
            if len(self._limits) > self._size:
                self._limits.popitem(last=False)
        else:
            self._limits.move_to_end(key)
        return limit.allow()

    def __len__(self) -> int:
        return len(self._limits)


@dataclass(eq=False)
class Poll:
    """One open long poll: its future gets the first downlink of its kind, or None when ended."""

    kind: str
    future: asyncio.Future[Downlink | None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def end(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


class Slot:
    """One device's open polls in this process (at most one per kind), its downlink attachment (held while
    any of them is open) and what arrived while no poll of its kind was open (HOLD_MAX per kind, until
    its deadline or the attachment ends)."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.polls: dict[str, Poll] = {}
        self.held: dict[str, deque[Downlink]] = {kind: deque(maxlen=HOLD_MAX) for kind in KINDS}
        #: Polls opened and not yet closed (including ones still attaching or detaching).
        self.users = 0
        self._attachment: Attachment | None = None
        self._lock = asyncio.Lock()

    def open(self, kind: str) -> Poll:
        """A new poll of ``kind``; an older one of the same kind ends (408). Answered at once with
        a held message if there is one."""
        previous = self.polls.get(kind)
        if previous is not None:
            previous.end()
        poll = self.polls[kind] = Poll(kind)
        held = self.held[kind]
        while held:
            downlink = held.popleft()
            if not downlink.expired():
                poll.future.set_result(downlink)
                break
        return poll

    def close(self, poll: Poll) -> None:
        poll.end()
        if self.polls.get(poll.kind) is poll:
            del self.polls[poll.kind]

    def dispatch(self, downlink: Downlink) -> None:
        """The attachment's sink (called by DeviceLinks; must not block)."""
        if downlink.kind not in self.held:
            return
        poll = self.polls.get(downlink.kind)
        if poll is not None and not poll.future.done():
            poll.future.set_result(downlink)
        else:  # between two polls of this kind (e.g. the SDK's RPC thread while its attribute poll is open)
            self.held[downlink.kind].append(downlink)

    async def attach(self, links: DeviceLinks) -> None:
        async with self._lock:
            if self._attachment is None:
                self._attachment = await links.attach(self.device_id, self.dispatch)

    async def detach(self, links: DeviceLinks) -> None:
        """Once no poll is left: stop receiving; what was held is dropped (its askers time out)."""
        async with self._lock:
            if self.users == 0 and self._attachment is not None:
                attachment, self._attachment = self._attachment, None
                await links.detach(attachment)
            if self._attachment is None:
                for held in self.held.values():
                    held.clear()

    @property
    def attached(self) -> bool:
        return self._attachment is not None


def _status(code: int, headers: dict[str, str] | None = None) -> Response:
    return Response(status_code=code, headers=headers)


def _bad_request(message: str) -> Response:
    return Response(render_error(Dialect.THINGSBOARD, message), status_code=400, media_type=JSON)


def _unavailable() -> Response:
    return Response(status_code=503, headers={"Retry-After": "1"})


def _too_many_requests() -> Response:
    body = {"status": 429, "message": "Too many requests for current device!", "errorCode": TB_TOO_MANY_REQUESTS,
            "timestamp": int(time.time() * 1000)}
    return Response(json.dumps(body, separators=(",", ":")), status_code=429, media_type=JSON,
                    headers={"Retry-After": "1"})


def _refused(exc: RpcError) -> bool:
    """A service answered "no" (as opposed to: unreachable, timed out, down)."""
    return type(exc) is RpcError


def _joined(request: Request, name: str) -> str | None:
    """A query parameter; repeated ones joined with commas (what Spring does for a String parameter)."""
    values = request.query_params.getlist(name)
    return ",".join(values) if values else None


async def _disconnected(receive: Callable[..., Any]) -> None:
    """Returns once the client is gone (for a request whose body was read or had none)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class DeviceApi:
    """The routes of ThingsBoard's HTTP device API and the state they share in one process."""

    def __init__(self, settings: Settings, api: Callable[[], TransportApi]) -> None:
        self.settings = settings
        self._api = api
        self.rate_limits = RateLimits(settings.device_messages_rate_limit)
        #: Devices with an open poll in this process.
        self.slots: dict[str, Slot] = {}
        self.rpc_ids = ServerRpcIds(lambda: api().links, settings)
        self._stopping: asyncio.Event | None = None
        self._too_large = render_error(Dialect.THINGSBOARD, f"Request body exceeds {settings.max_body_bytes} bytes")
        self.router = APIRouter()
        self._mount()

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def stopping(self) -> asyncio.Event:
        if self._stopping is None:
            self._stopping = asyncio.Event()
        return self._stopping

    def stop(self) -> None:
        """Answer every open poll and waiting client-side RPC (408) and every later one at once."""
        self.stopping.set()
        for slot in list(self.slots.values()):
            for poll in list(slot.polls.values()):
                poll.end()

    def stop_on_exit_signals(self) -> None:
        """Call :meth:`stop` on SIGTERM/SIGINT, before uvicorn's own handler (which then waits for open
        requests up to its graceful-shutdown timeout). Call from the running app's lifespan: uvicorn
        installs its handlers before the lifespan starts and restores the earlier ones when it ends."""
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)

            def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
                loop.call_soon_threadsafe(self.stop)
                if callable(previous):
                    previous(signum, frame)
                elif previous == signal.SIG_DFL:  # nobody else handles it: end the process as it would have
                    signal.signal(signum, signal.SIG_DFL)
                    signal.raise_signal(signum)

            signal.signal(sig, handler)

    # --- shared steps ------------------------------------------------------------------------

    async def _device(self, token: str) -> str | Response:
        """The device id of ``token``, or the answer to give: 401, 429 or 503."""
        try:
            auth = await self._api().authenticate(AuthenticateRequest(token=token))
        except RpcError:
            return _unavailable()
        if not auth.authenticated or auth.device_id is None:
            return _status(401)
        if not self.rate_limits.allow(auth.device_id):
            return _too_many_requests()
        return auth.device_id

    async def _body(self, request: Request) -> bytes | Response:
        body = await read_body(request.scope, request.receive, self.settings.max_body_bytes)
        if body is None:
            return Response(self._too_large, status_code=413, media_type=JSON)
        return body

    async def _wait(self, future: asyncio.Future[Any], timeout: float, request: Request) -> None:
        """Until ``future`` is done, ``timeout`` passed, the client left or the process stops."""
        watchers = [asyncio.ensure_future(_disconnected(request.receive)), asyncio.ensure_future(self.stopping.wait())]
        try:
            await asyncio.wait([future, *watchers], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for watcher in watchers:
                watcher.cancel()
            for watcher in watchers:
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

    def _poll_timeout(self, request: Request) -> float | Response:
        """``timeout`` in ms (ThingsBoard's long): 0 or absent is the default, capped at the maximum."""
        raw = request.query_params.get("timeout")
        if raw is None:
            return self.settings.http_long_poll_default_s
        try:
            millis = int(raw)
        except ValueError:
            return _bad_request("timeout must be a whole number of milliseconds")
        if millis == 0:
            return self.settings.http_long_poll_default_s
        return max(0.0, min(millis / 1000, self.settings.http_long_poll_max_s))

    # --- routes ------------------------------------------------------------------------------

    def _mount(self) -> None:
        router = self.router
        router.add_api_route("/api/v1/{token}/telemetry", self.post_telemetry, methods=["POST"])
        router.add_api_route("/api/v1/{token}/attributes", self.get_attributes, methods=["GET"])
        router.add_api_route("/api/v1/{token}/attributes", self.post_attributes, methods=["POST"])
        router.add_api_route("/api/v1/{token}/attributes/updates", self.attribute_updates, methods=["GET"])
        router.add_api_route("/api/v1/{token}/rpc", self.server_rpc, methods=["GET"])
        router.add_api_route("/api/v1/{token}/rpc", self.client_rpc, methods=["POST"])
        router.add_api_route("/api/v1/{token}/rpc/{request_id}", self.rpc_answer, methods=["POST"])

    async def post_telemetry(self, token: str, request: Request) -> Response:
        """Device telemetry; accepts JSON without a Content-Type (as ThingsBoard)."""
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        device = await self._device(token)
        if isinstance(device, Response):
            return device
        if not is_json_document(body):
            return _bad_request("Telemetry must be a JSON object or array")
        try:
            await self._api().publish_telemetry(device, body)
        except RpcError:
            return _unavailable()
        return _status(200)

    async def post_attributes(self, token: str, request: Request) -> Response:
        """Client attributes: a JSON object, stored in Postgres and announced on ``device.attributes``."""
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        device = await self._device(token)
        if isinstance(device, Response):
            return device
        try:
            values = parse_attributes(body)
            await self._api().save_client_attributes(device, values)
        except ValueError as exc:  # DeviceApiError, or the model's bounds (e.g. too many keys)
            return _bad_request(str(exc) if isinstance(exc, DeviceApiError) else "attributes out of bounds")
        except RpcError as exc:
            return _bad_request(str(exc)) if _refused(exc) else _unavailable()
        return _status(200)

    async def get_attributes(self, token: str, request: Request) -> Response:
        device = await self._device(token)
        if isinstance(device, Response):
            return device
        try:
            query = attributes_query(device, _joined(request, "clientKeys"), _joined(request, "sharedKeys"))
            snapshot = await self._api().get_attributes(query)
        except ValueError as exc:
            return _bad_request(str(exc) if isinstance(exc, DeviceApiError) else "too many attribute keys")
        except RpcError as exc:
            return _bad_request(str(exc)) if _refused(exc) else _unavailable()
        return Response(render_attributes(snapshot), media_type=JSON)

    async def attribute_updates(self, token: str, request: Request) -> Response:
        return await self._long_poll(token, request, DOWNLINK_ATTRIBUTES)

    async def server_rpc(self, token: str, request: Request) -> Response:
        return await self._long_poll(token, request, DOWNLINK_RPC)

    async def _long_poll(self, token: str, request: Request, kind: str) -> Response:
        timeout = self._poll_timeout(request)
        if isinstance(timeout, Response):
            return timeout
        device = await self._device(token)
        if isinstance(device, Response):
            return device
        if self.stopping.is_set():
            return _status(408)
        links = self._api().links
        if kind == DOWNLINK_RPC:
            try:
                await self.rpc_ids.start()
            except RpcError:
                return _unavailable()
        slot = self.slots.get(device)
        if slot is None:
            slot = self.slots[device] = Slot(device)
        slot.users += 1
        poll = slot.open(kind)
        try:
            if not poll.future.done():
                await slot.attach(links)
                await self._wait(poll.future, timeout, request)
        except RpcError:
            return _unavailable()
        finally:
            slot.close(poll)
            slot.users -= 1
            if slot.users == 0:
                await slot.detach(links)
                if slot.users == 0 and not slot.attached and self.slots.get(device) is slot:
                    del self.slots[device]
        downlink = poll.future.result()
        if downlink is None:
            return _status(408)
        if kind == DOWNLINK_RPC:
            body = render_server_rpc(downlink, self.rpc_ids.issue(device, downlink))
        else:
            body = render_attribute_update(downlink)
        return Response(body, media_type=JSON)

    async def rpc_answer(self, token: str, request_id: str, request: Request) -> Response:
        """The device's answer to a server-side RPC it received from a poll (any JSON document)."""
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        try:
            number = int(request_id)
        except ValueError:
            number = INT_MAX + 1
        if not INT_MIN <= number <= INT_MAX:
            return _bad_request("the RPC request id must be an integer")
        device = await self._device(token)
        if isinstance(device, Response):
            return device
        try:
            answer = parse_rpc_response(body)
            await self.rpc_ids.answer(device, number, answer)
        except DeviceApiError as exc:
            return _bad_request(str(exc))
        except RpcError:
            return _unavailable()
        return _status(200)

    async def client_rpc(self, token: str, request: Request) -> Response:
        """A client-side RPC: the backend's answer, or 408 when none came (ThingsBoard's sync-session timeout)."""
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        device = await self._device(token)
        if isinstance(device, Response):
            return device
        try:
            call = parse_rpc_call(body)
        except DeviceApiError as exc:
            return _bad_request(str(exc))
        if self.stopping.is_set():
            return _status(408)
        asked = asyncio.ensure_future(
            self._api().client_rpc(device, call, max_payload_size=self.settings.max_body_bytes))
        try:
            await self._wait(asked, self.settings.device_client_rpc_timeout_s + 1, request)
        finally:
            if not asked.done():
                asked.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asked
        answer = asked.result() if asked.done() and not asked.cancelled() else None
        if answer is None:
            return _status(408)
        return Response(answer, media_type=JSON)
