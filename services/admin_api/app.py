"""Admin API routes: CRUD on device profiles, pre-provisioned devices, and device look-ups."""

from __future__ import annotations

import contextlib
import hmac
import logging
import re
import secrets
import string
import uuid
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from provisioning_common import health
from provisioning_common.bus import Bus, RpcError
from provisioning_common.certificates import (
    CertificateRefused,
    check_ca,
    load_pem_chain,
    load_signing_pair,
    name_hash,
    tb_sha3,
    to_pem,
)
from provisioning_common.contract import PREPARE
from provisioning_common.db import repository
from provisioning_common.db.guard import DB_UNAVAILABLE
from provisioning_common.db.migrate import create_pool
from provisioning_common.dialects.limits import field_problem
from provisioning_common.models import (
    CredentialsType,
    PrepareCredentialsRequest,
    ProvisionStrategy,
    SuppliedCredentials,
)
from provisioning_common.outage import OutageLog
from provisioning_common.secretbox import SecretBox
from provisioning_common.settings import Settings
from starlette.exceptions import HTTPException as StarletteHTTPException

from .schemas import (
    MAX_PAGE,
    MAX_PAGE_SIZE,
    NO_CONTROLS,
    PATTERN_MESSAGES,
    CredentialsIn,
    DeviceIn,
    DeviceProfileIn,
    Page,
)

_KEY_ALPHABET = string.digits + string.ascii_lowercase


def generate_profile_secret() -> str:
    """20 characters of [0-9a-z], like ThingsBoard's UI generates provision keys and secrets."""
    return "".join(secrets.choice(_KEY_ALPHABET) for _ in range(20))


def _profile_dict(row: Any) -> dict[str, Any]:
    profile = {
        "id": str(row["id"]),
        "name": row["name"],
        "provisionStrategy": row["provision_strategy"],
        "provisionDeviceKey": row["provision_key"],
        "provisionDeviceSecret": row["provision_secret"],
        "createdTime": int(row["created_at"].timestamp() * 1000),
    }
    if row["provision_strategy"] == ProvisionStrategy.X509_CERTIFICATE_CHAIN.value:
        profile.update(
            certificatePem=row["certificate_pem"],
            certificateRegExPattern=row["certificate_regex"],
            allowCreateNewDevicesByX509Certificate=row["allow_create_by_x509"],
        )
    if row["signing_certificate_pem"]:
        profile.update(
            signingCertificatePem=row["signing_certificate_pem"],
            hasSigningKey=row["signing_key_enc"] is not None,
            issuedCertificateValidityDays=row["issued_validity_days"],
        )
    return profile


@dataclass(frozen=True)
class _ProfileColumns:
    """Everything stored for a profile body, validated: key/secret, CA index, encrypted signing key."""

    key: str | None
    secret: str | None
    certificate_pem: str | None
    certificate_regex: str | None
    ca_subject_hash: str | None
    signing_certificate_pem: str | None
    signing_key_enc: str | None

    def args(self) -> tuple[Any, ...]:
        return (self.key, self.secret, self.certificate_pem, self.certificate_regex, self.ca_subject_hash,
                self.signing_certificate_pem, self.signing_key_enc)


def _profile_columns(body: DeviceProfileIn, box: SecretBox, existing: Any | None = None) -> _ProfileColumns:
    """Validate a profile body into its stored columns; HTTP 400 with the reason when it is not valid."""
    key, secret = body.provision_device_key, body.provision_device_secret
    certificate_pem = regex = ca_hash = None
    if body.provision_strategy is ProvisionStrategy.X509_CERTIFICATE_CHAIN:
        if not body.certificate_pem:
            raise _error(400, "certificatePem is required for X509_CERTIFICATE_CHAIN")
        try:
            ca = load_pem_chain(body.certificate_pem)[0]
            check_ca(ca, "certificatePem")
        except ValueError as exc:  # CertificateRefused is a ValueError
            raise _error(400, f"certificatePem: {exc}") from None
        try:
            with warnings.catch_warnings():  # e.g. "possible nested set": the admin gets errors, not log lines
                warnings.simplefilter("ignore")
                groups = re.compile(body.certificate_regex).groups
        except re.error as exc:
            raise _error(400, f"certificateRegExPattern is not a valid regular expression: {exc}") from None
        except (OverflowError, RecursionError):  # a repeat count over 2**32, thousands of nested groups
            raise _error(400, "certificateRegExPattern is not a valid regular expression: too large") from None
        if groups < 1:
            raise _error(400, "certificateRegExPattern needs a capture group for the device name")
        certificate_pem, regex, ca_hash = to_pem(ca), body.certificate_regex, name_hash(ca.subject)
        # As ThingsBoard: the profile's provision key is the CA's hash (unique), with no secret, so
        # JSON provision requests cannot use this profile.
        key, secret = tb_sha3(certificate_pem), None
    elif body.provision_strategy is not ProvisionStrategy.DISABLED:
        key, secret = key or generate_profile_secret(), secret or generate_profile_secret()
    signing_pem = signing_enc = None
    if body.signing_certificate_pem or body.signing_key_pem:
        signing_pem = body.signing_certificate_pem
        key_pem = body.signing_key_pem
        if key_pem is None and existing is not None and existing["signing_certificate_pem"] == signing_pem:
            signing_enc = existing["signing_key_enc"]  # unchanged CA: keep the stored key
        elif not signing_pem or not key_pem:
            raise _error(400, "signingCertificatePem and signingKeyPem go together")
        else:
            try:
                load_signing_pair(signing_pem, key_pem)
            except CertificateRefused as exc:
                raise _error(400, str(exc)) from None
            signing_enc = box.encrypt_json(key_pem).decode()
    return _ProfileColumns(key, secret, certificate_pem, regex, ca_hash, signing_pem, signing_enc)


def _error(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def _checked(field: str, value: str, name: str) -> str:
    """``value`` if it is within the provisioning limit of ``field`` (dialects/limits.py), else HTTP 400."""
    problem = field_problem(field, value)
    if problem:
        raise _error(400, f"{name} {problem}")
    return value


def _supplied(creds: CredentialsIn | None) -> tuple[CredentialsType, SuppliedCredentials]:
    """Map the admin body's credentials to the fields a device would send (spec §1), within the same
    limits as a device's own request."""
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
            client_id=_checked("client_id", value.get("clientId", ""), "credentialsValue.clientId"),
            username=_checked("username", value.get("userName", ""), "credentialsValue.userName"),
            password=_checked("password", value.get("password", ""), "credentialsValue.password"),
        )
    if not isinstance(value, str) or not value:
        raise _error(400, f"{ctype.value} credentialsValue must be a non-empty string")
    if ctype is CredentialsType.ACCESS_TOKEN:
        return ctype, SuppliedCredentials(token=_checked("token", value, "credentialsValue"))
    if ctype is CredentialsType.X509_CERTIFICATE:
        return ctype, SuppliedCredentials(certificate=_checked("certificate", value, "credentialsValue"))
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
        state["bus"] = await Bus.connect(settings, "admin_api")
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
            msg = PATTERN_MESSAGES.get((err.get("ctx") or {}).get("pattern"), err.get("msg"))
            parts.append(f"{where}: {msg}" if where else str(msg))
        return JSONResponse({"status": 400, "message": "; ".join(parts)}, status_code=400)

    db_outage = OutageLog(logging.getLogger("admin_api"), "Postgres")

    async def database_unavailable(_: Request, exc: Exception) -> JSONResponse:
        """Postgres down or restarting: 503 "retry later", one WARNING per outage, no traceback."""
        db_outage.failed(type(exc).__name__)
        return JSONResponse({"status": 503, "message": "database unavailable; retry later"}, status_code=503,
                            headers={"Retry-After": "1"})

    for exc_type in DB_UNAVAILABLE:
        app.add_exception_handler(exc_type, database_unavailable)

    @app.middleware("http")
    async def database_back(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        if db_outage.down and response.status_code < 500:
            db_outage.recovered()
        return response

    def pool() -> asyncpg.Pool:
        return state["pool"]

    # --- device profiles ---------------------------------------------------------------

    async def _write_profile(sql: str, *args: Any) -> Any:
        try:
            row = await pool().fetchrow(sql, *args)
        except asyncpg.UniqueViolationError as exc:
            if "provision_key" in (exc.constraint_name or ""):
                if args[2] == ProvisionStrategy.X509_CERTIFICATE_CHAIN.value:
                    raise _error(409, "Device profile with such certificate already exists!") from None
                raise _error(409, "Device profile with such provision device key already exists!") from None
            raise _error(409, "Device profile with such name already exists!") from None
        return row

    _PROFILE_FIELDS = (
        "name, provision_strategy, provision_key, provision_secret, certificate_pem, certificate_regex,"
        " ca_subject_hash, signing_certificate_pem, signing_key_enc, allow_create_by_x509, issued_validity_days"
    )

    @api.post("/device-profiles", status_code=201)
    async def create_profile(body: DeviceProfileIn) -> dict[str, Any]:
        columns = _profile_columns(body, box)
        row = await _write_profile(
            f"INSERT INTO device_profiles (id, {_PROFILE_FIELDS})"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING *",
            uuid.uuid4(), body.name, body.provision_strategy.value, *columns.args(),
            body.allow_create_by_x509, body.issued_validity_days,
        )
        return _profile_dict(row)

    @api.get("/device-profiles")
    async def list_profiles(
        page: int = Query(0, ge=0, le=MAX_PAGE), pageSize: int = Query(100, ge=1, le=MAX_PAGE_SIZE)
    ) -> Page:
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
        existing = await _profile_or_404(profile_id)
        columns = _profile_columns(body, box, existing)
        row = await _write_profile(
            "UPDATE device_profiles SET (" + _PROFILE_FIELDS + ", updated_at) ="
            " ($2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, now()) WHERE id = $1 RETURNING *",
            profile_id, body.name, body.provision_strategy.value, *columns.args(),
            body.allow_create_by_x509, body.issued_validity_days,
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
            bus: Bus = state["bus"]
            reply = await bus.call(PREPARE, PrepareCredentialsRequest(credentials_type=ctype, credentials=supplied))
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
        textSearch: str | None = Query(None, max_length=255, pattern=NO_CONTROLS),
        page: int = Query(0, ge=0, le=MAX_PAGE),
        pageSize: int = Query(100, ge=1, le=MAX_PAGE_SIZE),
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

    # Readiness: Postgres answers (the bus is only needed to create a device); liveness: the event loop answers.
    health.mount(app, health.pool_check(pool))

    return app

