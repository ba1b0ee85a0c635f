"""The HTTP gateway's routes. Stateless: every request goes to the bus through ``TransportApi``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request, Response
from provisioning_common import health
from provisioning_common.bus import Bus, RpcError
from provisioning_common.dialects import render_error
from provisioning_common.models import AuthenticateRequest, Dialect, Transport
from provisioning_common.settings import Settings
from provisioning_common.transport_api import BusSession, OutcomeKind, TransportApi, is_json_document

log = logging.getLogger(__name__)

JSON = "application/json"
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
        outcome = await self._api().provision(body, transport=Transport.HTTP, source_address=source)
        extra = [(b"retry-after", b"1")] if outcome.kind is OutcomeKind.UNAVAILABLE else []
        await _respond(send, _STATUS[outcome.kind], outcome.body, extra)


async def read_body(scope: Mapping[str, Any], receive: Callable[..., Any], limit: int) -> bytes | None:
    """The whole body, or None as soon as it is known to exceed ``limit`` bytes."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            return None
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunk: bytes = message.get("body", b"")
        body += chunk
        if len(body) > limit:
            return None
        if not message.get("more_body"):
            return body


async def _respond(send: Callable[..., Any], status: int, body: bytes,
                   extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body})


def create_app(settings: Settings, bus: Bus | None = None) -> ProvisionFastPath:
    """Build the app; connects to RabbitMQ on start-up unless a connected ``bus`` is given."""
    session = BusSession(settings, bus)
    app = FastAPI(title="Provisioning HTTP gateway", lifespan=session.lifespan("http_gateway"), docs_url=None,
                  redoc_url=None)

    def api() -> TransportApi:
        return session.api

    too_large = render_error(Dialect.THINGSBOARD, f"Request body exceeds {settings.max_body_bytes} bytes")

    @app.post("/api/v1/{token}/telemetry")
    async def telemetry(token: str, request: Request) -> Response:
        """Device telemetry (ThingsBoard's HTTP device API); accepts JSON without a Content-Type."""
        body = await read_body(request.scope, request.receive, settings.max_body_bytes)
        if body is None:
            return Response(too_large, status_code=413, media_type=JSON)
        if not is_json_document(body):
            return Response(render_error(Dialect.THINGSBOARD, "Telemetry must be a JSON object or array"),
                            status_code=400, media_type=JSON)
        try:
            auth = await api().authenticate(AuthenticateRequest(token=token))
            if not auth.authenticated or auth.device_id is None:
                return Response(status_code=401)
            await api().publish_telemetry(auth.device_id, body)
        except RpcError:
            return Response(status_code=503, headers={"Retry-After": "1"})
        return Response(status_code=200)

    # Readiness: the bus is connected; liveness: the event loop answers.
    health.mount(app, health.bus_check(session))

    return ProvisionFastPath(app, api, settings.max_body_bytes, too_large)
