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

Long polls (:mod:`.polls`): each poll consumes its device's queue of its kind, shared by every
gateway instance, so a message reaches one poll once whichever instance the poll reached, and what
arrives between two polls waits there for the next one. ``timeout`` is in milliseconds (0 or absent:
HTTP_LONG_POLL_DEFAULT_S, capped at HTTP_LONG_POLL_MAX_S; negative: 408 at once). One poll per device
and kind per process: a newer poll ends the older one with 408, which ThingsBoard's SDK answers by
polling again. A client that disconnects ends its poll at once (what reaches it then is requeued); on
SIGTERM every poll and client-side RPC still waiting is answered 408, so that the graceful shutdown
does not wait for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from types import FrameType
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from provisioning_common.bus import RpcError
from provisioning_common.contract import DOWNLINK_ATTRIBUTES, DOWNLINK_REVOKED, DOWNLINK_RPC
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
from provisioning_common.device_auth import CLIENT_SOURCE, TooManyFailures
from provisioning_common.dialects import render_error
from provisioning_common.models import Dialect
from provisioning_common.settings import Settings
from provisioning_common.transport_api import TransportApi, is_json_document

from .body import JSON, read_body
from .polls import DevicePolls
from .server_rpc import ServerRpcIds

log = logging.getLogger(__name__)

#: Devices whose rate-limit buckets are kept; past this the one idle longest is forgotten (its bucket
#: would have refilled by then anyway, unless more than this many devices send at once).
RATE_LIMIT_DEVICES = 20_000
#: ThingsBoard's ``ThingsboardErrorCode.TOO_MANY_REQUESTS``.
TB_TOO_MANY_REQUESTS = 33
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


def _too_many_failures(retry_after_s: float) -> Response:
    """The client's address used up AUTH_FAILURES_PER_MINUTE (unknown tokens): refused until its minute ends."""
    body = {"status": 429, "message": "Too many failed authentication attempts from this address",
            "errorCode": TB_TOO_MANY_REQUESTS, "timestamp": int(time.time() * 1000)}
    return Response(json.dumps(body, separators=(",", ":")), status_code=429, media_type=JSON,
                    headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


async def _client_source(request: Request) -> None:
    """Note the client's address (uvicorn's: a trusted proxy's X-Forwarded-For applied) for
    :meth:`TransportApi.authenticate_token`; async, so that it runs in the endpoint's own context."""
    CLIENT_SOURCE.set(request.client.host if request.client else "")


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
        self.polls = DevicePolls(lambda: api().links.bus, settings)
        self.rpc_ids = ServerRpcIds(lambda: api().links, settings)
        self._stopping: asyncio.Event | None = None
        self._too_large = render_error(Dialect.THINGSBOARD, f"Request body exceeds {settings.max_body_bytes} bytes")
        # Each device route first notes the client's address for the wrong-token limiter (issue 13).
        self.router = APIRouter(dependencies=[Depends(_client_source)])
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
        self.polls.end_all()

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
            auth = await self._api().authenticate_token(token)
        except TooManyFailures as exc:
            return _too_many_failures(exc.retry_after_s)
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
        if kind == DOWNLINK_RPC:
            try:
                await self.rpc_ids.start()
            except RpcError:
                return _unavailable()
        poll = self.polls.open(device, kind)
        try:
            downlink = await self.polls.run(poll, lambda future: self._wait(future, timeout, request))
        except RpcError:
            return _unavailable()
        if downlink is None:
            return _status(408)
        if downlink.kind == DOWNLINK_REVOKED:
            return _status(401)  # the token this poll was opened with was revoked or replaced meanwhile
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
