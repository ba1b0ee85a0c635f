"""The HTTP gateway's routes. Stateless: every request goes to the bus through ``TransportApi``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request, Response

from provisioning_common.bus import Bus, RpcError
from provisioning_common.dialects import render_error
from provisioning_common.models import AuthenticateRequest, Dialect, Transport
from provisioning_common.settings import Settings
from provisioning_common.transport_api import OutcomeKind, TransportApi, is_json_document

log = logging.getLogger(__name__)

JSON = "application/json"
_STATUS = {OutcomeKind.ANSWERED: 200, OutcomeKind.BAD_REQUEST: 400, OutcomeKind.UNAVAILABLE: 503}


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes without reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(settings: Settings, bus: Bus | None = None) -> FastAPI:
    """Build the app; connects to RabbitMQ on start-up unless a connected ``bus`` is given."""
    state: dict[str, object] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        own_bus = bus or await Bus.connect(settings)
        state["bus"] = own_bus
        state["api"] = TransportApi(own_bus, settings)
        log.info("http_gateway ready")
        yield
        if bus is None:
            await own_bus.close()

    app = FastAPI(title="Provisioning HTTP gateway", lifespan=lifespan, docs_url=None, redoc_url=None)

    def api() -> TransportApi:
        return state["api"]  # type: ignore[return-value]

    too_large = render_error(Dialect.THINGSBOARD, f"Request body exceeds {settings.max_body_bytes} bytes")

    async def provision(request: Request) -> Response:
        try:
            body = await read_body(request, settings.max_body_bytes)
        except BodyTooLarge:
            return Response(too_large, status_code=413, media_type=JSON)
        source = request.client.host if request.client else ""
        outcome = await api().provision(body, transport=Transport.HTTP, source_address=source)
        headers = {"Retry-After": "1"} if outcome.kind is OutcomeKind.UNAVAILABLE else None
        return Response(outcome.body, status_code=_STATUS[outcome.kind], media_type=JSON, headers=headers)

    # ThingsBoard's path, and Innoway's; both serve both dialects (chosen by the body).
    app.add_api_route("/api/v1/provision", provision, methods=["POST"], include_in_schema=True)
    app.add_api_route("/api/provision", provision, methods=["POST"], include_in_schema=True)

    @app.post("/api/v1/{token}/telemetry")
    async def telemetry(token: str, request: Request) -> Response:
        """Device telemetry (ThingsBoard's HTTP device API); accepts JSON without a Content-Type."""
        try:
            body = await read_body(request, settings.max_body_bytes)
        except BodyTooLarge:
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

    @app.get("/health")
    async def health() -> Response:
        bus_ = state.get("bus")
        ok = isinstance(bus_, Bus) and bus_.is_connected
        return Response(b'{"status":"UP"}' if ok else b'{"status":"DOWN"}', status_code=200 if ok else 503,
                        media_type=JSON)

    return app
