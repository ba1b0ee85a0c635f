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


PROFILE_COLUMNS = "id, name, provision_strategy, provision_key, provision_secret"


async def profile_by_key(conn: asyncpg.Connection | asyncpg.Pool, key: str) -> ProfileRow | None:
    row = await conn.fetchrow(f"SELECT {PROFILE_COLUMNS} FROM device_profiles WHERE provision_key = $1", key)
    return ProfileRow(**dict(row)) if row else None


def public_value(prepared: PreparedCredentials) -> str | None:
    """What may be stored in clear: MQTT_BASIC's clientId and userName (never the password)."""
    if isinstance(prepared.response_value, dict):
        value = {k: v for k, v in prepared.response_value.items() if k != "password"}
        return json.dumps(value)
    return None


async def insert_device(
    conn: asyncpg.Connection,
    *,
    device_id: uuid.UUID,
    name: str,
    profile_id: uuid.UUID,
    device_key: str,
    gateway: bool,
    provision_state: str | None,
    prepared: PreparedCredentials,
    value_enc: bytes | None,
) -> None:
    """Insert a device and its credentials; must run inside the caller's transaction.

    Raises :class:`DeviceConflict` (the transaction is then to be rolled back by the caller).
    """
    inserted = await conn.fetchval(
        "INSERT INTO devices (id, name, profile_id, device_key, gateway, provision_state)"
        " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING id",
        device_id,
        name,
        profile_id,
        device_key,
        gateway,
        provision_state,
    )
    if inserted is None:
        taken_name = await conn.fetchval("SELECT 1 FROM devices WHERE name = $1", name)
        raise DeviceConflict("name" if taken_name else "device_key")
    inserted = await conn.fetchval(
        "INSERT INTO device_credentials (device_id, credentials_type, credentials_id, secret_hash, public_value,"
        " value_enc) VALUES ($1, $2, $3, $4, $5::jsonb, $6) ON CONFLICT DO NOTHING RETURNING device_id",
        device_id,
        prepared.credentials_type.value,
        prepared.credentials_id,
        prepared.secret_hash,
        public_value(prepared),
        value_enc,
    )
    if inserted is None:
        raise DeviceConflict("credentials")


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
