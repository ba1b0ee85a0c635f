"""Who calls the admin API, and what each role may do: the one place of the operators' access policy.

Every ``/api`` call carries ``Authorization: Bearer <token>``:

- an operator's personal API token (``POST /api/operators/{id}/tokens`` or ``/api/operators/me/tokens``;
  shown once, only its SHA-256 kept, revocable): the call acts as that operator, with their role;
- the shared ``ADMIN_API_TOKEN``: acts as ``bootstrap-token`` with the admin role, to create the first admin
  account and for scripts that predate accounts. With ``ADMIN_API_TOKEN_BOOTSTRAP_ONLY=true`` it is refused
  as soon as an enabled admin account exists (what production should set once it has one).

A browser logged in to the operator console (``/console/``, :mod:`admin_api.console`) may instead carry its
session cookie (:data:`SESSION_COOKIE`, no ``Authorization`` header): the call acts as the session's operator,
under the same roles and audit; a state-changing call (not GET/HEAD/OPTIONS) must also carry the session's
CSRF token in ``X-CSRF-Token`` (double submit), else 403. An ``Authorization`` header, when present, always
decides (the cookie is then ignored).

Roles (:func:`required_role`): **viewer** reads devices, profiles (their provision secret hidden), events
and imports; **operator** also changes devices, their credentials, attributes and RPC, and imports;
**admin** also changes profiles, manages operators and reads the audit log. No token or an unknown, revoked
or disabled one: 401; a role without the right: 403.
"""

from __future__ import annotations

import contextvars
import enum
import hashlib
import hmac
import uuid
from dataclasses import dataclass

from fastapi import HTTPException, Request
from provisioning_common.db import repository

#: The actor name of calls made with the shared ADMIN_API_TOKEN (audit log).
BOOTSTRAP_ACTOR = "bootstrap-token"


class Role(str, enum.Enum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    def allows(self, needed: Role) -> bool:
        return _RANK[self] >= _RANK[needed]


_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


@dataclass(frozen=True)
class Principal:
    """The caller of one request."""

    actor: str
    role: Role
    operator_id: uuid.UUID | None = None


#: The caller of the request being handled (set by :func:`authenticate`; read by serializers that hide
#: what a role may not see, and by the audit log).
CURRENT: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("admin_principal", default=None)


def required_role(method: str, path: str) -> Role:
    """The role a call needs: the whole policy, by method and path (under ``/api``)."""
    if path.startswith("/api/operators/me"):
        return Role.VIEWER  # one's own tokens
    if path.startswith(("/api/operators", "/api/audit")):
        return Role.ADMIN
    if method in ("GET", "HEAD", "OPTIONS"):
        return Role.VIEWER
    if path.startswith("/api/device-profiles"):
        return Role.ADMIN
    return Role.OPERATOR


def may_see_secrets() -> bool:
    """Whether the caller may read provision secrets (viewers may not)."""
    principal = CURRENT.get()
    return principal is not None and principal.role.allows(Role.OPERATOR)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


#: The console's session cookie: 256 random bits (URL-safe base64), only their SHA-256 stored (migration 0014).
SESSION_COOKIE = "console_session"
#: The header a console page sends its session's CSRF token in, on every state-changing call.
CSRF_HEADER = "x-csrf-token"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


async def session_principal(request: Request) -> tuple[Principal, str] | None:
    """The operator of the request's live console session and the session's CSRF token, or None."""
    session_id = request.cookies.get(SESSION_COOKIE, "")
    if not session_id or len(session_id) > 128:
        return None
    settings = request.app.state.admin.settings
    found = await repository.use_console_session(request.app.state.pool, token_hash(session_id),
                                                 settings.console_session_idle_s)
    if found is None:
        return None
    operator, csrf = found
    return Principal(operator.username, Role(operator.role), operator.id), csrf


def _unauthorized() -> HTTPException:
    return HTTPException(status_code=401, detail="Missing or invalid bearer token",
                         headers={"WWW-Authenticate": "Bearer"})


async def authenticate(request: Request) -> Principal:
    """Every ``/api`` route's dependency: who calls (401 when nobody valid) and whether their role may (403)."""
    header = request.headers.get("authorization", "")
    if not header and SESSION_COOKIE in request.cookies:
        return await _by_session(request)
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token or len(token) > 512:
        raise _unauthorized()
    admin = request.app.state.admin
    pool = request.app.state.pool
    principal: Principal | None = None
    if hmac.compare_digest(f"Bearer {token}".encode(), admin.expected_authorization):
        if admin.settings.admin_api_token_bootstrap_only and await repository.admin_exists(pool):
            raise HTTPException(status_code=401, detail="ADMIN_API_TOKEN only bootstraps the first admin account;"
                                                        " use an operator's API token",
                                headers={"WWW-Authenticate": "Bearer"})
        principal = Principal(BOOTSTRAP_ACTOR, Role.ADMIN)
    else:
        operator = await repository.operator_by_token(pool, token_hash(token))
        if operator is not None:
            principal = Principal(operator.username, Role(operator.role), operator.id)
    if principal is None:
        raise _unauthorized()
    request.state.principal = principal
    CURRENT.set(principal)
    needed = required_role(request.method, request.url.path)
    if not principal.role.allows(needed):
        raise HTTPException(status_code=403, detail=f"the {principal.role.value} role may not do this"
                                                    f" (needs {needed.value})")
    return principal


async def _by_session(request: Request) -> Principal:
    """:func:`authenticate` for a console page's call (its session cookie, and its CSRF token when it changes)."""
    found = await session_principal(request)
    if found is None:
        raise HTTPException(status_code=401, detail="Not logged in, or the console session has expired")
    principal, csrf = found
    request.state.principal = principal
    CURRENT.set(principal)
    if request.method not in _SAFE_METHODS and not hmac.compare_digest(
        request.headers.get(CSRF_HEADER, "").encode(), csrf.encode()
    ):
        raise HTTPException(status_code=403, detail="Missing or wrong CSRF token (X-CSRF-Token)")
    needed = required_role(request.method, request.url.path)
    if not principal.role.allows(needed):
        raise HTTPException(status_code=403, detail=f"the {principal.role.value} role may not do this"
                                                    f" (needs {needed.value})")
    return principal
