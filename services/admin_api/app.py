"""Admin API routes: CRUD on device profiles, pre-provisioned devices, and device look-ups."""

from __future__ import annotations

import contextlib
import hmac
import secrets
import string
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from provisioning_common.bus import CREDENTIALS_SERVICE, Bus, RpcError
from provisioning_common.db import repository
from provisioning_common.db.migrate import create_pool
from provisioning_common.models import (
    CredentialsType,
    PrepareCredentialsRequest,
    PrepareCredentialsResult,
    ProvisionStrategy,
    SuppliedCredentials,
)
from provisioning_common.secretbox import SecretBox
from provisioning_common.settings import Settings

from .schemas import CredentialsIn, DeviceIn, DeviceProfileIn, Page

_KEY_ALPHABET = string.digits + string.ascii_lowercase


def generate_profile_secret() -> str:
    """20 characters of [0-9a-z], like ThingsBoard's UI generates provision keys and secrets."""
    return "".join(secrets.choice(_KEY_ALPHABET) for _ in range(20))


def _profile_dict(row: Any) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "name": row["name"],
        "provisionStrategy": row["provision_strategy"],
        "provisionDeviceKey": row["provision_key"],
        "provisionDeviceSecret": row["provision_secret"],
        "createdTime": int(row["created_at"].timestamp() * 1000),
    }


def _error(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def _supplied(creds: CredentialsIn | None) -> tuple[CredentialsType, SuppliedCredentials]:
    """Map the admin body's credentials to the fields a device would send (spec §1)."""
    if creds is None or creds.credentials_value is None:
        return CredentialsType.ACCESS_TOKEN, SuppliedCredentials()
    value = creds.credentials_value
    ctype = creds.credentials_type
    if ctype is CredentialsType.MQTT_BASIC:
        if not isinstance(value, dict):
            raise _error(400, "MQTT_BASIC credentialsValue must be an object {clientId, userName, password}")
        unknown = set(value) - {"clientId", "userName", "password"}
        if unknown:
            raise _error(400, f"unknown MQTT_BASIC fields: {', '.join(sorted(unknown))}")
        return ctype, SuppliedCredentials(
            client_id=value.get("clientId", ""), username=value.get("userName", ""), password=value.get("password", "")
        )
    if not isinstance(value, str) or not value:
        raise _error(400, f"{ctype.value} credentialsValue must be a non-empty string")
    if ctype is CredentialsType.ACCESS_TOKEN:
        return ctype, SuppliedCredentials(token=value)
    if ctype is CredentialsType.X509_CERTIFICATE:
        return ctype, SuppliedCredentials(certificate=value)
    raise _error(400, f"credentialsType {ctype.value} is not supported")


def create_app(settings: Settings) -> FastAPI:
    if settings.admin_api_token is None or not settings.admin_api_token.get_secret_value():
        raise SystemExit("ADMIN_API_TOKEN is required")
    if settings.data_encryption_key is None:
        raise SystemExit("DATA_ENCRYPTION_KEY is required (shared with provisioning_core)")
    expected_auth = f"Bearer {settings.admin_api_token.get_secret_value()}".encode()
    box = SecretBox(settings.data_encryption_key.get_secret_value())
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["pool"] = await create_pool(
            settings.database_url.get_secret_value(), min_size=1, max_size=settings.db_pool_max
        )
        state["bus"] = await Bus.connect(settings)
        yield
        await state["bus"].close()
        await state["pool"].close()

    async def require_token(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected_auth):
            raise HTTPException(status_code=401, detail="Missing or invalid bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="Provisioning admin API", lifespan=lifespan)
    api = APIRouter(prefix="/api", dependencies=[Depends(require_token)])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"status": exc.status_code, "message": exc.detail}, status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return JSONResponse({"status": 400, "message": "; ".join(parts)}, status_code=400)

    def pool() -> asyncpg.Pool:
        return state["pool"]

    # --- device profiles ---------------------------------------------------------------

    def _key_secret(body: DeviceProfileIn) -> tuple[str | None, str | None]:
        if body.provision_strategy is ProvisionStrategy.DISABLED:
            return body.provision_device_key, body.provision_device_secret
        return (body.provision_device_key or generate_profile_secret(),
                body.provision_device_secret or generate_profile_secret())

    async def _write_profile(sql: str, *args: Any) -> Any:
        try:
            row = await pool().fetchrow(sql, *args)
        except asyncpg.UniqueViolationError as exc:
            if "provision_key" in (exc.constraint_name or ""):
                raise _error(409, "Device profile with such provision device key already exists!") from None
            raise _error(409, "Device profile with such name already exists!") from None
        return row

    @api.post("/device-profiles", status_code=201)
    async def create_profile(body: DeviceProfileIn) -> dict[str, Any]:
        key, secret = _key_secret(body)
        row = await _write_profile(
            "INSERT INTO device_profiles (id, name, provision_strategy, provision_key, provision_secret)"
            " VALUES ($1, $2, $3, $4, $5) RETURNING *",
            uuid.uuid4(), body.name, body.provision_strategy.value, key, secret,
        )
        return _profile_dict(row)

    @api.get("/device-profiles")
    async def list_profiles(page: int = Query(0, ge=0), pageSize: int = Query(100, ge=1, le=1000)) -> Page:
        rows = await pool().fetch(
            "SELECT *, count(*) OVER () AS total FROM device_profiles ORDER BY created_at, id LIMIT $1 OFFSET $2",
            pageSize, page * pageSize,
        )
        total = rows[0]["total"] if rows else await pool().fetchval("SELECT count(*) FROM device_profiles")
        return Page(data=[_profile_dict(r) for r in rows], totalElements=total,
                    hasNext=(page + 1) * pageSize < total)

    async def _profile_or_404(profile_id: uuid.UUID) -> Any:
        row = await pool().fetchrow("SELECT * FROM device_profiles WHERE id = $1", profile_id)
        if row is None:
            raise _error(404, f"Device profile {profile_id} not found")
        return row

    @api.get("/device-profiles/{profile_id}")
    async def get_profile(profile_id: uuid.UUID) -> dict[str, Any]:
        return _profile_dict(await _profile_or_404(profile_id))

    @api.put("/device-profiles/{profile_id}")
    async def update_profile(profile_id: uuid.UUID, body: DeviceProfileIn) -> dict[str, Any]:
        await _profile_or_404(profile_id)
        key, secret = _key_secret(body)
        row = await _write_profile(
            "UPDATE device_profiles SET name = $2, provision_strategy = $3, provision_key = $4,"
            " provision_secret = $5, updated_at = now() WHERE id = $1 RETURNING *",
            profile_id, body.name, body.provision_strategy.value, key, secret,
        )
        return _profile_dict(row)

    @api.delete("/device-profiles/{profile_id}", status_code=204)
    async def delete_profile(profile_id: uuid.UUID) -> Response:
        await _profile_or_404(profile_id)
        try:
            await pool().execute("DELETE FROM device_profiles WHERE id = $1", profile_id)
        except asyncpg.ForeignKeyViolationError:
            raise _error(409, "The device profile is referenced by devices; delete them first") from None
        return Response(status_code=204)

    # --- devices -----------------------------------------------------------------------

    @api.post("/devices", status_code=201)
    async def create_device(body: DeviceIn) -> dict[str, Any]:
        await _profile_or_404_as_400(body.device_profile_id)
        ctype, supplied = _supplied(body.credentials)
        try:
            reply = await state["bus"].call(
                CREDENTIALS_SERVICE, "prepare",
                PrepareCredentialsRequest(credentials_type=ctype, credentials=supplied),
                PrepareCredentialsResult,
            )
        except RpcError:
            raise _error(503, "credentials service unavailable") from None
        if not reply.ok or reply.prepared is None:
            raise _error(400, reply.error_message or "invalid credentials")
        prepared = reply.prepared
        device_id = uuid.uuid4()
        async with pool().acquire() as conn:
            try:
                await repository.insert_device(
                    conn, device_id=device_id, name=body.name, profile_id=body.device_profile_id,
                    device_key=body.device_key or str(device_id), gateway=False, provision_state=None,
                    prepared=prepared, value_enc=box.encrypt_json(prepared.response_value),
                )
            except repository.DeviceConflict as exc:
                message = {
                    "name": "Device with such name already exists!",
                    "device_key": "Device with such deviceKey already exists in this profile!",
                    "credentials": "Device credentials are already assigned to another device!",
                }[exc.what]
                raise _error(409, message) from None
            row = await conn.fetchrow(repository.DEVICE_SELECT + " WHERE d.id = $1", device_id)
        device = repository.device_row_to_dict(row)
        # Shown once, like a newly created device in ThingsBoard's UI.
        device["credentials"] = {"credentialsType": prepared.credentials_type.value,
                                 "credentialsValue": prepared.response_value}
        return device

    async def _profile_or_404_as_400(profile_id: uuid.UUID) -> None:
        if not await pool().fetchval("SELECT 1 FROM device_profiles WHERE id = $1", profile_id):
            raise _error(400, f"deviceProfileId {profile_id} does not exist")

    @api.get("/devices/{device_id}")
    async def get_device(device_id: uuid.UUID) -> dict[str, Any]:
        row = await pool().fetchrow(repository.DEVICE_SELECT + " WHERE d.id = $1", device_id)
        if row is None:
            raise _error(404, f"Device {device_id} not found")
        return repository.device_row_to_dict(row)

    @api.get("/devices")
    async def list_devices(
        deviceProfileId: uuid.UUID | None = None,
        textSearch: str | None = Query(None, max_length=255),
        page: int = Query(0, ge=0),
        pageSize: int = Query(100, ge=1, le=1000),
    ) -> Page:
        where, args = [], []
        if deviceProfileId is not None:
            args.append(deviceProfileId)
            where.append(f"d.profile_id = ${len(args)}")
        if textSearch:
            escaped = textSearch.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            args.append(f"%{escaped}%")
            where.append(f"d.name ILIKE ${len(args)}")
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        total = await pool().fetchval(f"SELECT count(*) FROM devices d{clause}", *args)
        rows = await pool().fetch(
            f"{repository.DEVICE_SELECT}{clause} ORDER BY d.created_at, d.id LIMIT ${len(args) + 1}"
            f" OFFSET ${len(args) + 2}", *args, pageSize, page * pageSize,
        )
        return Page(data=[repository.device_row_to_dict(r) for r in rows], totalElements=total,
                    hasNext=(page + 1) * pageSize < total)

    @api.delete("/devices/{device_id}", status_code=204)
    async def delete_device(device_id: uuid.UUID) -> Response:
        status = await pool().execute("DELETE FROM devices WHERE id = $1", device_id)
        if status.endswith(" 0"):
            raise _error(404, f"Device {device_id} not found")
        return Response(status_code=204)

    app.include_router(api)

    @app.get("/health")
    async def health() -> Response:
        try:
            await pool().fetchval("SELECT 1")
        except Exception:
            return JSONResponse({"status": "DOWN"}, status_code=503)
        return JSONResponse({"status": "UP"})

    return app

