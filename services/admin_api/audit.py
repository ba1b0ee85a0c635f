"""The admin audit log: one entry per state-changing ``/api`` call (POST, PUT, PATCH, DELETE) by a caller who
proved who they are, whatever its outcome (a 403 included): when, who (operator or ``bootstrap-token``), the
method and path, the status, the object (the id in the path, else the ``id`` the answer gave), and what the
call sent — every field name, with its value only for fields that are never secret (:data:`SHOWN`).

An ASGI middleware rather than a line in each route, so that no route (the ones added later included) can
change state unrecorded. It passes the body through untouched (bulk imports stream), keeping a copy of at most
:data:`MAX_KEPT` bytes of a JSON body; the entry is written once the answer is sent.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from provisioning_common.db import repository
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import Principal

log = logging.getLogger(__name__)

#: Request fields whose values the audit log shows; any other field is recorded as ``"<set>"``.
SHOWN = frozenset({
    "name", "provisionStrategy", "deviceProfileId", "deviceKey", "credentialsType", "gateway", "username", "role",
    "disabled", "method", "oneway", "timeout", "allowWeakTokens", "reprovisionPolicy", "certificateRegExPattern",
    "allowCreateNewDevicesByX509Certificate", "label",
})
#: The most of a JSON body (request or answer) kept to describe the call.
MAX_KEPT = 64 * 1024
CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def changes(body: bytes) -> dict[str, Any] | None:
    """What a JSON object body sent: its fields, values shown only where :data:`SHOWN` allows."""
    try:
        value = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    return {key: (item if key in SHOWN and (item is None or isinstance(item, (str, int, float, bool)))
                  else "<set>") for key, item in value.items()}


def object_id(path: str, answer: bytes) -> str | None:
    """The last id in the path, else the ``id`` of a JSON answer (a created object)."""
    ids = _UUID.findall(path)
    if ids:
        return str(ids[-1]).lower()
    try:
        value = json.loads(answer) if answer else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    found = value.get("id") if isinstance(value, dict) else None
    return str(found) if isinstance(found, (str, int)) else None


class AuditLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in CHANGING or not scope["path"].startswith("/api/"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        json_body = headers.get(b"content-type", b"").split(b";")[0].strip() == b"application/json"
        sent, answer = bytearray(), bytearray()
        status = 500

        async def tee() -> Message:
            message = await receive()
            if json_body and message["type"] == "http.request" and len(sent) < MAX_KEPT:
                sent.extend(message.get("body", b"")[: MAX_KEPT - len(sent)])
            return message

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and len(answer) < MAX_KEPT:
                answer.extend(message.get("body", b"")[: MAX_KEPT - len(answer)])
            await send(message)

        try:
            await self.app(scope, tee, watch)
        finally:
            principal = (scope.get("state") or {}).get("principal")
            if isinstance(principal, Principal):
                await self._record(scope, principal, status, bytes(sent), bytes(answer))

    async def _record(self, scope: Scope, principal: Principal, status: int, sent: bytes, answer: bytes) -> None:
        try:
            await repository.record_admin_audit(
                scope["app"].state.pool, actor=principal.actor, operator_id=principal.operator_id,
                method=scope["method"], path=scope["path"], status=status,
                object_id=object_id(scope["path"], answer if status < 300 else b""),
                changes=changes(sent),
            )
        except Exception as exc:  # the answer is sent; a lost entry is logged, never a failed call
            log.warning("admin audit entry not written (%s %s by %s): %s", scope["method"], scope["path"],
                        principal.actor, type(exc).__name__)
