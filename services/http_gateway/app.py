"""The HTTP gateway's app: provisioning (a plain-ASGI fast path) and ThingsBoard's device API (:mod:`.device_api`).

Stateless apart from open long polls: every request goes to the bus through ``TransportApi``."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from provisioning_common import health
from provisioning_common.bus import Bus
from provisioning_common.context import choose_request_id, reset_request_id, set_request_id
from provisioning_common.dialects import render_error
from provisioning_common.models import Dialect, Transport
from provisioning_common.settings import Settings
from provisioning_common.transport_api import BusSession, OutcomeKind, TransportApi

from .body import read_body
from .device_api import DeviceApi

log = logging.getLogger(__name__)

_STATUS = {OutcomeKind.ANSWERED: 200, OutcomeKind.BAD_REQUEST: 400, OutcomeKind.UNAVAILABLE: 503}


#: ThingsBoard's path and Innoway's; both serve both dialects (chosen by the body).
PROVISION_PATHS = frozenset({"/api/v1/provision", "/api/provision"})


class ProvisionFastPath:
    """Serves ``POST`` on the provisioning paths in plain ASGI; everything else goes to FastAPI.

    Provisioning is the hot path, and FastAPI's routing, dependency and Request/Response
    machinery cost more CPU per request than parsing and publishing the request itself.
    """

    def __init__(self, app: FastAPI, api: Callable[[], TransportApi], limit: int, too_large: bytes) -> None:
        self.app = app
        self._api = api
        self._limit = limit
        self._too_large = too_large

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http" or scope["path"] not in PROVISION_PATHS:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            await _respond(send, 405, b'{"errorMsg":"Method Not Allowed","status":"FAILURE"}', [(b"allow", b"POST")])
            return
        body = await read_body(scope, receive, self._limit)
        if body is None:
            await _respond(send, 413, self._too_large)
            return
        client = scope.get("client")
        source = client[0] if client else ""
        # The client's X-Request-Id when it is a valid one (context.valid_request_id), else a fresh id: in
        # every service's log lines of this request, and in the answer's X-Request-Id.
        # (context.request_scope, without the cost of a generator-based context manager.)
        asked = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                asked = value
                break
        request_id = choose_request_id(asked)
        token = set_request_id(request_id)
        try:
            outcome = await self._api().provision(body, transport=Transport.HTTP, source_address=source)
        finally:
            reset_request_id(token)
        status = _STATUS[outcome.kind]
        extra = [_RETRY_AFTER_1] if outcome.kind is OutcomeKind.UNAVAILABLE else []
        retry_after = outcome.result.retry_after_s if outcome.result is not None else None
        if retry_after is not None:  # a rate limit (README "Rate limits"): 429, retry after that many seconds
            status, extra = 429, [(b"retry-after", b"%d" % max(1, math.ceil(retry_after)))]
        extra.append((b"x-request-id", request_id.encode()))
        await _respond(send, status, outcome.body, extra)


_JSON_TYPE = (b"content-type", b"application/json")
_RETRY_AFTER_1 = (b"retry-after", b"1")


async def _respond(send: Callable[..., Any], status: int, body: bytes,
                   extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [_JSON_TYPE, (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body})


def create_app(settings: Settings, bus: Bus | None = None, *, exit_signals: bool = False) -> ProvisionFastPath:
    """Build the app; connects to RabbitMQ on start-up unless a connected ``bus`` is given.

    ``exit_signals``: answer open long polls at once on SIGTERM/SIGINT (``python -m http_gateway``)."""
    session = BusSession(settings, bus)

    def api() -> TransportApi:
        return session.api

    device_api = DeviceApi(settings, api)
    bus_lifespan = session.lifespan("http_gateway")

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with bus_lifespan(app):
            if exit_signals:
                device_api.stop_on_exit_signals()
            yield
            device_api.stop()

    # No API schema on a device-facing port (issue 13): no /openapi.json, /docs or /redoc.
    app = FastAPI(title="Provisioning HTTP gateway", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.include_router(device_api.router)
    app.state.device_api = device_api

    # Readiness: the bus is connected; liveness: the event loop answers.
    health.mount(app, health.bus_check(session))

    too_large = render_error(Dialect.THINGSBOARD, f"Request body exceeds {settings.max_body_bytes} bytes")
    return ProvisionFastPath(app, api, settings.max_body_bytes, too_large)
