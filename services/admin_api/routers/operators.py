"""``/api/operators``: operator accounts and their API tokens; ``/api/audit``: the admin audit log (issue 17).

Admins manage accounts (``POST/GET /api/operators``, ``PUT/DELETE /api/operators/{id}``) and anyone's tokens
(``/api/operators/{id}/tokens``); every operator manages their own (``/api/operators/me/tokens``). A token is
256 random bits, shown once at creation; only its SHA-256 is stored. Passwords (for the console's log-in) are
scrypt-hashed (provisioning_common.passwords) off the event loop. Who may call what: ``auth.required_role``.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from provisioning_common import passwords
from provisioning_common.db import repository
from provisioning_common.db.repository import Operator
from pydantic import Field

from ..auth import Principal, Role, token_hash
from ..dependencies import Pool, api_error
from ..schemas import MAX_PAGE, MAX_PAGE_SIZE, NO_CONTROLS, Page, _Body

router = APIRouter()

#: Shortest operator password accepted.
MIN_PASSWORD = 12


class OperatorIn(_Body):
    username: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@-]+$")
    password: str | None = Field(default=None, min_length=MIN_PASSWORD, max_length=256, pattern=NO_CONTROLS)
    role: Role


class OperatorUpdate(_Body):
    password: str | None = Field(default=None, min_length=MIN_PASSWORD, max_length=256, pattern=NO_CONTROLS)
    role: Role | None = None
    disabled: bool | None = None


class TokenIn(_Body):
    name: str = Field(min_length=1, max_length=100, pattern=NO_CONTROLS)


def _principal(request: Request) -> Principal:
    principal: Principal = request.state.principal
    return principal


Caller = Annotated[Principal, Depends(_principal)]


def operator_json(operator: Operator) -> dict[str, Any]:
    return {"id": str(operator.id), "username": operator.username, "role": operator.role,
            "disabled": operator.disabled, "createdTime": int(operator.created_at.timestamp() * 1000)}


def _token_json(row: dict[str, Any]) -> dict[str, Any]:
    def ms(value: Any) -> int | None:
        return None if value is None else int(value.timestamp() * 1000)

    return {"id": str(row["id"]), "name": row["name"], "createdTime": ms(row["created_at"]),
            "lastUsedTime": ms(row["last_used_at"]), "revokedTime": ms(row["revoked_at"])}


async def _hash(password: str | None) -> str | None:
    return None if password is None else await asyncio.to_thread(passwords.hash_password, password)


@router.post("/operators", status_code=201)
async def create_operator(body: OperatorIn, pool: Pool) -> dict[str, Any]:
    try:
        operator = await repository.create_operator(pool, username=body.username, role=body.role.value,
                                                    password_hash=await _hash(body.password))
    except repository.OperatorConflict:
        raise api_error(409, f"Operator {body.username!r} already exists") from None
    return operator_json(operator)


@router.get("/operators")
async def list_operators(pool: Pool) -> list[dict[str, Any]]:
    return [operator_json(o) for o in await repository.list_operators(pool)]


async def _existing(pool: Any, operator_id: uuid.UUID) -> Operator:
    operator = await repository.get_operator(pool, operator_id)
    if operator is None:
        raise api_error(404, f"Operator {operator_id} not found")
    return operator


@router.put("/operators/{operator_id}")
async def update_operator(operator_id: uuid.UUID, body: OperatorUpdate, pool: Pool, caller: Caller) -> dict[str, Any]:
    if operator_id == caller.operator_id and (body.disabled or (body.role and body.role is not Role.ADMIN)):
        raise api_error(409, "An admin cannot disable or demote themselves (ask another admin)")
    operator = await repository.update_operator(pool, operator_id, role=body.role.value if body.role else None,
                                                disabled=body.disabled, password_hash=await _hash(body.password))
    if operator is None:
        raise api_error(404, f"Operator {operator_id} not found")
    return operator_json(operator)


@router.delete("/operators/{operator_id}", status_code=204)
async def delete_operator(operator_id: uuid.UUID, pool: Pool, caller: Caller) -> Response:
    if operator_id == caller.operator_id:
        raise api_error(409, "An admin cannot delete themselves (ask another admin)")
    if not await repository.delete_operator(pool, operator_id):
        raise api_error(404, f"Operator {operator_id} not found")
    return Response(status_code=204)


async def _owner(pool: Any, who: str, caller: Principal) -> uuid.UUID:
    """The operator whose tokens a ``/operators/{who}/tokens`` call means (``me``: the caller's own)."""
    if who == "me":
        if caller.operator_id is None:
            raise api_error(400, "The shared ADMIN_API_TOKEN has no tokens of its own; create an operator")
        return caller.operator_id
    try:
        operator_id = uuid.UUID(who)
    except ValueError:
        raise api_error(404, f"Operator {who} not found") from None
    return (await _existing(pool, operator_id)).id


@router.post("/operators/{who}/tokens", status_code=201)
async def create_token(who: str, body: TokenIn, pool: Pool, caller: Caller) -> dict[str, Any]:
    """A new API token, shown once (``token``)."""
    owner = await _owner(pool, who, caller)
    token = secrets.token_urlsafe(32)
    row = await repository.create_operator_token(pool, operator_id=owner, name=body.name, token_hash=token_hash(token))
    return {**_token_json(row), "token": token}


@router.get("/operators/{who}/tokens")
async def list_tokens(who: str, pool: Pool, caller: Caller) -> list[dict[str, Any]]:
    return [_token_json(row) for row in await repository.list_operator_tokens(pool, await _owner(pool, who, caller))]


@router.delete("/operators/{who}/tokens/{token_id}", status_code=204)
async def revoke_token(who: str, token_id: uuid.UUID, pool: Pool, caller: Caller) -> Response:
    if not await repository.revoke_operator_token(pool, await _owner(pool, who, caller), token_id):
        raise api_error(404, f"Token {token_id} not found")
    return Response(status_code=204)


@router.get("/audit")
async def audit_log(
    pool: Pool,
    actor: str | None = Query(None, max_length=64, pattern=NO_CONTROLS),
    objectId: str | None = Query(None, max_length=64, pattern=NO_CONTROLS),
    page: int = Query(0, ge=0, le=MAX_PAGE),
    pageSize: int = Query(100, ge=1, le=MAX_PAGE_SIZE),
) -> Page:
    """Audit entries, newest first: ``time`` (ms), ``actor``, ``method``, ``path``, ``status``, ``objectId``,
    ``changes``."""
    rows, total = await repository.list_admin_audit(pool, actor=actor, object_id=objectId, limit=pageSize,
                                                    offset=page * pageSize)
    data = [{"time": int(r["time"].timestamp() * 1000), "actor": r["actor"],
             "operatorId": None if r["operator_id"] is None else str(r["operator_id"]), "method": r["method"],
             "path": r["path"], "status": r["status"], "objectId": r["object_id"], "changes": r["changes"]}
            for r in rows]
    return Page(data=data, totalElements=total, hasNext=(page + 1) * pageSize < total)
