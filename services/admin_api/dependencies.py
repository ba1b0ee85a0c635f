"""What the admin API's routes depend on, put on ``app.state`` by the application and handed out by FastAPI.

``AdminContext`` holds what is fixed at start-up (the bearer token expected, the secret box, the settings); the pool and
the bus are opened by the application's lifespan. Routes declare them as parameters (``pool: Pool``,
``bus: BusDep``, ``box: Box``), so no route reaches into a closure or a global.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from provisioning_common.bus import Bus
from provisioning_common.secretbox import SecretBox
from provisioning_common.settings import Settings


@dataclass(frozen=True)
class AdminContext:
    #: ``Bearer <ADMIN_API_TOKEN>``, as the Authorization header reads for the shared token (auth.authenticate).
    expected_authorization: bytes
    box: SecretBox
    settings: Settings


def context(request: Request) -> AdminContext:
    ctx: AdminContext = request.app.state.admin
    return ctx


def get_pool(request: Request) -> Any:
    """The asyncpg pool the lifespan opened (``asyncpg.Pool``; asyncpg has no type information)."""
    return request.app.state.pool


def get_bus(request: Request) -> Bus:
    bus: Bus = request.app.state.bus
    return bus


def get_box(request: Request) -> SecretBox:
    return context(request).box


def get_settings(request: Request) -> Settings:
    return context(request).settings


Pool = Annotated[Any, Depends(get_pool)]
BusDep = Annotated[Bus, Depends(get_bus)]
Box = Annotated[SecretBox, Depends(get_box)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def api_error(status: int, message: str) -> HTTPException:
    """An error answered as ``{"status": <status>, "message": <message>}`` (see ``errors``)."""
    return HTTPException(status_code=status, detail=message)
