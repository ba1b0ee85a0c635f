"""Every SQL statement of provisioning-core, credentials and the admin API (each in its own section).

One typed function per query; rows come back as small frozen dataclasses, never as ``asyncpg.Record``.
Both the core and the admin API create devices with credentials; doing it in one function keeps the
"device + credentials in one transaction, uniqueness mapped to one error" rule in one place.
``conn`` is a pool or a connection (in the caller's transaction where the function says so).
"""

from __future__ import annotations

import datetime
import hmac
import json
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from ..events import ProvisionEvent
from ..models import PreparedCredentials


class Expired(Exception):
    """The request's deadline passed before the write could commit; nothing was written."""


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
    #: The secret in clear: never stored so (migration 0008); the profile cache fills it in from
    #: ``provision_secret_enc``. From the database it is only a row not yet sealed (see seal_profile_secrets).
    provision_secret: str | None
    certificate_regex: str | None = None
    allow_create_by_x509: bool = True
    signing_certificate_pem: str | None = None
    signing_key_enc: str | None = None
    issued_validity_days: int = 365
    #: The provision secret encrypted with DATA_ENCRYPTION_KEY (SecretBox.encrypt_json).
    provision_secret_enc: bytes | None = None
    #: Devices may choose access tokens below the documented minimum (a profile option).
    allow_weak_tokens: bool = False
    #: What a provision request for an existing, provisioned device of the profile does (migration 0015).
    reprovision_policy: str = "NEVER"
    #: The pre-provisioning hook (migration 0016): its URL (None: no hook), encrypted secret, time-out, mode.
    hook_url: str | None = None
    hook_secret_enc: bytes | None = None
    hook_timeout_ms: int = 2000
    hook_fail_open: bool = False


PROFILE_COLUMNS = (
    "id, name, provision_strategy, provision_key, provision_secret, certificate_regex, allow_create_by_x509,"
    " signing_certificate_pem, signing_key_enc, issued_validity_days, provision_secret_enc, allow_weak_tokens,"
    " reprovision_policy, hook_url, hook_secret_enc, hook_timeout_ms, hook_fail_open"
)


async def profile_by_key(conn: asyncpg.Connection | asyncpg.Pool, key: str) -> ProfileRow | None:
    row = await conn.fetchrow(f"SELECT {PROFILE_COLUMNS} FROM device_profiles WHERE provision_key = $1", key)
    return ProfileRow(**dict(row)) if row else None


async def profile_by_id(conn: asyncpg.Connection | asyncpg.Pool, profile_id: uuid.UUID) -> ProfileRow | None:
    row = await conn.fetchrow(f"SELECT {PROFILE_COLUMNS} FROM device_profiles WHERE id = $1", profile_id)
    return ProfileRow(**dict(row)) if row else None


async def seal_profile_secrets(pool: asyncpg.Pool, encrypt: Callable[[str], bytes]) -> int:
    """Encrypt every provision secret still stored in clear (rows from before migration 0008) and clear
    the clear column, in one transaction; returns how many. Safe to run from several instances at once
    (rows are locked; a row sealed meanwhile is skipped)."""
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            "SELECT id, provision_secret FROM device_profiles WHERE provision_secret IS NOT NULL FOR UPDATE"
        )
        for row in rows:
            await conn.execute(
                "UPDATE device_profiles SET provision_secret_enc = $2, provision_secret = NULL WHERE id = $1",
                row["id"], encrypt(row["provision_secret"]),
            )
    return len(rows)


def public_value(prepared: PreparedCredentials) -> str | None:
    """What may be stored in clear: MQTT_BASIC's clientId and userName (never the password)."""
    if isinstance(prepared.response_value, dict):
        value = {k: v for k, v in prepared.response_value.items() if k != "password"}
        return json.dumps(value)
    return None


@dataclass(frozen=True)
class NewDevice:
    """A device, its credentials and (with ``request_id``) the replayable answer, to be written whole."""

    device_id: uuid.UUID
    name: str
    profile_id: uuid.UUID
    device_key: str
    gateway: bool
    provision_state: str | None
    prepared: PreparedCredentials
    value_enc: bytes | None
    request_id: str | None = None
    answer_enc: bytes | None = None
    #: Unix time past which nothing may be written.
    deadline: float | None = None
    replay_window_s: float | None = None


class RowFailed(Exception):
    """A device's write failed in the database for another reason than a conflict or its deadline (its
    SQLSTATE says why, e.g. 40P01 a deadlock); nothing of it was written."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"device write failed in the database (SQLSTATE {sqlstate})")
        self.sqlstate = sqlstate


async def insert_devices(
    conn: asyncpg.Connection | asyncpg.Pool, devices: Sequence[NewDevice]
) -> list[bool | Exception]:
    """Write ``devices`` in one statement (migration 0019), each whole or not at all, and say per device,
    in order: True written; False its ``request_id`` was already claimed within its ``replay_window_s`` (a
    duplicate delivery or a repeated request: replay that answer); or the exception its caller gets -
    :class:`DeviceConflict` (a uniqueness rule refused it, also against a device before it in the list),
    :class:`Expired` (its ``deadline`` passed before it was written), :class:`RowFailed` (another error).
    Raises when the statement itself fails (the database is unreachable): then nothing was written."""
    order = sorted(range(len(devices)), key=lambda i: devices[i].name)  # one lock order for every writer
    rows = [devices[i] for i in order]
    outcomes = await conn.fetchval(
        "SELECT array_agg(o ORDER BY n) FROM create_devices_with_credentials("
        "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::jsonb[], $13, $14, $15) WITH ORDINALITY AS t (o, n)",
        [d.request_id for d in rows],
        [d.answer_enc for d in rows],
        [d.device_id for d in rows],
        [d.name for d in rows],
        [d.profile_id for d in rows],
        [d.device_key for d in rows],
        [d.gateway for d in rows],
        [d.provision_state for d in rows],
        [d.prepared.credentials_type.value for d in rows],
        [d.prepared.credentials_id for d in rows],
        [d.prepared.secret_hash for d in rows],
        [public_value(d.prepared) for d in rows],
        [d.value_enc for d in rows],
        [_timestamp(d.deadline) for d in rows],
        [datetime.timedelta(seconds=d.replay_window_s) if d.replay_window_s else None for d in rows],
    )
    results: list[bool | Exception] = [False] * len(devices)
    for i, outcome in zip(order, outcomes, strict=True):
        results[i] = _write_outcome(outcome)
    return results


def _write_outcome(outcome: str) -> bool | Exception:
    if outcome == "created":
        return True
    if outcome == "duplicate_request":
        return False
    if outcome == "expired":
        return Expired()
    kind, _, detail = outcome.partition(":")
    if kind == "conflict":
        return DeviceConflict(detail)
    if kind == "unique" and detail == CREDENTIALS_KEY:  # revoked credentials (migration 0012's trigger)
        return DeviceConflict("credentials")
    return RowFailed(detail if kind == "error" else "23505")


async def insert_device(conn: asyncpg.Connection | asyncpg.Pool, device: NewDevice) -> bool:
    """:func:`insert_devices` for one device: True written, False a duplicate request; raises the rest."""
    [outcome] = await insert_devices(conn, [device])
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def _timestamp(unix_time: float | None) -> datetime.datetime | None:
    return None if unix_time is None else datetime.datetime.fromtimestamp(unix_time, tz=datetime.UTC)


async def replay_answer(conn: asyncpg.Connection | asyncpg.Pool, request_id: str) -> bytes | None:
    """The stored (encrypted) answer of a request, marked as handed out again so it is never undone."""
    answer: bytes | None = await conn.fetchval(
        "UPDATE provision_requests SET replayed = true WHERE request_id = $1 AND answer_enc IS NOT NULL"
        " RETURNING answer_enc",
        request_id,
    )
    return answer


async def undo_unanswered(
    pool: asyncpg.Pool, request_id: str, restore_value: Callable[[bytes], bytes | None]
) -> uuid.UUID | None:
    """Undo what ``request_id`` committed when its answer reached nobody, unless a retry got it since.

    A created device is deleted (its credentials with it); a claimed pre-provisioned device goes back
    to unclaimed, its credentials encrypted again by ``restore_value`` from the stored (encrypted)
    answer. Returns the device id when something was undone.
    """
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "DELETE FROM provision_requests WHERE request_id = $1 AND NOT replayed"
            " RETURNING device_id, kind, answer_enc",
            request_id,
        )
        if row is None or row["device_id"] is None:
            return None
        if row["kind"] == "rotated":
            pass  # a re-provisioning: the old credentials stay revoked, the device may simply ask again
        elif row["kind"] == "claimed":
            await conn.execute("UPDATE devices SET provision_state = NULL WHERE id = $1", row["device_id"])
            await conn.execute(
                "UPDATE device_credentials SET value_enc = $2 WHERE device_id = $1",
                row["device_id"], restore_value(row["answer_enc"]),
            )
        else:
            await conn.execute("DELETE FROM devices WHERE id = $1", row["device_id"])
        device_id: uuid.UUID = row["device_id"]
        return device_id


async def deadline_passed(conn: asyncpg.Connection, deadline: float | None) -> bool:
    """Whether the database's clock is past ``deadline``: the last check inside a transaction."""
    if deadline is None:
        return False
    return bool(await conn.fetchval("SELECT clock_timestamp() > $1", _timestamp(deadline)))


# --- provision requests: replay keys and answers (provisioning-core) -------------------------------


async def claim_request_id(
    conn: asyncpg.Connection, request_id: str, expire_after_s: float | None = None
) -> bool:
    """Claim ``request_id`` in the caller's transaction; False when another attempt already holds it.

    With ``expire_after_s`` a claim older than that many seconds is forgotten first (content keys
    expire with the replay window; message ids never do).
    """
    claimed = await conn.fetchval(
        "SELECT claim_provision_request($1, 'claimed', NULL, NULL, $2)",
        request_id,
        None if expire_after_s is None else datetime.timedelta(seconds=expire_after_s),
    )
    return bool(claimed)


async def record_answer(
    conn: asyncpg.Connection, request_id: str, device_id: uuid.UUID | None, answer_enc: bytes
) -> None:
    """Store the (encrypted) answer of a claimed request and the device it is about."""
    await conn.execute(
        "UPDATE provision_requests SET device_id = $2, answer_enc = $3 WHERE request_id = $1",
        request_id, device_id, answer_enc,
    )


async def purge_answers(conn: asyncpg.Connection | asyncpg.Pool, older_than_s: float) -> int:
    """Forget the answers (and the hook's decisions) stored more than ``older_than_s`` ago; returns how many
    answers."""
    await conn.execute("DELETE FROM hook_decisions WHERE created_at < now() - make_interval(secs => $1)",
                       older_than_s)
    status: str = await conn.execute(
        "DELETE FROM provision_requests WHERE created_at < now() - make_interval(secs => $1)", older_than_s
    )
    return int(status.split()[-1])


# --- the pre-provisioning hook's decisions (provisioning-core; migration 0016) --------------------------


@dataclass(frozen=True)
class HookDecision:
    allow: bool
    reason: str | None = None
    #: The device's name as the hook set it (None: the request's).
    device_name: str | None = None
    #: The device's label, and server attributes ({key: JSON value}), as the hook set them: written with the
    #: device, in its transaction, by migration 0018's trigger (None: none).
    label: str | None = None
    attributes: dict[str, Any] | None = None


_HOOK_COLUMNS = "allow, reason, device_name, label, attributes"


def _hook_decision(row: asyncpg.Record) -> HookDecision:
    attributes = row["attributes"]
    return HookDecision(row["allow"], row["reason"], row["device_name"], row["label"],
                        json.loads(attributes) if attributes is not None else None)


async def hook_decision(conn: asyncpg.Connection | asyncpg.Pool, request_id: str) -> HookDecision | None:
    row = await conn.fetchrow(f"SELECT {_HOOK_COLUMNS} FROM hook_decisions WHERE request_id = $1", request_id)
    return _hook_decision(row) if row else None


async def keep_hook_decision(conn: asyncpg.Connection | asyncpg.Pool, request_id: str,
                             decision: HookDecision) -> HookDecision:
    """Store ``decision`` for ``request_id`` unless one is stored already: the one that counts is returned."""
    row = await conn.fetchrow(
        f"WITH put AS (INSERT INTO hook_decisions (request_id, {_HOOK_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6::jsonb)"
        f" ON CONFLICT DO NOTHING RETURNING {_HOOK_COLUMNS})"
        f" SELECT {_HOOK_COLUMNS} FROM put"
        f" UNION ALL SELECT {_HOOK_COLUMNS} FROM hook_decisions WHERE request_id = $1 LIMIT 1",
        request_id, decision.allow, decision.reason, decision.device_name, decision.label,
        json.dumps(decision.attributes) if decision.attributes is not None else None,
    )
    return _hook_decision(row) if row else decision


# --- devices by name (provisioning-core) ----------------------------------------------------------


@dataclass(frozen=True)
class NamedDevice:
    """A device and its credentials, as provisioning decides about them (claim, X.509 rotation)."""

    id: uuid.UUID
    profile_id: uuid.UUID
    provision_state: str | None
    credentials_type: str
    credentials_id: str
    #: Encrypted credentials a pre-provisioned device will be handed; None once handed out.
    value_enc: bytes | None


_NAMED_DEVICE = (
    "SELECT d.id, d.profile_id, d.provision_state, c.credentials_type, c.credentials_id, c.value_enc"
    " FROM devices d JOIN device_credentials c ON c.device_id = d.id WHERE d.name = $1"
)


async def device_by_name(conn: asyncpg.Connection | asyncpg.Pool, name: str) -> NamedDevice | None:
    row = await conn.fetchrow(_NAMED_DEVICE, name)
    return NamedDevice(**dict(row)) if row else None


async def lock_device_by_name(conn: asyncpg.Connection, name: str) -> NamedDevice | None:
    """:func:`device_by_name`, the device row locked until the caller's transaction ends."""
    row = await conn.fetchrow(_NAMED_DEVICE + " FOR UPDATE OF d", name)
    return NamedDevice(**dict(row)) if row else None


async def set_provision_state(conn: asyncpg.Connection, device_id: uuid.UUID, state: str | None) -> None:
    await conn.execute("UPDATE devices SET provision_state = $2 WHERE id = $1", device_id, state)


async def clear_credentials_value(conn: asyncpg.Connection, device_id: uuid.UUID) -> None:
    """Forget the encrypted credentials of a device once they are handed out (only the hash remains)."""
    await conn.execute("UPDATE device_credentials SET value_enc = NULL WHERE device_id = $1", device_id)


async def replace_credentials_id(
    conn: asyncpg.Connection | asyncpg.Pool, device_id: uuid.UUID, credentials_id: str
) -> None:
    """New credentials (X.509 rotation); :class:`DeviceConflict` ``credentials`` when another device has them."""
    try:
        await conn.execute(
            "UPDATE device_credentials SET credentials_id = $2, value_enc = NULL WHERE device_id = $1",
            device_id, credentials_id,
        )
    except asyncpg.UniqueViolationError:
        raise DeviceConflict("credentials") from None


# --- operators, their API tokens and the admin audit log (admin API; migration 0013) ---------------


class OperatorConflict(Exception):
    """Another operator has this user name."""


@dataclass(frozen=True)
class Operator:
    id: uuid.UUID
    username: str
    role: str
    disabled: bool
    created_at: datetime.datetime


_OPERATOR = "SELECT id, username, role, disabled, created_at FROM operators"


async def operator_by_token(conn: asyncpg.Connection | asyncpg.Pool, token_hash: str) -> Operator | None:
    """The enabled operator whose unrevoked API token has this hash (and the token's use is noted), or None."""
    row = await conn.fetchrow(
        "UPDATE operator_tokens t SET last_used_at = now() FROM operators o"
        " WHERE t.token_hash = $1 AND t.revoked_at IS NULL AND o.id = t.operator_id AND NOT o.disabled"
        " RETURNING o.id, o.username, o.role, o.disabled, o.created_at",
        token_hash,
    )
    return Operator(**dict(row)) if row else None


async def admin_exists(conn: asyncpg.Connection | asyncpg.Pool) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM operators WHERE role = 'admin' AND NOT disabled)"))


async def create_operator(
    conn: asyncpg.Connection | asyncpg.Pool, *, username: str, password_hash: str | None, role: str
) -> Operator:
    try:
        row = await conn.fetchrow(
            "INSERT INTO operators (id, username, password_hash, role) VALUES ($1, $2, $3, $4)"
            " RETURNING id, username, role, disabled, created_at",
            uuid.uuid4(), username, password_hash, role,
        )
    except asyncpg.UniqueViolationError:
        raise OperatorConflict(username) from None
    assert row is not None
    return Operator(**dict(row))


async def get_operator(conn: asyncpg.Connection | asyncpg.Pool, operator_id: uuid.UUID) -> Operator | None:
    row = await conn.fetchrow(f"{_OPERATOR} WHERE id = $1", operator_id)
    return Operator(**dict(row)) if row else None


async def list_operators(conn: asyncpg.Connection | asyncpg.Pool) -> list[Operator]:
    return [Operator(**dict(row)) for row in await conn.fetch(f"{_OPERATOR} ORDER BY username")]


async def update_operator(
    conn: asyncpg.Connection | asyncpg.Pool, operator_id: uuid.UUID, *,
    role: str | None, disabled: bool | None, password_hash: str | None,
) -> Operator | None:
    """Change what is given (None: unchanged); None when there is no such operator."""
    row = await conn.fetchrow(
        "UPDATE operators SET role = coalesce($2, role), disabled = coalesce($3, disabled),"
        " password_hash = coalesce($4, password_hash) WHERE id = $1 RETURNING id, username, role, disabled, created_at",
        operator_id, role, disabled, password_hash,
    )
    return Operator(**dict(row)) if row else None


async def delete_operator(conn: asyncpg.Connection | asyncpg.Pool, operator_id: uuid.UUID) -> bool:
    return not str(await conn.execute("DELETE FROM operators WHERE id = $1", operator_id)).endswith(" 0")


async def create_operator_token(
    conn: asyncpg.Connection | asyncpg.Pool, *, operator_id: uuid.UUID, name: str, token_hash: str
) -> dict[str, Any]:
    row = await conn.fetchrow(
        "INSERT INTO operator_tokens (id, operator_id, name, token_hash) VALUES ($1, $2, $3, $4)"
        " RETURNING id, name, created_at, last_used_at, revoked_at",
        uuid.uuid4(), operator_id, name, token_hash,
    )
    assert row is not None
    return dict(row)


async def list_operator_tokens(conn: asyncpg.Connection | asyncpg.Pool, operator_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT id, name, created_at, last_used_at, revoked_at FROM operator_tokens"
                            " WHERE operator_id = $1 ORDER BY created_at", operator_id)
    return [dict(row) for row in rows]


async def revoke_operator_token(conn: asyncpg.Connection | asyncpg.Pool, operator_id: uuid.UUID,
                                token_id: uuid.UUID) -> bool:
    """Whether this operator had this token (revoking a revoked one again is a no-op that says True)."""
    status = await conn.execute(
        "UPDATE operator_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 AND operator_id = $2",
        token_id, operator_id,
    )
    return not str(status).endswith(" 0")


async def record_admin_audit(
    conn: asyncpg.Connection | asyncpg.Pool, *, actor: str, operator_id: uuid.UUID | None, method: str, path: str,
    status: int, object_id: str | None, changes: dict[str, Any] | None,
) -> None:
    await conn.execute(
        "INSERT INTO admin_audit (actor, operator_id, method, path, status, object_id, changes)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)",
        actor, operator_id, method, path, status, object_id, None if changes is None else json.dumps(changes),
    )


async def list_admin_audit(
    conn: asyncpg.Connection | asyncpg.Pool, *, actor: str | None, object_id: str | None, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    """One page of audit entries, newest first, and how many match in all."""
    where: list[str] = []
    args: list[Any] = []
    for column, value in (("actor", actor), ("object_id", object_id)):
        if value is not None:
            args.append(value)
            where.append(f"{column} = ${len(args)}")
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    total = await conn.fetchval(f"SELECT count(*) FROM admin_audit{clause}", *args)
    rows = await conn.fetch(
        f"SELECT time, actor, operator_id, method, path, status, object_id, changes FROM admin_audit{clause}"
        f" ORDER BY id DESC LIMIT ${len(args) + 1} OFFSET ${len(args) + 2}", *args, limit, offset)
    return [{**dict(row), "changes": json.loads(row["changes"]) if row["changes"] else None} for row in rows], total


# --- credential revocation and rotation (admin API; migration 0012) -------------------------------

#: The unique key of device_credentials.credentials_id, which revoked credentials also violate (0012).
CREDENTIALS_KEY = "device_credentials_credentials_id_key"


async def current_credentials(
    conn: asyncpg.Connection | asyncpg.Pool, device_id: uuid.UUID
) -> tuple[str, dict[str, Any]] | None:
    """A device's credentials type and what is stored of them in clear (MQTT_BASIC's clientId and
    userName), or None when it has none (revoked); raises :class:`UnknownDevice` for no device."""
    row = await conn.fetchrow(
        "SELECT d.id, c.credentials_type, c.public_value FROM devices d"
        " LEFT JOIN device_credentials c ON c.device_id = d.id WHERE d.id = $1",
        device_id,
    )
    if row is None:
        raise UnknownDevice(str(device_id))
    if row["credentials_type"] is None:
        return None
    return row["credentials_type"], json.loads(row["public_value"]) if row["public_value"] else {}


async def revoke_credentials(pool: asyncpg.Pool, device_id: uuid.UUID) -> DeviceRecord:
    """Take a device's credentials away for good: their lookup key moves to ``revoked_credentials`` (no
    device can be given them again) and the device is left without credentials. Idempotent; raises
    :class:`UnknownDevice` for no device."""
    async with pool.acquire() as conn, conn.transaction():
        await _revoke_current(conn, device_id)
        row = await conn.fetchrow(f"{_DEVICE_RECORD} WHERE d.id = $1", device_id)
    if row is None:
        raise UnknownDevice(str(device_id))
    return _device_record(row)


async def _revoke_current(conn: asyncpg.Connection, device_id: uuid.UUID, *,
                          keep_mqtt_basic_id: str | None = None) -> None:
    """In the caller's transaction: the device's credentials are deleted and their lookup key revoked, except
    an MQTT_BASIC id equal to ``keep_mqtt_basic_id`` (a client id / user name kept with a new password)."""
    await conn.execute(
        "WITH gone AS (DELETE FROM device_credentials WHERE device_id = $1"
        " RETURNING credentials_id, credentials_type, device_id)"
        " INSERT INTO revoked_credentials (credentials_id, credentials_type, device_id)"
        " SELECT credentials_id, credentials_type, device_id FROM gone"
        " WHERE $2::text IS NULL OR NOT (credentials_type = 'MQTT_BASIC' AND credentials_id = $2::text)"
        " ON CONFLICT DO NOTHING",
        device_id, keep_mqtt_basic_id,
    )


async def _replace_credentials(
    conn: asyncpg.Connection, device_id: uuid.UUID, prepared: PreparedCredentials, value_enc: bytes | None
) -> None:
    """In the caller's transaction: the device's credentials become ``prepared``, the old ones revoked (except an
    MQTT_BASIC client id / user name kept with a new password: only the password changes). Raises
    ``asyncpg.UniqueViolationError`` when the new ones are revoked ones or another device's."""
    kept = prepared.credentials_id if prepared.credentials_type.value == "MQTT_BASIC" else None
    await _revoke_current(conn, device_id, keep_mqtt_basic_id=kept)
    await conn.execute(
        "INSERT INTO device_credentials"
        " (device_id, credentials_type, credentials_id, secret_hash, public_value, value_enc)"
        " VALUES ($1, $2, $3, $4, $5::jsonb, $6)",
        device_id, prepared.credentials_type.value, prepared.credentials_id, prepared.secret_hash,
        public_value(prepared), value_enc,
    )


async def rotate_credentials(
    pool: asyncpg.Pool, device_id: uuid.UUID, prepared: PreparedCredentials, value_enc: bytes
) -> DeviceRecord:
    """Replace a device's credentials with ``prepared`` in one transaction, the old ones revoked
    (:func:`_replace_credentials`). ``value_enc`` (the new value, encrypted) is kept only while the device has
    not provisioned itself, for its claim to hand over. Raises :class:`UnknownDevice`, or
    :class:`DeviceConflict` ``credentials`` when the new credentials are revoked ones or another device's (then
    nothing changed)."""
    try:
        async with pool.acquire() as conn, conn.transaction():
            state = await conn.fetchrow("SELECT provision_state FROM devices WHERE id = $1 FOR UPDATE", device_id)
            if state is None:
                raise UnknownDevice(str(device_id))
            await _replace_credentials(conn, device_id, prepared,
                                       value_enc if state["provision_state"] is None else None)
            row = await conn.fetchrow(f"{_DEVICE_RECORD} WHERE d.id = $1", device_id)
    except asyncpg.UniqueViolationError:
        raise DeviceConflict("credentials") from None
    assert row is not None
    return _device_record(row)


async def reprovision_device(
    pool: asyncpg.Pool,
    *,
    name: str,
    profile_id: uuid.UUID,
    device_key: str | None,
    prepared: PreparedCredentials,
    request_id: str,
    answer_for: Callable[[uuid.UUID], bytes],
    replay_window_s: float | None,
) -> uuid.UUID | None:
    """A device of ``profile_id`` named ``name`` that has provisioned before asks again (a factory reset; the
    profile's reprovision policy allows it): in one transaction its credentials become ``prepared`` (the old
    ones revoked) and the request id is claimed with ``answer_for(device id)`` to replay (kind ``rotated``).

    With ``device_key``, the device's stored device key must be that (compared in constant time). Returns the
    device id, or None when the request id was already claimed (a repeated request: replay its answer).
    Raises :class:`DeviceConflict` ``name`` when no such device may be re-provisioned (another profile's, one
    that never provisioned, a wrong device key) and ``credentials`` when the new credentials are in use."""
    try:
        async with pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT id, profile_id, provision_state, device_key FROM devices WHERE name = $1 FOR UPDATE", name)
            if (row is None or row["profile_id"] != profile_id or row["provision_state"] is None
                    or (device_key is not None and not hmac.compare_digest(row["device_key"].encode(),
                                                                             device_key.encode()))):
                raise DeviceConflict("name")
            device_id: uuid.UUID = row["id"]
            claimed = await conn.fetchval(
                "SELECT claim_provision_request($1, 'rotated', $2, $3, $4)", request_id, device_id,
                answer_for(device_id), datetime.timedelta(seconds=replay_window_s) if replay_window_s else None)
            if not claimed:
                return None
            await _replace_credentials(conn, device_id, prepared, None)
    except asyncpg.UniqueViolationError:
        raise DeviceConflict("credentials") from None
    return device_id


# --- credentials lookups (credentials service) ----------------------------------------------------


@dataclass(frozen=True)
class StoredCredentials:
    """A device's credentials row as authentication reads it (``public_value`` is JSON text)."""

    device_id: uuid.UUID
    device_name: str
    credentials_type: str
    secret_hash: str | None
    public_value: str | None


async def credentials_by_id(conn: asyncpg.Connection | asyncpg.Pool, credentials_id: str) -> StoredCredentials | None:
    row = await conn.fetchrow(
        "SELECT c.device_id, d.name AS device_name, c.credentials_type, c.secret_hash, c.public_value"
        " FROM device_credentials c JOIN devices d ON d.id = c.device_id WHERE c.credentials_id = $1",
        credentials_id,
    )
    return StoredCredentials(**dict(row)) if row else None


@dataclass(frozen=True)
class ChainProfile:
    """An X509_CERTIFICATE_CHAIN profile's id and CA certificate (PEM)."""

    id: uuid.UUID
    certificate_pem: str


async def chain_profiles_by_ca_subject(
    conn: asyncpg.Connection | asyncpg.Pool, subject_hashes: list[str]
) -> list[ChainProfile]:
    """The X509_CERTIFICATE_CHAIN profiles whose CA's subject hash is one of ``subject_hashes`` (indexed)."""
    rows = await conn.fetch(
        "SELECT id, certificate_pem FROM device_profiles"
        " WHERE provision_strategy = 'X509_CERTIFICATE_CHAIN' AND ca_subject_hash = ANY($1::text[])",
        subject_hashes,
    )
    return [ChainProfile(**dict(row)) for row in rows]


# =====================================================================================================
# --- admin API: device profiles and devices as an operator manages them (services/admin_api) ----------
# =====================================================================================================
# The admin API's own statements. Rows come back as ProfileRecord / DeviceRecord; the JSON shapes are the
# admin API's business (services/admin_api/routers). Devices are written with insert_device (above).


class ProfileConflict(Exception):
    """A uniqueness rule refused a profile; ``what`` is ``provision_key`` or ``name``."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class ProfileInUse(Exception):
    """Devices still reference the profile, so it cannot be deleted."""


@dataclass(frozen=True)
class ProfileFields:
    """Every column an operator writes for a profile (validated by the admin API before it gets here)."""

    name: str
    provision_strategy: str
    provision_key: str | None
    #: The provision secret, encrypted (SecretBox.encrypt_json); the admin API decrypts it to show it.
    provision_secret_enc: bytes | None
    certificate_pem: str | None
    certificate_regex: str | None
    ca_subject_hash: str | None
    signing_certificate_pem: str | None
    #: The signing CA's private key, encrypted (Fernet); never leaves the database in clear.
    signing_key_enc: str | None
    allow_create_by_x509: bool
    issued_validity_days: int
    allow_weak_tokens: bool
    reprovision_policy: str
    hook_url: str | None
    #: The hook's secret, encrypted (SecretBox.encrypt_json); never shown again.
    hook_secret_enc: bytes | None
    hook_timeout_ms: int
    hook_fail_open: bool


@dataclass(frozen=True)
class ProfileRecord(ProfileFields):
    """A stored profile: what was written, and the id and creation time the database keeps."""

    id: uuid.UUID
    created_at: datetime.datetime


_PROFILE_FIELDS = (
    "name", "provision_strategy", "provision_key", "provision_secret_enc", "certificate_pem", "certificate_regex",
    "ca_subject_hash", "signing_certificate_pem", "signing_key_enc", "allow_create_by_x509", "issued_validity_days",
    "allow_weak_tokens", "reprovision_policy", "hook_url", "hook_secret_enc", "hook_timeout_ms", "hook_fail_open",
)
_PROFILE_RECORD = ", ".join(("id", "created_at", *_PROFILE_FIELDS))


def _profile_record(row: Any) -> ProfileRecord:
    return ProfileRecord(**{name: row[name] for name in ("id", "created_at", *_PROFILE_FIELDS)})


def _field_values(fields: ProfileFields) -> list[Any]:
    return [getattr(fields, name) for name in _PROFILE_FIELDS]


async def _write_profile(conn: asyncpg.Connection | asyncpg.Pool, sql: str, *args: Any) -> Any:
    try:
        return await conn.fetchrow(sql, *args)
    except asyncpg.UniqueViolationError as exc:
        raise ProfileConflict("provision_key" if "provision_key" in (exc.constraint_name or "") else "name") from None


async def insert_profile(
    conn: asyncpg.Connection | asyncpg.Pool, profile_id: uuid.UUID, fields: ProfileFields
) -> ProfileRecord:
    """Store a new profile. Raises :class:`ProfileConflict` when its name or provision key is taken."""
    placeholders = ", ".join(f"${i}" for i in range(1, len(_PROFILE_FIELDS) + 2))
    row = await _write_profile(
        conn,
        f"INSERT INTO device_profiles (id, {', '.join(_PROFILE_FIELDS)}) VALUES ({placeholders})"
        f" RETURNING {_PROFILE_RECORD}",
        profile_id, *_field_values(fields),
    )
    return _profile_record(row)


async def update_profile(
    conn: asyncpg.Connection | asyncpg.Pool, profile_id: uuid.UUID, fields: ProfileFields
) -> ProfileRecord | None:
    """Replace a profile's fields; None when there is no such profile. Raises :class:`ProfileConflict`."""
    placeholders = ", ".join(f"${i}" for i in range(2, len(_PROFILE_FIELDS) + 2))
    row = await _write_profile(
        conn,
        f"UPDATE device_profiles SET ({', '.join(_PROFILE_FIELDS)}, updated_at) = ({placeholders}, now()),"
        " provision_secret = NULL"  # a row not yet sealed (migration 0008) gets no clear secret back
        f" WHERE id = $1 RETURNING {_PROFILE_RECORD}",
        profile_id, *_field_values(fields),
    )
    return None if row is None else _profile_record(row)


async def profile_record(conn: asyncpg.Connection | asyncpg.Pool, profile_id: uuid.UUID) -> ProfileRecord | None:
    row = await conn.fetchrow(f"SELECT {_PROFILE_RECORD} FROM device_profiles WHERE id = $1", profile_id)
    return None if row is None else _profile_record(row)


async def profile_exists(conn: asyncpg.Connection | asyncpg.Pool, profile_id: uuid.UUID) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM device_profiles WHERE id = $1", profile_id))


async def list_profiles(
    conn: asyncpg.Connection | asyncpg.Pool, *, limit: int, offset: int
) -> tuple[list[ProfileRecord], int]:
    """One page of profiles (oldest first) and how many there are in all."""
    rows = await conn.fetch(
        f"SELECT {_PROFILE_RECORD}, count(*) OVER () AS total FROM device_profiles"
        " ORDER BY created_at, id LIMIT $1 OFFSET $2",
        limit, offset,
    )
    # Past the last page there is no row to carry the total.
    total = rows[0]["total"] if rows else await conn.fetchval("SELECT count(*) FROM device_profiles")
    return [_profile_record(row) for row in rows], int(total)


async def delete_profile(conn: asyncpg.Connection | asyncpg.Pool, profile_id: uuid.UUID) -> bool:
    """Whether a profile was deleted. Raises :class:`ProfileInUse` while devices reference it."""
    try:
        status = await conn.execute("DELETE FROM device_profiles WHERE id = $1", profile_id)
    except asyncpg.ForeignKeyViolationError:
        raise ProfileInUse from None
    return not str(status).endswith(" 0")


@dataclass(frozen=True)
class DeviceRecord:
    """A device as the admin API lists it (its credentials' type; never their value)."""

    id: uuid.UUID
    name: str
    profile_id: uuid.UUID
    device_key: str
    gateway: bool
    provision_state: str | None
    created_at: datetime.datetime
    credentials_type: str | None
    #: ThingsBoard's label (set by a pre-provisioning hook).
    label: str | None = None


_DEVICE_RECORD = (
    "SELECT d.id, d.name, d.profile_id, d.device_key, d.gateway, d.provision_state, d.created_at,"
    " c.credentials_type, d.label FROM devices d LEFT JOIN device_credentials c ON c.device_id = d.id"
)


def _device_record(row: Any) -> DeviceRecord:
    return DeviceRecord(**dict(row))


async def create_device(
    pool: asyncpg.Pool,
    *,
    device_id: uuid.UUID,
    name: str,
    profile_id: uuid.UUID,
    device_key: str,
    prepared: PreparedCredentials,
    value_enc: bytes,
) -> DeviceRecord:
    """A pre-provisioned device (not yet claimed by its device) with its credentials, the value encrypted
    until the device collects it. Raises :class:`DeviceConflict` as :func:`insert_device` does."""
    async with pool.acquire() as conn:
        await insert_device(conn, NewDevice(
            device_id=device_id, name=name, profile_id=profile_id, device_key=device_key, gateway=False,
            provision_state=None, prepared=prepared, value_enc=value_enc,
        ))
        record = await device_record(conn, device_id)
    assert record is not None  # written just now, on this connection
    return record


async def device_record(conn: asyncpg.Connection | asyncpg.Pool, device_id: uuid.UUID) -> DeviceRecord | None:
    row = await conn.fetchrow(f"{_DEVICE_RECORD} WHERE d.id = $1", device_id)
    return None if row is None else _device_record(row)


async def list_devices(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    profile_id: uuid.UUID | None,
    name_contains: str | None,
    limit: int,
    offset: int,
    provisioned: bool | None = None,
    credentials_type: str | None = None,
) -> tuple[list[DeviceRecord], int]:
    """One page of devices (oldest first), optionally of one profile and/or whose name contains a text
    (case-insensitive, taken literally: ``%`` and ``_`` match themselves), provisioned or not yet, with one type
    of credentials, and how many match in all."""
    where: list[str] = []
    args: list[Any] = []
    if profile_id is not None:
        args.append(profile_id)
        where.append(f"d.profile_id = ${len(args)}")
    if provisioned is not None:
        where.append("d.provision_state IS NOT NULL" if provisioned else "d.provision_state IS NULL")
    if credentials_type is not None:
        args.append(credentials_type)
        where.append(f"c.credentials_type = ${len(args)}")
    if name_contains:
        escaped = name_contains.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        args.append(f"%{escaped}%")
        where.append(f"d.name ILIKE ${len(args)}")
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    join = " LEFT JOIN device_credentials c ON c.device_id = d.id" if credentials_type is not None else ""
    total = await conn.fetchval(f"SELECT count(*) FROM devices d{join}{clause}", *args)
    rows = await conn.fetch(
        f"{_DEVICE_RECORD}{clause} ORDER BY d.created_at, d.id LIMIT ${len(args) + 1} OFFSET ${len(args) + 2}",
        *args, limit, offset,
    )
    return [_device_record(row) for row in rows], int(total)


async def delete_device(conn: asyncpg.Connection | asyncpg.Pool, device_id: uuid.UUID) -> bool:
    """Whether a device was deleted (its credentials go with it)."""
    status = await conn.execute("DELETE FROM devices WHERE id = $1", device_id)
    return not str(status).endswith(" 0")


# =====================================================================================================
# --- device attributes: client, shared and server scopes (device_api in provisioning-core, admin API) --
# =====================================================================================================
# Values travel as JSON text (jsonb); keys and values are checked by the callers (device_api's payload
# rules, the admin API's schemas). The server attribute provisionState is kept by a trigger (migration
# 0006), never written here.


class UnknownDevice(Exception):
    """No device has this id (never existed, or deleted)."""


class InvalidAttributes(Exception):
    """Postgres refused the values: text jsonb cannot hold (NUL ``\\u0000``, an unpaired surrogate)."""


@dataclass(frozen=True)
class AttributeRow:
    scope: str
    key: str
    #: The decoded JSON value.
    value: Any
    #: Milliseconds since the epoch (ThingsBoard's ``lastUpdateTs``).
    last_update_ts: int


_NOW_MS = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"


async def get_attributes(
    conn: asyncpg.Connection | asyncpg.Pool,
    device_id: uuid.UUID,
    *,
    client: list[str] | None = None,
    shared: list[str] | None = None,
    server: list[str] | None = None,
) -> list[AttributeRow]:
    """A device's attributes of the scopes asked for, by key (``[]``: every key of that scope; None: none
    of it), ordered by scope and key; one statement. Raises :class:`UnknownDevice`."""
    client, shared, server = _storable_keys(client), _storable_keys(shared), _storable_keys(server)
    rows = await conn.fetch(
        "SELECT a.scope, a.key, a.value::text AS value, a.last_update_ts"
        " FROM devices d LEFT JOIN device_attributes a ON a.device_id = d.id AND ("
        "  (a.scope = 'client' AND $2::text[] IS NOT NULL AND (cardinality($2) = 0 OR a.key = ANY($2)))"
        "  OR (a.scope = 'shared' AND $3::text[] IS NOT NULL AND (cardinality($3) = 0 OR a.key = ANY($3)))"
        "  OR (a.scope = 'server' AND $4::text[] IS NOT NULL AND (cardinality($4) = 0 OR a.key = ANY($4))))"
        " WHERE d.id = $1 ORDER BY a.scope, a.key",
        device_id, client, shared, server,
    )
    if not rows:
        raise UnknownDevice(str(device_id))
    return [
        AttributeRow(row["scope"], row["key"], json.loads(row["value"]), row["last_update_ts"])
        for row in rows
        if row["scope"] is not None  # the device's own row: it exists, with nothing of what was asked
    ]


def _storable_keys(keys: list[str] | None) -> list[str] | None:
    """``keys`` without those no row can have (NUL, which Postgres text cannot hold); None when only such
    keys were named (that scope then yields nothing, instead of everything as ``[]`` would)."""
    if not keys:
        return keys
    kept = [key for key in keys if _storable(key)]
    return kept or None


def _storable(key: str) -> bool:
    """Whether Postgres text can hold ``key``: no NUL, and valid UTF-8 (no unpaired surrogate)."""
    if "\x00" in key:
        return False
    try:
        key.encode()
    except UnicodeEncodeError:
        return False
    return True


async def list_attributes(
    conn: asyncpg.Connection | asyncpg.Pool, device_id: uuid.UUID, scope: str
) -> list[AttributeRow]:
    """Every attribute of one scope of a device, by key. Raises :class:`UnknownDevice`."""
    return await get_attributes(conn, device_id, **{scope: []})


async def save_attributes(
    conn: asyncpg.Connection | asyncpg.Pool, device_id: uuid.UUID, scope: str, values: dict[str, Any]
) -> int:
    """Insert or replace ``values`` (key -> JSON value) in one scope, all in one statement stamped with
    the database's clock; returns how many were written. Raises :class:`UnknownDevice` and
    :class:`InvalidAttributes`; ``ValueError`` for a value JSON cannot carry (NaN, infinity)."""
    document = json.dumps(values, allow_nan=False, separators=(",", ":"))
    try:
        row = await conn.fetchrow(
            "WITH device AS (SELECT id FROM devices WHERE id = $1),"
            " saved AS ("
            "  INSERT INTO device_attributes (device_id, scope, key, value, last_update_ts)"
            f"  SELECT device.id, $2, e.key, e.value, {_NOW_MS} FROM device, jsonb_each($3::jsonb) e"
            "  ON CONFLICT (device_id, scope, key)"
            "  DO UPDATE SET value = EXCLUDED.value, last_update_ts = EXCLUDED.last_update_ts"
            "  RETURNING 1)"
            " SELECT (SELECT count(*) FROM device) AS found, (SELECT count(*) FROM saved) AS saved",
            device_id, scope, document,
        )
    except asyncpg.ForeignKeyViolationError:  # deleted between the look-up and the insert
        raise UnknownDevice(str(device_id)) from None
    except asyncpg.DataError:  # 22P05 (NUL), 22P02 (an unpaired surrogate): the document, not the database
        raise InvalidAttributes(
            "attribute keys and values must not contain NUL (\\u0000) or unpaired surrogates"
        ) from None
    if not row["found"]:
        raise UnknownDevice(str(device_id))
    return int(row["saved"])


async def delete_attributes(
    conn: asyncpg.Connection | asyncpg.Pool, device_id: uuid.UUID, scope: str, keys: list[str]
) -> list[str]:
    """Delete these keys of one scope; returns the keys that existed (sorted). Raises :class:`UnknownDevice`."""
    keys = [key for key in keys if _storable(key)]
    row = await conn.fetchrow(
        "WITH device AS (SELECT id FROM devices WHERE id = $1),"
        " deleted AS (DELETE FROM device_attributes a USING device"
        "  WHERE a.device_id = device.id AND a.scope = $2 AND a.key = ANY($3::text[]) RETURNING a.key)"
        " SELECT (SELECT count(*) FROM device) AS found,"
        " (SELECT coalesce(array_agg(key ORDER BY key), '{}') FROM deleted) AS keys",
        device_id, scope, keys,
    )
    if not row["found"]:
        raise UnknownDevice(str(device_id))
    return list(row["keys"])


# --- rate limits shared by every provisioning-core instance (migration 0007) -------------------------


async def rate_limit_batch(
    pool: asyncpg.Pool,
    take: Sequence[str],
    check: Sequence[str],
    decide: Callable[[dict[str, float], float], Mapping[str, float]],
) -> None:
    """One transaction over a batch of rate-limit buckets (migration 0007's ``rate_limit_buckets``).

    The ``take`` buckets are created if missing and locked in name order (``take`` must be sorted: no
    deadlocks between core instances), the ``check`` buckets are read without a lock, and ``decide`` gets
    every bucket's ``tat`` (a missing row is a full bucket: absent from the dict) and the database's clock
    in Unix seconds (one clock for every instance). What it returns for the ``take`` buckets is written
    back before the locks are released.

    A batch that only checks (every request had the right secret, and no provisions limit is configured)
    takes no lock and writes nothing: one statement, without the transaction's two extra round trips.
    """
    if not take:
        rows = await pool.fetch(
            "SELECT bucket, tat, extract(epoch FROM clock_timestamp())::float8 AS now FROM rate_limit_buckets"
            " WHERE bucket = ANY($1::text[])"
            " UNION ALL SELECT NULL, NULL, extract(epoch FROM clock_timestamp())::float8",
            list(check),
        )
        decide({row["bucket"]: float(row["tat"]) for row in rows if row["bucket"] is not None},
               max(float(row["now"]) for row in rows))
        return
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            "WITH taken AS ("
            " INSERT INTO rate_limit_buckets (bucket, tat) SELECT b, 0 FROM unnest($1::text[]) AS b ORDER BY b"
            " ON CONFLICT (bucket) DO UPDATE SET tat = rate_limit_buckets.tat RETURNING bucket, tat)"
            " SELECT bucket, tat, extract(epoch FROM clock_timestamp())::float8 AS now FROM taken"
            " UNION ALL SELECT bucket, tat, extract(epoch FROM clock_timestamp())::float8 FROM rate_limit_buckets"
            "  WHERE bucket = ANY($2::text[])"
            " UNION ALL SELECT NULL, NULL, extract(epoch FROM clock_timestamp())::float8",
            list(take), list(check),
        )
        now = max(float(row["now"]) for row in rows)  # the last SELECT makes sure there is a row
        before = {row["bucket"]: float(row["tat"]) for row in rows if row["bucket"] is not None}
        after = decide(dict(before), now)
        changed = [name for name in take if name in after and after[name] != before.get(name)]
        if changed:
            await conn.execute(
                "UPDATE rate_limit_buckets k SET tat = r.tat FROM unnest($1::text[], $2::float8[]) AS r(bucket, tat)"
                " WHERE k.bucket = r.bucket",
                changed, [after[name] for name in changed],
            )


async def purge_rate_limits(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    """Forget buckets that are full again (the same as no row); returns how many."""
    status: str = await conn.execute(
        "DELETE FROM rate_limit_buckets WHERE tat < extract(epoch FROM clock_timestamp())"
    )
    return int(status.split()[-1])


async def rate_limit_give_back(conn: asyncpg.Connection | asyncpg.Pool, buckets: Mapping[str, float]) -> None:
    """Give one token back to each bucket (name -> its emission interval in seconds), as if it had not been
    taken: the console's log-in takes an attempt before checking the password and returns it when the
    password was right (only failures count, yet concurrent guesses cannot all pass a check first)."""
    if buckets:
        await conn.execute(
            "UPDATE rate_limit_buckets k SET tat = k.tat - r.emission"
            " FROM unnest($1::text[], $2::float8[]) AS r(bucket, emission) WHERE k.bucket = r.bucket",
            list(buckets), list(buckets.values()),
        )


# =====================================================================================================
# --- bulk import of pre-provisioned devices and CSV export (admin API, routers.imports; migration 0010) --
# =====================================================================================================
# An import job's row holds its progress; the rows of one batch (devices and their credentials) are
# written in one transaction with multi-row statements (unnest), so a batch is all there or not at all.
# The instance running a job holds a session advisory lock on it for as long as it runs: a job still
# 'running' whose lock is free lost its runner (process killed) and is marked failed when read.

#: First key of the two-key advisory locks of import jobs (the second is the job id's hashtext).
_IMPORT_LOCK_CLASS = 16_016


@dataclass(frozen=True)
class ImportRowError:
    """One rejected row of an import: its line in the file, the field (column) and why. Never a value."""

    line: int
    field: str
    reason: str


@dataclass(frozen=True)
class ImportJobRecord:
    id: uuid.UUID
    profile_id: uuid.UUID
    status: str
    on_existing: str
    atomic: bool
    message: str | None
    total: int | None
    processed: int
    created: int
    updated: int
    skipped: int
    rejected: int
    created_at: datetime.datetime
    updated_at: datetime.datetime
    errors: tuple[ImportRowError, ...] = ()


@dataclass(frozen=True)
class ImportCounts:
    processed: int
    created: int
    updated: int
    skipped: int
    rejected: int


@dataclass(frozen=True)
class ImportedDevice:
    """A validated row, its credentials prepared (None: an update that keeps the device's credentials)."""

    line: int
    device_id: uuid.UUID
    name: str
    device_key: str | None
    prepared: PreparedCredentials | None
    value_enc: bytes | None


@dataclass(frozen=True)
class ExistingForImport:
    """What already holds a batch's names, device keys and credentials."""

    #: name -> (device id, profile id)
    names: dict[str, tuple[uuid.UUID, uuid.UUID]]
    #: device key (in the import's profile) -> device id
    device_keys: dict[str, uuid.UUID]
    #: credentials id -> device id
    credentials: dict[str, uuid.UUID]


_IMPORT_JOB = (
    "id, profile_id, status, on_existing, atomic, message, total, processed, created, updated, skipped, rejected,"
    " created_at, updated_at"
)


async def create_import_job(
    conn: asyncpg.Connection | asyncpg.Pool, job_id: uuid.UUID, profile_id: uuid.UUID, *, on_existing: str,
    atomic: bool, total: int,
) -> None:
    await conn.execute(
        "INSERT INTO import_jobs (id, profile_id, on_existing, atomic, total) VALUES ($1, $2, $3, $4, $5)",
        job_id, profile_id, on_existing, atomic, total,
    )


async def hold_import_job(conn: asyncpg.Connection, job_id: uuid.UUID) -> None:
    """Take the job's session advisory lock on ``conn`` (the runner's own connection, kept for the whole job):
    released by Postgres when the connection ends, which is how a dead runner is noticed.

    The connection also plans each statement for its arguments (``plan_cache_mode``; reset when the pool
    takes it back): an import's first statements run against a table the planner may think is empty, and a
    generic plan chosen then (a sequential scan) would be kept while the table grows by the batch."""
    await conn.execute("SELECT pg_advisory_lock($1, hashtext($2))", _IMPORT_LOCK_CLASS, str(job_id))
    await conn.execute("SET plan_cache_mode = force_custom_plan")


async def release_import_job(conn: asyncpg.Connection, job_id: uuid.UUID) -> None:
    await conn.execute("SELECT pg_advisory_unlock($1, hashtext($2))", _IMPORT_LOCK_CLASS, str(job_id))


async def record_import_progress(
    conn: asyncpg.Connection | asyncpg.Pool, job_id: uuid.UUID, counts: ImportCounts,
    errors: Sequence[ImportRowError] = (),
) -> None:
    """Set the job's counters and add rejected rows (a row already recorded is kept)."""
    await conn.execute(
        "WITH errs AS (INSERT INTO import_job_errors (job_id, line, field, reason)"
        "  SELECT $1, * FROM unnest($7::bigint[], $8::text[], $9::text[]) ON CONFLICT DO NOTHING)"
        " UPDATE import_jobs SET processed = $2, created = $3, updated = $4, skipped = $5, rejected = $6,"
        " updated_at = now() WHERE id = $1",
        job_id, counts.processed, counts.created, counts.updated, counts.skipped, counts.rejected,
        [e.line for e in errors], [e.field for e in errors], [e.reason for e in errors],
    )


async def finish_import_job(
    conn: asyncpg.Connection | asyncpg.Pool, job_id: uuid.UUID, status: str, message: str | None = None,
    counts: ImportCounts | None = None,
) -> None:
    if counts is None:
        await conn.execute(
            "UPDATE import_jobs SET status = $2, message = $3, updated_at = now() WHERE id = $1",
            job_id, status, message,
        )
        return
    await conn.execute(
        "UPDATE import_jobs SET status = $2, message = $3, processed = $4, created = $5, updated = $6,"
        " skipped = $7, rejected = $8, updated_at = now() WHERE id = $1",
        job_id, status, message, counts.processed, counts.created, counts.updated, counts.skipped, counts.rejected,
    )


async def import_job(pool: asyncpg.Pool, job_id: uuid.UUID, *, max_errors: int) -> ImportJobRecord | None:
    """A job with its first ``max_errors`` rejected rows (by line). A job 'running' without a runner (its
    advisory lock is free: the process that ran it died) is marked failed first."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(f"SELECT {_IMPORT_JOB} FROM import_jobs WHERE id = $1", job_id)
        if row is None:
            return None
        if row["status"] == "running":
            async with conn.transaction():
                orphan = await conn.fetchval(
                    "SELECT pg_try_advisory_xact_lock($1, hashtext($2))", _IMPORT_LOCK_CLASS, str(job_id)
                )
                if orphan:
                    row = await conn.fetchrow(
                        "UPDATE import_jobs SET status = 'failed', message = $2, updated_at = now()"
                        f" WHERE id = $1 AND status = 'running' RETURNING {_IMPORT_JOB}",
                        job_id, "the admin API instance running the import stopped; rows written before stay"
                        " (re-upload the file to finish: existing devices are skipped)",
                    ) or await conn.fetchrow(f"SELECT {_IMPORT_JOB} FROM import_jobs WHERE id = $1", job_id)
        errors = await conn.fetch(
            "SELECT line, field, reason FROM import_job_errors WHERE job_id = $1 ORDER BY line, field LIMIT $2",
            job_id, max_errors,
        )
    rejected = tuple(ImportRowError(e["line"], e["field"], e["reason"]) for e in errors)
    return ImportJobRecord(**dict(row), errors=rejected)


async def existing_for_import(
    conn: asyncpg.Connection, profile_id: uuid.UUID, names: Sequence[str], device_keys: Sequence[str],
    credentials_ids: Sequence[str],
) -> ExistingForImport:
    """Which of these names (any profile), device keys (this profile) and credentials ids are taken; three
    indexed look-ups in one statement."""
    rows = await conn.fetch(
        "SELECT 'n' AS kind, d.name AS key, d.id, d.profile_id FROM unnest($2::text[]) AS n(name)"
        "  JOIN devices d ON d.name = n.name"
        " UNION ALL SELECT 'k', d.device_key, d.id, d.profile_id FROM unnest($3::text[]) AS k(key)"
        "  JOIN devices d ON d.profile_id = $1 AND d.device_key = k.key"
        " UNION ALL SELECT 'c', c.credentials_id, c.device_id, NULL FROM unnest($4::text[]) AS i(id)"
        "  JOIN device_credentials c ON c.credentials_id = i.id",
        profile_id, list(names), list(device_keys), list(credentials_ids),
    )
    found = ExistingForImport({}, {}, {})
    for row in rows:
        if row["kind"] == "n":
            found.names[row["key"]] = (row["id"], row["profile_id"])
        elif row["kind"] == "k":
            found.device_keys[row["key"]] = row["id"]
        else:
            found.credentials[row["key"]] = row["id"]
    return found


async def write_import_batch(
    conn: asyncpg.Connection, profile_id: uuid.UUID, new: Sequence[ImportedDevice],
    updates: Sequence[ImportedDevice],
) -> None:
    """Create ``new`` devices with their credentials (each device's id is also its default device key) and
    apply ``updates`` (the device key when given; the credentials when given, the replaced ones revoked), in
    the caller's transaction:
    a few multi-row statements. Raises ``asyncpg.UniqueViolationError`` when a name, device key or
    credentials id was taken meanwhile (the caller retries row by row to find which)."""
    if new:
        await conn.execute(
            "INSERT INTO devices (id, name, profile_id, device_key)"
            " SELECT id, name, $1, coalesce(key, id::text) FROM unnest($2::uuid[], $3::text[], $4::text[])"
            " AS r(id, name, key)",
            profile_id, [d.device_id for d in new], [d.name for d in new], [d.device_key for d in new],
        )
    replacing = [d for d in updates if d.prepared is not None]
    if replacing:  # the credentials they replace are revoked, as a rotation's are (migration 0012)
        await conn.execute(
            "INSERT INTO revoked_credentials (credentials_id, credentials_type, device_id)"
            " SELECT c.credentials_id, c.credentials_type, c.device_id FROM device_credentials c"
            " JOIN unnest($1::uuid[], $2::text[]) AS r(id, credentials_id) ON c.device_id = r.id"
            " WHERE c.credentials_id <> r.credentials_id ON CONFLICT DO NOTHING",
            [d.device_id for d in replacing],
            [d.prepared.credentials_id for d in replacing if d.prepared is not None],
        )
    with_credentials = [d for d in (*new, *updates) if d.prepared is not None]
    if with_credentials:
        await conn.execute(
            "INSERT INTO device_credentials (device_id, credentials_type, credentials_id, secret_hash, public_value,"
            " value_enc) SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[],"
            " $6::bytea[]) ON CONFLICT (device_id) DO UPDATE SET credentials_type = EXCLUDED.credentials_type,"
            " credentials_id = EXCLUDED.credentials_id, secret_hash = EXCLUDED.secret_hash,"
            " public_value = EXCLUDED.public_value, value_enc = EXCLUDED.value_enc, created_at = now()",
            [d.device_id for d in with_credentials],
            [d.prepared.credentials_type.value for d in with_credentials if d.prepared is not None],
            [d.prepared.credentials_id for d in with_credentials if d.prepared is not None],
            [d.prepared.secret_hash for d in with_credentials if d.prepared is not None],
            [public_value(d.prepared) for d in with_credentials if d.prepared is not None],
            [d.value_enc for d in with_credentials],
        )
    keyed = [d for d in updates if d.device_key is not None]
    if keyed:
        await conn.execute(
            "UPDATE devices d SET device_key = r.key FROM unnest($1::uuid[], $2::text[]) AS r(id, key)"
            " WHERE d.id = r.id AND d.device_key IS DISTINCT FROM r.key",
            [d.device_id for d in keyed], [d.device_key for d in keyed],
        )


def import_conflict(exc: asyncpg.UniqueViolationError) -> str:
    """Which uniqueness rule a row broke: ``name``, ``device_key`` or ``credentials``."""
    constraint = exc.constraint_name or ""
    if "credentials" in constraint:
        return "credentials"
    if "device_key" in constraint:
        return "device_key"
    return "name"


@dataclass(frozen=True)
class ExportedDevice:
    name: str
    device_key: str
    provision_state: str | None
    credentials_type: str | None
    created_at: datetime.datetime
    #: When the device provisioned itself (the server attribute provisionState's time), ms since the epoch.
    provisioned_ts: int | None


async def export_devices(
    pool: asyncpg.Pool, profile_id: uuid.UUID, *, chunk: int = 1000
) -> AsyncIterator[list[ExportedDevice]]:
    """The devices of a profile (oldest first) in chunks of ``chunk``, read through a server-side cursor in
    one read-only transaction (an async iterator of lists of :class:`ExportedDevice`)."""
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        cursor = await conn.cursor(
            "SELECT d.name, d.device_key, d.provision_state, c.credentials_type, d.created_at,"
            " a.last_update_ts AS provisioned_ts FROM devices d"
            " LEFT JOIN device_credentials c ON c.device_id = d.id"
            " LEFT JOIN device_attributes a ON a.device_id = d.id AND a.scope = 'server' AND a.key = 'provisionState'"
            " WHERE d.profile_id = $1 ORDER BY d.created_at, d.id",
            profile_id,
        )
        while True:
            rows = await cursor.fetch(chunk)
            if not rows:
                return
            yield [ExportedDevice(**dict(row)) for row in rows]


# --- provisioning events (provisioning_common.events; migration 0011) ------------------------------------

_EVENT_COLUMNS = ("time", "outcome", "reason", "transport", "dialect", "source_address", "profile_id", "device_id",
                  "device_name", "request_id", "latency_ms")


async def insert_provision_events(pool: asyncpg.Pool, events: Sequence[ProvisionEvent]) -> None:
    """Store a batch of events with one ``COPY`` (provisioning-core's EventWriter, off the hot path)."""
    records = [(e.time, e.outcome.value, e.reason.value, e.transport.value, e.dialect.value if e.dialect else None,
                e.source_address, e.device_profile_id, e.device_id, e.device_name, e.request_id, e.latency_ms)
               for e in events]
    async with pool.acquire() as conn:
        await conn.copy_records_to_table("provision_events", records=records, columns=_EVENT_COLUMNS)


@dataclass(frozen=True)
class EventFilter:
    """The admin API's filters of ``GET /api/provision-events`` (None: not filtered)."""

    outcome: str | None = None
    reason: str | None = None
    profile_id: uuid.UUID | None = None
    device_name: str | None = None
    transport: str | None = None
    since: datetime.datetime | None = None
    until: datetime.datetime | None = None


async def list_provision_events(
    conn: asyncpg.Connection | asyncpg.Pool, where: EventFilter, *, limit: int, offset: int
) -> tuple[list[ProvisionEvent], int]:
    """One page of events, newest first, and how many match in all. ``since`` inclusive, ``until`` exclusive."""
    clauses: list[str] = []
    args: list[Any] = []
    for column, value, op in (("outcome", where.outcome, "="), ("reason", where.reason, "="),
                              ("profile_id", where.profile_id, "="), ("device_name", where.device_name, "="),
                              ("transport", where.transport, "="), ("time", where.since, ">="),
                              ("time", where.until, "<")):
        if value is not None:
            args.append(value)
            clauses.append(f"{column} {op} ${len(args)}")
    clause = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    total = await conn.fetchval(f"SELECT count(*) FROM provision_events{clause}", *args)
    rows = await conn.fetch(
        f"SELECT {', '.join(_EVENT_COLUMNS)} FROM provision_events{clause}"
        f" ORDER BY time DESC, id DESC LIMIT ${len(args) + 1} OFFSET ${len(args) + 2}",
        *args, limit, offset,
    )
    events = [ProvisionEvent(time=r["time"], outcome=r["outcome"], reason=r["reason"], transport=r["transport"],
                             dialect=r["dialect"], source_address=r["source_address"],
                             device_profile_id=r["profile_id"], device_id=r["device_id"],
                             device_name=r["device_name"], request_id=r["request_id"], latency_ms=r["latency_ms"])
              for r in rows]
    return events, int(total)


async def purge_provision_events(conn: asyncpg.Connection | asyncpg.Pool, older_than_days: float) -> int:
    """Delete the events older than the retention (PROVISION_EVENTS_RETENTION_DAYS); returns how many."""
    status = await conn.execute(
        "DELETE FROM provision_events WHERE time < now() - make_interval(secs => $1)", older_than_days * 86400.0
    )
    return int(status.split()[-1])


# --- console sessions (admin API's operator console, services/admin_api/console; migration 0014) --------


async def operator_for_login(
    conn: asyncpg.Connection | asyncpg.Pool, username: str
) -> tuple[Operator, str | None] | None:
    """The enabled operator with this user name and their password hash (None: no password), or None."""
    row = await conn.fetchrow(f"{_OPERATOR.replace('SELECT ', 'SELECT password_hash, ', 1)}"
                              " WHERE username = $1 AND NOT disabled", username)
    if row is None:
        return None
    fields = dict(row)
    password_hash = fields.pop("password_hash")
    return Operator(**fields), password_hash


async def create_console_session(
    conn: asyncpg.Connection | asyncpg.Pool, *, id_hash: str, operator_id: uuid.UUID, csrf_token: str,
    idle_s: float, max_s: float,
) -> None:
    """A new session (sessions already expired are deleted on the way)."""
    await conn.execute(
        "DELETE FROM console_sessions WHERE expires_at < now() OR last_seen_at < now() - make_interval(secs => $1)",
        float(idle_s),
    )
    await conn.execute(
        "INSERT INTO console_sessions (id_hash, operator_id, csrf_token, expires_at)"
        " VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
        id_hash, operator_id, csrf_token, float(max_s),
    )


async def use_console_session(
    conn: asyncpg.Connection | asyncpg.Pool, id_hash: str, idle_s: float
) -> tuple[Operator, str] | None:
    """The enabled operator of a live session and its CSRF token (the session's idle clock restarts), or None
    when there is no such session, it has expired (idle or absolute) or its operator is disabled."""
    row = await conn.fetchrow(
        "UPDATE console_sessions s SET last_seen_at = now() FROM operators o"
        " WHERE s.id_hash = $1 AND o.id = s.operator_id AND NOT o.disabled AND s.expires_at > now()"
        " AND s.last_seen_at > now() - make_interval(secs => $2)"
        " RETURNING o.id, o.username, o.role, o.disabled, o.created_at, s.csrf_token",
        id_hash, float(idle_s),
    )
    if row is None:
        return None
    fields = dict(row)
    csrf = fields.pop("csrf_token")
    return Operator(**fields), csrf


async def console_session_left(conn: asyncpg.Connection | asyncpg.Pool, id_hash: str, idle_s: float) -> float | None:
    """Seconds until a live session ends (idle or absolute), or None as :func:`use_console_session` would refuse
    it, *without* restarting its idle clock: the console's live activity page asks this while it watches, and
    watching alone must not keep a session alive."""
    left = await conn.fetchval(
        "SELECT least(extract(epoch FROM s.last_seen_at + make_interval(secs => $2) - now()),"
        " extract(epoch FROM s.expires_at - now()))::float8"
        " FROM console_sessions s JOIN operators o ON o.id = s.operator_id"
        " WHERE s.id_hash = $1 AND NOT o.disabled AND s.expires_at > now()"
        " AND s.last_seen_at > now() - make_interval(secs => $2)",
        id_hash, float(idle_s),
    )
    return None if left is None else float(left)


async def delete_console_session(conn: asyncpg.Connection | asyncpg.Pool, id_hash: str) -> None:
    await conn.execute("DELETE FROM console_sessions WHERE id_hash = $1", id_hash)
