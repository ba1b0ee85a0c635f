"""The pre-provisioning hook: a profile's own HTTPS endpoint decides about each request that passed the
provision key/secret check and the rate limits (README "Pre-provisioning hook").

The core POSTs JSON ``{"deviceName", "profileId", "profileName", "transport", "dialect", "sourceAddress",
"credentialsType", "requestId", "extra"}`` (``extra``: the JSON fields the device sent beyond its dialect's own,
as sent; null when they were over ``dialects.EXTRA_MAX_BYTES``) signed with the profile's hook secret: header
``X-Provision-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`` (the receiver recomputes it
and refuses old ``t``). The hook answers 200 with ``{"allow": true|false, "reason"?: "<why, for the event>",
"deviceName"?: "<name to create the device under>", "label"?: "<the device's label>", "attributes"?: {<server
attributes>}}``. Anything else — a time-out (the profile's ``timeoutMs``), another status, a body that is not
that — is *unavailable*: the request is refused (fail-closed, the default) or let through unchanged
(``failOpen``). The first decision for a request is stored (``hook_decisions``) and replayed for its repeats and
redeliveries, so the hook is never asked twice about one request and cannot answer it two ways; the label and
attributes it set are written with the device, in the device's own transaction (migration 0018).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from typing import Annotated, Any

import asyncpg
import httpx
from provisioning_common.db import repository
from provisioning_common.db.repository import HookDecision, ProfileRow
from provisioning_common.models import ProvisionRequest
from provisioning_common.secretbox import SecretBox
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Provision-Signature"
#: The event reasons of a refusal by the hook and of a hook that could not decide (README).
DENIED, UNAVAILABLE = "hook_denied", "hook_unavailable"
#: Longest answer body read from a hook.
MAX_ANSWER_BYTES = 16 * 1024
#: Most attributes one answer may set.
MAX_ATTRIBUTES = 100


class HookAnswer(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    allow: bool
    reason: str | None = Field(default=None, max_length=255)
    device_name: str | None = Field(default=None, alias="deviceName", min_length=1, max_length=255,
                                    pattern=r"^[^\x00-\x1f\x7f]*$")
    label: str | None = Field(default=None, max_length=255, pattern=r"^[^\x00-\x1f\x7f]*$")
    #: Server-scope attributes (never shown to the device); keys as the admin API's attribute keys.
    attributes: dict[Annotated[str, Field(min_length=1, max_length=255)], Any] | None = Field(
        default=None, max_length=MAX_ATTRIBUTES)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Provision-Signature`` value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


class ProvisionHooks:
    """Calls profiles' hooks (one pooled HTTP client, at most ``max_concurrency`` calls at once per core)."""

    def __init__(self, pool: asyncpg.Pool, box: SecretBox, *, max_concurrency: int = 64) -> None:
        self._pool = pool
        self._box = box
        self._client = httpx.AsyncClient(follow_redirects=False, limits=httpx.Limits(max_connections=max_concurrency))
        self._slots = asyncio.Semaphore(max_concurrency)

    async def close(self) -> None:
        await self._client.aclose()

    async def decide(self, req: ProvisionRequest, profile: ProfileRow, name: str, request_key: str) -> HookDecision:
        """The hook's decision about this request: stored first, replayed after."""
        stored = await repository.hook_decision(self._pool, request_key)
        if stored is not None:
            return stored
        decision = await self._ask(req, profile, name)
        return await repository.keep_hook_decision(self._pool, request_key, decision)

    async def _ask(self, req: ProvisionRequest, profile: ProfileRow, name: str) -> HookDecision:
        assert profile.hook_url is not None and profile.hook_secret_enc is not None
        body = json.dumps({
            "deviceName": name, "profileId": str(profile.id), "profileName": profile.name,
            "transport": req.transport.value, "dialect": req.dialect.value, "sourceAddress": req.source_address,
            "credentialsType": req.credentials_type.value, "requestId": req.request_id, "extra": req.extra,
        }, separators=(",", ":")).encode()
        secret: str = self._box.decrypt_json(profile.hook_secret_enc)
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: signature(secret, int(time.time()), body)}
        try:
            async with self._slots, asyncio.timeout(profile.hook_timeout_ms / 1000):
                response = await self._client.post(profile.hook_url, content=body, headers=headers)
                answer = HookAnswer.model_validate_json(response.content[:MAX_ANSWER_BYTES]) \
                    if response.status_code == 200 else None
        except (TimeoutError, httpx.HTTPError, ValidationError) as exc:
            return self._unavailable(profile, type(exc).__name__)
        if answer is None:
            return self._unavailable(profile, f"HTTP {response.status_code}")
        if not answer.allow:
            return HookDecision(False, answer.reason or DENIED)
        return HookDecision(True, answer.reason, answer.device_name, answer.label, answer.attributes)

    @staticmethod
    def _unavailable(profile: ProfileRow, why: str) -> HookDecision:
        log.warning("provisioning hook of profile %s did not decide (%s): %s", profile.name, why,
                    "let through (failOpen)" if profile.hook_fail_open else "refused")
        return HookDecision(profile.hook_fail_open, UNAVAILABLE)

