"""broker_auth's probes: /live answers while the event loop does, /health only with the bus connected."""

from __future__ import annotations

import httpx
from broker_auth.app import create_app
from provisioning_common.bus import RpcTimeout
from provisioning_common.contract import AUTHENTICATE, Rpc
from provisioning_common.models import AuthenticateRequest, AuthenticateResult
from provisioning_common.settings import Settings


async def test_live_needs_nothing_but_health_needs_the_bus() -> None:
    # ASGITransport does not run the lifespan: no bus connection, as while RabbitMQ is unreachable.
    transport = httpx.ASGITransport(app=create_app(Settings()))
    async with httpx.AsyncClient(transport=transport, base_url="http://broker-auth") as client:
        live = await client.get("/live")
        assert (live.status_code, live.json()) == (200, {"status": "UP"})
        health = await client.get("/health")
        assert (health.status_code, health.json()) == (503, {"status": "DOWN"})


class _Bus:
    """Stands in for the bus: the credentials service answers ``known`` or is unreachable."""

    is_connected = True

    def __init__(self, known: bool | None) -> None:
        self.known = known

    async def call(self, rpc: Rpc[AuthenticateRequest, AuthenticateResult], payload: AuthenticateRequest,
                   **_: object) -> AuthenticateResult:
        assert rpc is AUTHENTICATE
        if self.known is None:
            raise RpcTimeout("credentials.authenticate did not answer")
        return rpc.reply(authenticated=self.known, device_id="d" if self.known else None)


async def _ask(known: bool | None) -> tuple[httpx.Response, httpx.Response]:
    transport = httpx.ASGITransport(app=create_app(Settings(), bus=_Bus(known)))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://broker-auth") as client:
        emqx = await client.post("/emqx/auth", json={"clientid": "c", "username": "tok", "password": ""})
        rabbit = await client.get("/auth/user", params={"username": "tok", "password": ""})
    return emqx, rabbit


async def test_device_logins_follow_the_credentials_service() -> None:
    emqx, rabbit = await _ask(True)
    assert emqx.json()["result"] == "allow" and rabbit.text == "allow"
    emqx, rabbit = await _ask(False)
    assert emqx.json()["result"] == "deny" and rabbit.text == "deny"


async def test_unreachable_credentials_service_is_503_not_a_denial() -> None:
    for response in await _ask(None):
        assert response.status_code == 503 and response.headers["retry-after"] == "1"


async def test_a_client_id_alone_is_checked_as_mqtt_basic_then_left_to_emqx() -> None:
    for known, result in ((True, "allow"), (False, "ignore")):
        transport = httpx.ASGITransport(app=create_app(Settings(), bus=_Bus(known)))  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://broker-auth") as client:
            emqx = await client.post("/emqx/auth", json={"clientid": "c", "username": "", "password": ""})
            assert emqx.json()["result"] == result
            rabbit = await client.get("/auth/user", params={"username": "", "password": "", "client_id": "c"})
            assert rabbit.text == ("allow" if known else "deny")


async def test_client_id_provision_is_a_provisioning_client_without_asking_credentials() -> None:
    # known=None: any question to the credentials service would be a 503.
    transport = httpx.ASGITransport(app=create_app(Settings(), bus=_Bus(None)))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://broker-auth") as client:
        emqx = await client.post("/emqx/auth", json={"clientid": "provision", "username": "tok", "password": "x"})
        assert emqx.json()["result"] == "allow" and emqx.json()["acl"][-1]["permission"] == "deny"
        rabbit = await client.get("/auth/user", params={"username": "tok", "password": "x", "client_id": "provision"})
        assert rabbit.text == "allow"
