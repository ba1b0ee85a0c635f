"""The admin API assembled from its routers: bearer token, one error shape, bounded pagination, control
characters refused, and a Postgres outage answered 503 + Retry-After with one WARNING (no database needed:
the pool is a stand-in the test controls)."""

from __future__ import annotations

import datetime
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from admin_api.app import create_app
from provisioning_common.secretbox import generate_key
from provisioning_common.settings import Settings
from pydantic import SecretStr

TOKEN = "unit-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class _Pool:
    """Answers the profile list from ``rows``; raises ``error`` instead while it is set."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.rows: list[dict[str, Any]] = []

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        if self.error is not None:
            raise self.error
        return self.rows

    async def fetchval(self, sql: str, *args: Any) -> Any:
        if self.error is not None:
            raise self.error
        return len(self.rows) if "count" in sql else 1

    async def fetchrow(self, sql: str, *args: Any) -> None:
        """No operator has the token asked for (auth.authenticate)."""
        if self.error is not None:
            raise self.error
        return None

    async def execute(self, sql: str, *args: Any) -> str:
        """Audit entries (audit.AuditLog) are taken and forgotten."""
        if self.error is not None:
            raise self.error
        return "INSERT 0 1"


@pytest.fixture
async def admin() -> AsyncIterator[tuple[httpx.AsyncClient, _Pool]]:
    settings = Settings(admin_api_token=SecretStr(TOKEN), data_encryption_key=SecretStr(generate_key()))
    app = create_app(settings)
    pool = _Pool()
    app.state.pool = pool  # ASGITransport runs no lifespan: the test's pool stands in for Postgres
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://admin") as client:
        yield client, pool


async def test_every_api_route_needs_the_bearer_token(admin: tuple[httpx.AsyncClient, _Pool]) -> None:
    client, _ = admin
    for method, path in (("GET", "/api/device-profiles"), ("POST", "/api/devices"),
                         ("DELETE", f"/api/devices/{uuid.uuid4()}"), ("GET", f"/api/device-profiles/{uuid.uuid4()}")):
        response = await client.request(method, path, headers={"Authorization": "Bearer wrong"})
        assert response.status_code == 401, (method, path)
        assert response.json() == {"status": 401, "message": "Missing or invalid bearer token"}
        assert response.headers["www-authenticate"] == "Bearer"


async def test_profiles_are_listed_by_page(admin: tuple[httpx.AsyncClient, _Pool]) -> None:
    client, pool = admin
    created = datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC)
    box = client._transport.app.state.admin.box  # type: ignore[attr-defined]
    pool.rows = [{
        "id": uuid.UUID(int=1), "created_at": created, "name": "p", "provision_strategy": "ALLOW_CREATE_NEW_DEVICES",
        "provision_key": "k", "provision_secret_enc": box.encrypt_json("s"), "certificate_pem": None,
        "certificate_regex": None, "ca_subject_hash": None, "signing_certificate_pem": None, "signing_key_enc": None,
        "allow_create_by_x509": True, "issued_validity_days": 365, "allow_weak_tokens": False,
        "reprovision_policy": "NEVER", "hook_url": None, "hook_secret_enc": None, "hook_timeout_ms": 2000,
        "hook_fail_open": False, "total": 1,
    }]
    response = await client.get("/api/device-profiles", params={"pageSize": 1}, headers=AUTH)
    assert response.status_code == 200
    assert response.json() == {"data": [{
        "id": str(uuid.UUID(int=1)), "name": "p", "provisionStrategy": "ALLOW_CREATE_NEW_DEVICES",
        "provisionDeviceKey": "k", "provisionDeviceSecret": "s", "allowWeakTokens": False,
        "reprovisionPolicy": "NEVER", "provisionHook": None,
        "createdTime": int(created.timestamp() * 1000),
    }], "totalElements": 1, "hasNext": False}


@pytest.mark.parametrize(("path", "params", "message"), [
    ("/api/device-profiles", {"pageSize": "1001"}, "query.pageSize: Input should be less than or equal to 1000"),
    ("/api/devices", {"page": "-1"}, "query.page: Input should be greater than or equal to 0"),
    ("/api/devices", {"textSearch": "a\x01b"}, "query.textSearch: must not contain control characters"),
])
async def test_bad_queries_are_400_in_the_error_shape(
    admin: tuple[httpx.AsyncClient, _Pool], path: str, params: dict[str, str], message: str
) -> None:
    client, _ = admin
    response = await client.get(path, params=params, headers=AUTH)
    assert (response.status_code, response.json()) == (400, {"status": 400, "message": message})


async def test_a_database_outage_is_503_retry_later_with_one_warning(
    admin: tuple[httpx.AsyncClient, _Pool], caplog: pytest.LogCaptureFixture
) -> None:
    client, pool = admin
    pool.error = ConnectionRefusedError("connection refused")
    with caplog.at_level(logging.INFO, logger="admin_api"):
        for _ in range(3):
            response = await client.get("/api/device-profiles", headers=AUTH)
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert response.json() == {"status": 503, "message": "database unavailable; retry later"}
        pool.error = None
        assert (await client.get("/api/device-profiles", headers=AUTH)).status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "admin_api"]
    assert len(lines) == 2 and "Postgres unavailable" in lines[0] and "available again" in lines[1]


async def test_probes(admin: tuple[httpx.AsyncClient, _Pool]) -> None:
    client, pool = admin
    assert (await client.get("/live")).status_code == 200
    assert (await client.get("/health")).status_code == 200
    pool.error = OSError("down")
    assert (await client.get("/health")).status_code == 503


async def test_the_shared_token_only_bootstraps_once_an_admin_exists_when_told_so() -> None:
    settings = Settings(admin_api_token=SecretStr(TOKEN), data_encryption_key=SecretStr(generate_key()),
                        admin_api_token_bootstrap_only=True)
    app = create_app(settings)
    pool = _Pool()  # fetchval answers 1: an enabled admin account exists
    app.state.pool = pool
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://admin") as client:
        refused = await client.get("/api/device-profiles", headers=AUTH)
        assert refused.status_code == 401 and "bootstraps the first admin" in refused.json()["message"]
        pool.fetchval = _no_admin  # type: ignore[method-assign]
        assert (await client.get("/api/device-profiles", headers=AUTH)).status_code == 200


async def _no_admin(sql: str, *args: Any) -> Any:
    return False if "EXISTS" in sql else 0


async def test_a_profiles_hook_must_be_https_unless_http_is_allowed(admin: tuple[httpx.AsyncClient, _Pool]) -> None:
    client, _ = admin
    body = {"name": "p", "provisionStrategy": "ALLOW_CREATE_NEW_DEVICES",
            "provisionHook": {"url": "http://erp.example/hook", "secret": "s" * 16}}
    refused = await client.post("/api/device-profiles", json=body, headers=AUTH)
    assert refused.status_code == 400 and "https://" in refused.json()["message"]
