"""broker_auth's probes: /live answers while the event loop does, /health only with the bus connected."""

from __future__ import annotations

import base64

import httpx
import pytest
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


# --- only the broker may ask; wrong credentials are rate-limited (issue 14) ---------------------------


class _CountingBus(_Bus):
    def __init__(self, known: bool | None) -> None:
        super().__init__(known)
        self.calls = 0

    async def call(self, rpc: Rpc[AuthenticateRequest, AuthenticateResult], payload: AuthenticateRequest,
                   **kwargs: object) -> AuthenticateResult:
        self.calls += 1
        return await super().call(rpc, payload, **kwargs)


async def test_with_a_secret_only_requests_carrying_it_are_answered(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(broker_auth_secret="s3cret-for-broker")
    transport = httpx.ASGITransport(app=create_app(settings, bus=_Bus(True)))  # type: ignore[arg-type]
    body = {"clientid": "c", "username": "tok", "password": ""}
    basic = "Basic " + base64.b64encode(b"rabbitmq:s3cret-for-broker").decode()
    async with httpx.AsyncClient(transport=transport, base_url="http://broker-auth") as client:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic !!"},
                        {"authorization": "Basic " + base64.b64encode(b"s3cret-for-broker").decode()},
                        {"x-broker-secret": "s3cret-for-broker"}):
            refused = await client.post("/emqx/auth", json=body, headers=headers)
            assert refused.status_code == 401, headers
            assert (await client.get("/auth/topic", params={"username": "x"}, headers=headers)).status_code == 401
        ok = await client.post("/emqx/auth", json=body, headers={"authorization": "Bearer s3cret-for-broker"})
        assert ok.status_code == 200 and ok.json()["result"] == "allow"
        rabbit = await client.post("/auth/user", data={"username": "tok", "password": ""},
                                   headers={"authorization": basic})
        assert rabbit.text == "allow"
        assert (await client.get("/live")).status_code == 200  # the probes need no secret
        # RabbitMQ's HTTP backend sends no header of ours: the secret as the first path segment.
        in_path = await client.post("/s3cret-for-broker/auth/user", data={"username": "tok", "password": ""})
        assert in_path.text == "allow"
        for path in ("/wrong/auth/user", "/s3cret-for-broker", "/s3cret-for-broke/auth/user",
                     "/auth/s3cret-for-broker"):
            assert (await client.post(path, data={"username": "tok"})).status_code == 401, path
    assert "s3cret" not in caplog.text and "without the broker's secret" in caplog.text


async def test_wrong_credentials_are_limited_per_address_like_the_gateways() -> None:
    bus = _CountingBus(False)
    app = create_app(Settings(auth_failures_per_minute=3), bus=bus)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://broker-auth") as client:
        for _ in range(5):
            emqx = await client.post("/emqx/auth", json={"clientid": "c", "username": "guess", "password": "x",
                                                         "peerhost": "10.0.0.9"})
            assert emqx.json()["result"] == "deny"
        assert bus.calls == 3 * 2  # two look-ups per login (MQTT_BASIC, then the password as a token); then none
        other = await client.post("/emqx/auth", json={"clientid": "c", "username": "guess", "password": "x",
                                                       "peerhost": "10.0.0.10"})
        assert other.json()["result"] == "deny" and bus.calls == 8  # another address is asked about
        # RabbitMQ sends no address: the client id is the key.
        for _ in range(4):
            user = await client.post("/auth/user", data={"username": "g", "password": "x", "client_id": "r"})
            assert user.text == "deny"
        assert bus.calls == 8 + 3 * 2
    assert app.state.auth_failures.refused == 3


async def test_the_bridges_user_name_and_client_ids_are_not_admitted_even_with_a_devices_credentials() -> None:
    bus = _CountingBus(True)  # every look-up would find a device
    app = create_app(Settings(), bus=bus)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://broker-auth") as client:
        emqx = await client.post("/emqx/auth", json={"clientid": "c", "username": "provisioning-bridge",
                                                     "password": "p"})
        assert emqx.json()["result"] == "ignore"  # EMQX's built-in database checks the bridge's password
        emqx = await client.post("/emqx/auth", json={"clientid": "provisioning-bridge-h", "username": "provision",
                                                     "password": "p"})
        assert emqx.json()["result"] == "deny"
        rabbit = await client.post("/auth/user", data={"username": "provisioning-bridge", "password": "p",
                                                       "client_id": "c"})
        assert rabbit.text == "deny"
    assert bus.calls == 0
