"""The operator console (``/console/``; README "Web console"): plain HTML, CSS and JavaScript files shipped with
the admin API (no build step, nothing fetched from elsewhere), and the log-in that gives them a session.

The pages call the same ``/api`` routes as scripts do, authenticated by the session cookie instead of a bearer
token (``auth.authenticate``), so the one role policy and the audit log apply unchanged. Log-in:

- ``POST /console/login`` ``{"username", "password"}``: the password is checked with scrypt off the event loop
  (``passwords.verify_or_burn``: the same work for unknown users); one generic message for every wrong
  log-in. Failures are limited per source address (IPv6: per /64) and per user name, with token buckets
  shared by every admin API process through Postgres (``rate_limit_buckets``, the provisioning limits'
  :class:`~provisioning_common.rate_limit.PostgresStore`): ``CONSOLE_LOGIN_FAILURES_PER_MINUTE`` at once,
  refilled at that rate; beyond it 429 with ``Retry-After`` and "Too many login attempts, try again in N s".
  Each attempt takes its token *before* the password is checked (so concurrent guesses, on one replica or
  many, cannot all pass a check first) and a right password gives it back: only failures count.
  A success sets the cookie ``console_session`` (256 random bits; only their
  SHA-256 stored, migration 0014) ``HttpOnly; SameSite=Strict; Path=/``, and ``Secure`` unless the request is
  plain http to a loopback address (``make up``), and answers the session's CSRF token.
- ``GET /console/session``: who is logged in, their role and the CSRF token (401 when nobody).
- ``GET /console/session/left``: seconds until the session ends, without restarting its idle clock (401 when
  it has ended): the live activity page's watch.
- ``GET /console/import-fields``: the import API's fields and header aliases, for the bulk import page's
  column mapper.
- ``POST /console/logout`` (with ``X-CSRF-Token``): deletes the session and the cookie.

Sessions end after ``CONSOLE_SESSION_IDLE_S`` without a request and ``CONSOLE_SESSION_MAX_S`` after log-in.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import math
import secrets
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request, Response
from fastapi.responses import FileResponse, RedirectResponse
from provisioning_common import passwords
from provisioning_common.db import repository
from provisioning_common.rate_limit import Bucket, PostgresStore, address_key
from pydantic import BaseModel, ConfigDict, Field
from starlette.staticfiles import StaticFiles

from ..auth import CSRF_HEADER, SESSION_COOKIE, session_principal, token_hash
from ..routers import imports

STATIC = Path(__file__).parent / "static"

#: Pages only load what they ship (no inline script, nothing from elsewhere) and are never framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_WRONG = "Wrong user name or password"

router = APIRouter(prefix="/console", include_in_schema=False)


class LoginIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=256)


def _page(name: str) -> FileResponse:
    return FileResponse(STATIC / name, media_type="text/html", headers=SECURITY_HEADERS)


def _loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def cookie_secure(request: Request) -> bool:
    """``Secure`` unless the browser asked over plain http for a loopback address (``http://127.0.0.1:8081``,
    ``localhost``: ``make up``, or compose's port published on the host): there the page never crosses a
    network, and a browser keeps no Secure cookie from plain http. Anything else (a LAN address, a name)
    gets ``Secure``, so the console must then be reached over https (a TLS-terminating proxy)."""
    return not (request.url.scheme == "http" and _loopback(request.url.hostname))


#: The period of the log-in limit, whose setting counts per minute.
LOGIN_PERIOD_S = 60.0


def _login_store(request: Request) -> PostgresStore:
    """This process's handle on the shared buckets (one per app: it batches concurrent log-ins)."""
    store: PostgresStore | None = getattr(request.app.state, "console_login_store", None)
    if store is None:
        store = PostgresStore(request.app.state.pool)
        request.app.state.console_login_store = store
    return store


def login_buckets(request: Request, username: str) -> list[Bucket]:
    """The log-in attempt buckets of this request: its source address and the user name it tries."""
    per_minute = request.app.state.admin.settings.console_login_failures_per_minute
    source = address_key(request.client.host) if request.client else ""
    names = [f"console-login:user:{username.lower()}"] + ([f"console-login:source:{source}"] if source else [])
    return [Bucket(name, per_minute, LOGIN_PERIOD_S) for name in names]


@router.get("")
async def console_root() -> RedirectResponse:
    return RedirectResponse("/console/", status_code=307)


@router.get("/")
async def console_page() -> FileResponse:
    return _page("index.html")


@router.get("/login")
async def login_page() -> FileResponse:
    return _page("login.html")


@router.post("/login")
async def login(body: LoginIn, request: Request, response: Response) -> dict[str, Any]:
    buckets = login_buckets(request, body.username)
    refused, retry_after = await _login_store(request).admit([], buckets)
    if refused:
        seconds = max(1, math.ceil(retry_after))
        raise HTTPException(429, f"Too many login attempts, try again in {seconds} s",
                            headers={"Retry-After": str(seconds)})
    pool = request.app.state.pool
    found = await repository.operator_for_login(pool, body.username)
    stored = found[1] if found else None
    if not await asyncio.to_thread(passwords.verify_or_burn, body.password, stored) or found is None:
        raise HTTPException(401, _WRONG)
    await repository.rate_limit_give_back(pool, {b.name: b.emission_s for b in buckets})
    operator = found[0]
    settings = request.app.state.admin.settings
    session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    await repository.create_console_session(pool, id_hash=token_hash(session_id), operator_id=operator.id,
                                            csrf_token=csrf, idle_s=settings.console_session_idle_s,
                                            max_s=settings.console_session_max_s)
    await repository.record_admin_audit(pool, actor=operator.username, operator_id=operator.id, method="POST",
                                        path="/console/login", status=200, object_id=str(operator.id), changes=None)
    response.set_cookie(SESSION_COOKIE, session_id, max_age=settings.console_session_max_s, path="/",
                        httponly=True, samesite="strict", secure=cookie_secure(request))
    response.headers["Cache-Control"] = "no-store"
    return {"username": operator.username, "role": operator.role, "csrfToken": csrf}


@router.get("/session")
async def session(request: Request, response: Response) -> dict[str, Any]:
    found = await session_principal(request)
    if found is None:
        raise HTTPException(401, "Not logged in, or the console session has expired")
    principal, csrf = found
    response.headers["Cache-Control"] = "no-store"
    return {"username": principal.actor, "role": principal.role.value, "csrfToken": csrf}


@router.get("/session/left")
async def session_left(request: Request, response: Response) -> dict[str, float]:
    """Seconds until this session ends (``secondsLeft``), or 401 when it has: asked by the live activity page,
    whose open stream is not a request, to say "Session expired" when it happens. It does not count as a
    request itself (the idle clock is not restarted), or a watching screen would never expire."""
    session_id = request.cookies.get(SESSION_COOKIE, "")
    left = None
    if session_id and len(session_id) <= 128:
        left = await repository.console_session_left(request.app.state.pool, token_hash(session_id),
                                                     request.app.state.admin.settings.console_session_idle_s)
    if left is None:
        raise HTTPException(401, "Not logged in, or the console session has expired")
    response.headers["Cache-Control"] = "no-store"
    return {"secondsLeft": round(left, 3)}


@router.get("/import-fields")
async def import_fields(request: Request, response: Response) -> dict[str, Any]:
    """What the bulk import page's column mapper offers, from the import API's own tables (one source of
    truth): the fields a column may be mapped to, the accepted-but-not-stored ones, and the header names the
    API maps by itself (``imports.ALIASES``, keys normalised as ``imports._normal`` does)."""
    if await session_principal(request) is None:
        raise HTTPException(401, "Not logged in, or the console session has expired")
    response.headers["Cache-Control"] = "no-store"
    return {"fields": list(imports.FIELDS), "ignored": list(imports.IGNORED_FIELDS), "aliases": imports.ALIASES}


@router.post("/logout", status_code=204)
async def logout(request: Request) -> Response:
    found = await session_principal(request)
    if found is not None:
        principal, csrf = found
        if not hmac.compare_digest(request.headers.get(CSRF_HEADER, "").encode(), csrf.encode()):
            raise HTTPException(403, "Missing or wrong CSRF token (X-CSRF-Token)")
        await repository.delete_console_session(request.app.state.pool,
                                                token_hash(request.cookies.get(SESSION_COOKIE, "")))
        await repository.record_admin_audit(request.app.state.pool, actor=principal.actor,
                                            operator_id=principal.operator_id, method="POST", path="/console/logout",
                                            status=204, object_id=None, changes=None)
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=cookie_secure(request))
    return response


def mount(app: FastAPI) -> None:
    """The console's routes and its static files (``/console/static/``)."""
    app.include_router(router)
    app.mount("/console/static", StaticFiles(directory=STATIC), name="console-static")
