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

Only the broker may ask (issue 14): with ``BROKER_AUTH_SECRET`` set, every route but the probes wants
``Authorization: Bearer <secret>`` (EMQX's ``headers``), HTTP Basic with the secret as the password, or
the secret as the path's first segment (``/<secret>/auth/user``: RabbitMQ's HTTP backend sends no header
of ours, and its httpc does not turn a URL's user info into Basic); anything else gets 401, is counted
and logged (the caller's address, never what it sent).
Logins that name no device count against the client's address (EMQX's ``peerhost``; else its client
id) like the gateways' (``AUTH_FAILURES_PER_MINUTE``): over the budget, denied without a look-up.
"""

from __future__ import annotations

import base64
import binascii
import hmac
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
from starlette.types import ASGIApp, Receive, Scope, Send

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


def presented_secret(authorization: str) -> bytes | None:
    """The secret in an ``Authorization`` header: Bearer, or Basic's password (any user name)."""
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value.encode()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
        return decoded.partition(b":")[2]
    return None


def login_source(params: Mapping[str, str]) -> str:
    """What the wrong-credentials budget counts a login against: the device's address when the broker
    sends it (EMQX ``peerhost``, RabbitMQ ``ip``), else its client id (namespaced apart from addresses)."""
    address = params.get("peerhost") or params.get("ip") or ""
    if address:
        return address
    client_id = params.get("clientid") or params.get("client_id") or ""
    return f"client:{client_id[:256]}" if client_id else "client:"


_PROBES = frozenset({health.HEALTH_PATH, health.LIVE_PATH})
_ROUTES = ("/emqx/", "/auth/")


class BrokerOnly:
    """ASGI middleware: with a secret, only requests that carry it reach the routes (the probes always do).

    The secret is accepted in ``Authorization`` (Bearer, or Basic's password) or as the first path segment,
    which is then removed (``/<secret>/auth/user`` is ``/auth/user``). Refusals are 401, counted in
    :attr:`refused` and logged at the 1st, 2nd, 4th, 8th... with the caller's address (no flood, no secret).
    """

    def __init__(self, app: ASGIApp, secret: bytes) -> None:
        self.app = app
        self.secret = secret
        self.refused = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.secret or scope["path"] in _PROBES:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
        presented = presented_secret(authorization)
        if presented is not None and hmac.compare_digest(presented, self.secret):
            await self.app(scope, receive, send)
            return
        first, _, rest = path[1:].partition("/")
        if hmac.compare_digest(first.encode(), self.secret) and rest:
            await self.app({**scope, "path": "/" + rest, "raw_path": ("/" + rest).encode()}, receive, send)
            return
        self.refused += 1
        if self.refused & (self.refused - 1) == 0:
            peer = scope["client"][0] if scope.get("client") else "?"
            shown = path if path.startswith(_ROUTES) else "another path"  # a path may hold a mistyped secret
            log.warning("refused a request to %s from %s without the broker's secret (%d so far)",
                        shown[:100], peer, self.refused)
        response = Response(status_code=401, headers={"WWW-Authenticate": 'Bearer realm="broker_auth"'})
        await response(scope, receive, send)


def create_app(settings: Settings, bus: Bus | None = None) -> FastAPI:
    """Build the app; connects to RabbitMQ on start-up unless a connected ``bus`` is given."""
    session = BusSession(settings, bus)
    secret = settings.broker_auth_secret.get_secret_value().encode() if settings.broker_auth_secret else b""
    if not secret:
        log.warning("BROKER_AUTH_SECRET is unset: anyone who reaches port %d can ask who is a device; set it and "
                    "give it to the broker (README: broker_auth), or bind to an address only the broker reaches",
                    settings.bridge_auth_port)
    #: Logins that name no device, per client address (AUTH_FAILURES_PER_MINUTE), as the gateways count them.
    failures = device_auth.AuthFailures(settings.auth_failures_per_minute, "broker_auth")

    app = FastAPI(title="Broker authentication",
                  lifespan=session.lifespan("broker_auth", f"on {settings.bind_host}:{settings.bridge_auth_port}"),
                  docs_url=None, redoc_url=None, openapi_url=None)

    async def login(client_id: str, username: str, password: str, source: str) -> device_auth.Decision | Response:
        """The device-authentication policy's decision (as the MQTT gateway's); 503 when the credentials
        service does not answer (EMQX then goes on with its chain; RabbitMQ refuses the login). A source
        over its wrong-credentials budget is LIMITED (denied) without asking."""
        decision = await device_auth.decide(Presented(client_id, username or None, password or None),
                                            session.api.authenticate, failures=failures, source=source)
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
        reserved = decisions.bridge_identity(username, client_id, settings.mqtt_bridge_client_id)
        if reserved is not None:
            return _emqx(reserved)
        decision = await login(client_id, username, password, login_source(params))
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
        if decisions.bridge_identity(username, client_id, settings.mqtt_bridge_client_id) is not None:
            return _rabbit(Verdict.DENY)  # the bridge's account is RabbitMQ's internal one, never ours
        decision = await login(client_id, username, password, login_source(params))
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

    app.state.auth_failures = failures
    app.add_middleware(BrokerOnly, secret=secret)

    # Readiness: the bus is connected (every login asks the credentials service); liveness: the event loop answers.
    health.mount(app, health.bus_check(session))

    return app
