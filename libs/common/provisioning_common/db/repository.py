"""Queries on devices and credentials shared by provisioning-core and the admin API.

Both create devices with credentials; doing it in one function keeps the
"device + credentials in one transaction, uniqueness mapped to one error" rule in one place.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from ..models import PreparedCredentials


class DeviceConflict(Exception):
    """A uniqueness rule refused the device; ``what`` names it (name, device_key, credentials)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


@dataclass(frozen=True)
class ProfileRow:
    id: uuid.UUID
    name: str
    provision_strategy: str
    provision_key: str | None
    provision_secret: str | None
    certificate_regex: str | None = None
    allow_create_by_x509: bool = True
    signing_certificate_pem: str | None = None
    signing_key_enc: str | None = None
    issued_validity_days: int = 365


PROFILE_COLUMNS = (
    "id, name, provision_strategy, provision_key, provision_secret, certificate_regex, allow_create_by_x509,"
    " signing_certificate_pem, signing_key_enc, issued_validity_days"
)


async def profile_by_key(conn: asyncpg.Connection | asyncpg.Pool, key: str) -> ProfileRow | None:
    row = await conn.fetchrow(f"SELECT {PROFILE_COLUMNS} FROM device_profiles WHERE provision_key = $1", key)
    return ProfileRow(**dict(row)) if row else None


async def profile_by_id(conn: asyncpg.Connection | asyncpg.Pool, profile_id: uuid.UUID) -> ProfileRow | None:
    row = await conn.fetchrow(f"SELECT {PROFILE_COLUMNS} FROM device_profiles WHERE id = $1", profile_id)
    return ProfileRow(**dict(row)) if row else None


def public_value(prepared: PreparedCredentials) -> str | None:
    """What may be stored in clear: MQTT_BASIC's clientId and userName (never the password)."""
    if isinstance(prepared.response_value, dict):
        value = {k: v for k, v in prepared.response_value.items() if k != "password"}
        return json.dumps(value)
    return None


async def insert_device(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    device_id: uuid.UUID,
    name: str,
    profile_id: uuid.UUID,
    device_key: str,
    gateway: bool,
    provision_state: str | None,
    prepared: PreparedCredentials,
    value_enc: bytes | None,
    request_id: str | None = None,
    answer_enc: bytes | None = None,
) -> bool:
    """Write a device, its credentials and (with ``request_id``) the replayable answer in one statement.

    Returns False when ``request_id`` was already claimed (a duplicate delivery: replay its
    answer). Raises :class:`DeviceConflict` when a uniqueness rule refused the device; then
    nothing at all was written.
    """
    try:
        outcome = await conn.fetchval(
            "SELECT create_device_with_credentials($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::jsonb, $13)",
            request_id,
            answer_enc,
            device_id,
            name,
            profile_id,
            device_key,
            gateway,
            provision_state,
            prepared.credentials_type.value,
            prepared.credentials_id,
            prepared.secret_hash,
            public_value(prepared),
            value_enc,
        )
    except asyncpg.RaiseError as exc:
        message = str(exc)
        if message.startswith("conflict:"):
            raise DeviceConflict(message.split(":", 1)[1]) from None
        raise
    return outcome == "created"


DEVICE_SELECT = (
    "SELECT d.id, d.name, d.profile_id, d.device_key, d.gateway, d.provision_state, d.created_at,"
    " c.credentials_type, c.credentials_id FROM devices d LEFT JOIN device_credentials c ON c.device_id = d.id"
)


def device_row_to_dict(row: Any) -> dict[str, Any]:
    """The admin API's JSON shape of a device."""
    return {
        "id": str(row["id"]),
        "name": row["name"],
        "deviceProfileId": str(row["profile_id"]),
        "deviceKey": row["device_key"],
        "gateway": row["gateway"],
        "provisionState": row["provision_state"],
        "credentialsType": row["credentials_type"],
        "createdTime": int(row["created_at"].timestamp() * 1000),
    }
