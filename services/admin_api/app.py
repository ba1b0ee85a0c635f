"""The admin API application: device profiles, pre-provisioned devices, device attributes and server-side
RPC (``/api``), and its probes.

This module only assembles: the lifespan opens the Postgres pool and the bus connection onto
``app.state`` (handed to routes by ``dependencies``), ``errors`` gives every error one shape and turns a
database outage into 503, and the routers (``routers.profiles``, ``routers.devices``, ``routers.attributes``,
``routers.rpc``, ``routers.imports``: bulk import and export) serve ``/api``
behind the bearer token. The SQL is in ``provisioning_common.db.repository``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from provisioning_common import health
from provisioning_common.bus import Bus
from provisioning_common.db import repository
from provisioning_common.db.migrate import create_pool
from provisioning_common.secretbox import SecretBox
from provisioning_common.settings import Settings

from . import console, errors
from .audit import AuditLog
from .auth import authenticate
from .dependencies import AdminContext
from .routers import attributes, credentials, devices, events, imports, operators, profiles, rpc


def create_app(settings: Settings) -> FastAPI:
    if settings.admin_api_token is None or not settings.admin_api_token.get_secret_value():
        raise SystemExit("ADMIN_API_TOKEN is required")
    if settings.data_encryption_key is None:
        raise SystemExit("DATA_ENCRYPTION_KEY is required (shared with provisioning_core)")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool = await create_pool(
            settings.database_url.get_secret_value(), min_size=1, max_size=settings.db_pool_max
        )
        # Provision secrets stored in clear before migration 0008 are encrypted now (the core does it too).
        await repository.seal_profile_secrets(app.state.pool, app.state.admin.box.encrypt_json)
        app.state.bus = await Bus.connect(settings, "admin_api")
        yield
        await imports.stop_imports(app)  # imports still running are marked failed and give their connection back
        await app.state.bus.close()
        await app.state.pool.close()

    app = FastAPI(title="Provisioning admin API", lifespan=lifespan)
    app.state.admin = AdminContext(
        expected_authorization=f"Bearer {settings.admin_api_token.get_secret_value()}".encode(),
        box=SecretBox(settings.data_encryption_key.get_secret_value()),
        settings=settings,
    )
    errors.install(app)

    # Every /api call: who calls and whether their role may (auth.required_role); every change is audited.
    api = APIRouter(prefix="/api", dependencies=[Depends(authenticate)])
    api.include_router(profiles.router)
    api.include_router(imports.router)  # before devices: /devices/export is not a device id
    api.include_router(devices.router)
    api.include_router(credentials.router)  # /devices/{id}/credentials/revoke|rotate
    api.include_router(attributes.router)
    api.include_router(rpc.router)
    api.include_router(events.router)  # /api/provision-events (README "Provisioning events")
    api.include_router(operators.router)  # /api/operators, /api/audit
    app.include_router(api)
    console.mount(app)  # /console/: the operator console (README "Web console")
    app.add_middleware(AuditLog)

    def pool() -> Any:
        return app.state.pool

    # Readiness: Postgres answers (the bus is only needed to create a device); liveness: the event loop answers.
    health.mount(app, health.pool_check(pool))

    return app
