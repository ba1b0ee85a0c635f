"""HTTP routes in the shapes EMQX and RabbitMQ send; every credentials question goes over the bus.

* EMQX 5 HTTP authenticator: ``POST /emqx/auth`` with the JSON body template
  ``{"clientid": "${clientid}", "username": "${username}", "password": "${password}"}``
  (a form-encoded body with the same fields works too) -> ``200 {"result": "allow"|"deny"|"ignore",
  "is_superuser": false}``; provisioning clients also get an ``acl`` (EMQX 5.8+) holding them to
  their own topics.
* RabbitMQ ``rabbitmq_auth_backend_http``: ``/auth/user``, ``/auth/vhost``, ``/auth/resource``,
  ``/auth/topic``, GET (query string) or POST (form body) -> ``200`` with ``allow`` or ``deny``.

When the credentials service does not answer: 503 (EMQX treats it as ``ignore`` and goes on with its
chain; RabbitMQ refuses the login). The access log stays off: GET requests carry passwords.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request, Response
from provisioning_common import device_auth, health
from provisioning_common.bus import Bus
from provisioning_common.device_auth import Presented
from provisioning_common.settings import Settings
from provisioning_common.transport_api import BusSession

from . import decisions
from .decisions import Verdict

log = logging.getLogger(__name__)

#: Brokers send a few short fields; anything bigger is not a broker talking.
MAX_BODY_BYTES = 16 * 1024
JSON = "application/json"
TEXT = "text/plain"


class _TooLarge(Exception):
    pass


async def _params(request: Request) -> dict[str, str]:
    """Query string, then a form or JSON body on top (brokers send one or the other)."""
    params = dict(request.query_params)
    if request.method == "POST":
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise _TooLarge
        if request.headers.get("content-type", "").startswith(JSON):
            try:
                obj = json.loads(body or b"{}")
            except ValueError:
                obj = None
            if not isinstance(obj, dict):
                raise ValueError("body is not a JSON object")
            params.update({str(k): "" if v is None else str(v) for k, v in obj.items()})
        else:
            params.update(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    return params


def _emqx(result: Verdict, **extra: object) -> Response:
    return Response(json.dumps({"result": result.value, "is_superuser": False, **extra}), media_type=JSON)


def _rabbit(verdict: Verdict) -> Response:
    return Response("allow" if verdict is Verdict.ALLOW else "deny", media_type=TEXT)


def create_app(settings: Settings, bus: Bus | None = None) -> FastAPI:
    """Build the app; connects to RabbitMQ on start-up unless a connected ``bus`` is given."""
    session = BusSession(settings, bus)

    app = FastAPI(title="Broker authentication",
                  lifespan=session.lifespan("broker_auth", f"on {settings.bind_host}:{settings.bridge_auth_port}"),
                  docs_url=None, redoc_url=None, openapi_url=None)

    async def login(client_id: str, username: str, password: str) -> device_auth.Decision | Response:
        """The device-authentication policy's decision (as the MQTT gateway's); 503 when the credentials
        service does not answer (EMQX then goes on with its chain; RabbitMQ refuses the login)."""
        decision = await device_auth.decide(Presented(client_id, username, password), session.api.authenticate)
        if decision.verdict is device_auth.Verdict.UNAVAILABLE:
            log.warning("credentials service unavailable: %s", decision.detail)
            return Response(status_code=503, headers={"Retry-After": "1"})
        return decision

    async def read(request: Request) -> Mapping[str, str] | Response:
        try:
            return await _params(request)
        except _TooLarge:
            return Response(status_code=413)
        except ValueError:
            return Response(status_code=400)

    # --- EMQX ------------------------------------------------------------------------------

    @app.post("/emqx/auth")
    async def emqx_auth(request: Request) -> Response:
        params = await read(request)
        if isinstance(params, Response):
            return params
        client_id, username = params.get("clientid", ""), params.get("username", "")
        password = params.get("password", "")
        decision = await login(client_id, username, password)
        if isinstance(decision, Response):
            return decision
        if decision.verdict is device_auth.Verdict.PROVISIONING:
            if not decisions.provisioning_client_ok(client_id):
                return _emqx(Verdict.DENY)
            return _emqx(Verdict.ALLOW, acl=decisions.provisioning_acl(client_id))
        return _emqx(decisions.emqx_login(decision))

    # --- RabbitMQ --------------------------------------------------------------------------

    @app.api_route("/auth/user", methods=["GET", "POST"])
    async def rabbit_user(request: Request) -> Response:
        params = await read(request)
        if isinstance(params, Response):
            return params
        username, password = params.get("username", ""), params.get("password", "")
        client_id = params.get("client_id", "")
        decision = await login(client_id, username, password)
        if isinstance(decision, Response):
            return decision
        if decision.verdict is device_auth.Verdict.PROVISIONING:
            # RabbitMQ sends the MQTT client id (3.13+); without one, topic checks refuse everything.
            ok = not client_id or decisions.provisioning_client_ok(client_id)
            return _rabbit(Verdict.ALLOW if ok else Verdict.DENY)
        return _rabbit(decisions.rabbitmq_login(decision))

    @app.api_route("/auth/vhost", methods=["GET", "POST"])
    async def rabbit_vhost(request: Request) -> Response:
        # Asked only for users this backend has just authenticated; vhosts themselves are the operator's.
        params = await read(request)
        return params if isinstance(params, Response) else _rabbit(Verdict.ALLOW)

    @app.api_route("/auth/resource", methods=["GET", "POST"])
    async def rabbit_resource(request: Request) -> Response:
        params = await read(request)
        if isinstance(params, Response):
            return params
        return _rabbit(decisions.rabbitmq_resource(
            params.get("resource", ""), params.get("name", ""), params.get("permission", ""),
            params.get("client_id") or params.get("variable_map.client_id"),
        ))

    @app.api_route("/auth/topic", methods=["GET", "POST"])
    async def rabbit_topic(request: Request) -> Response:
        params = await read(request)
        if isinstance(params, Response):
            return params
        return _rabbit(decisions.rabbitmq_topic(
            params.get("username", ""), params.get("permission", ""), params.get("routing_key", ""),
            params.get("variable_map.client_id") or params.get("client_id"),
        ))

    # Readiness: the bus is connected (every login asks the credentials service); liveness: the event loop answers.
    health.mount(app, health.bus_check(session))

    return app
