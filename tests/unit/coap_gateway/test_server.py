"""The CoAP gateway's pure parts: path routing, the body limit, the source address, and how each
``TransportApi`` outcome becomes a CoAP code and content-format (with a stub instead of the bus)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption

try:
    from coap_gateway import server
except ModuleNotFoundError:  # the editable install predates services/coap_gateway (re-run pip install -e .)
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "services"))
    from coap_gateway import server

from coap_gateway.device_api import Route, Target
from coap_gateway.server import CoapGateway, exceeds_limit, route, source_ip
from provisioning_common.bus import RpcError
from provisioning_common.dialects import render_error, render_result
from provisioning_common.models import (
    AuthenticateRequest,
    AuthenticateResult,
    CredentialsType,
    Dialect,
    ProvisionResult,
    ProvisionStatus,
    Transport,
)
from provisioning_common.settings import Settings
from provisioning_common.transport_api import OutcomeKind, ProvisionOutcome

assert server.JSON == 50 and server.OCTETS == 42


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (("api", "v1", "provision"), Target(Route.PROVISION)),
        (("api", "provision"), Target(Route.PROVISION)),
        (("api", "v1", "anything", "provision"), Target(Route.PROVISION)),
        (("api", "v1", "Aq1bZ7xjQw9iLmNoPq3r", "telemetry"), Target(Route.TELEMETRY, "Aq1bZ7xjQw9iLmNoPq3r")),
        (("api", "v1", "", "telemetry"), Target(Route.TELEMETRY, "")),
        (("api", "v1", "provision", "telemetry"), Target(Route.TELEMETRY, "provision")),
        (("api", "v1", "t", "attributes"), Target(Route.ATTRIBUTES, "t")),
        (("api", "v1", "t", "attributes", "updates"), Target(Route.ATTRIBUTES, "t")),
        (("api", "v1", "t", "rpc"), Target(Route.RPC, "t")),
        (("api", "v1", "t", "rpc", "17"), Target(Route.RPC_REPLY, "t", "17")),
        (("api", "v1", "t", "rpc", "x"), Target(Route.RPC_REPLY, "t", "x")),
        ((), None),
        (("api",), None),
        (("api", "v1"), None),
        (("api", "v1", "provision", ""), None),
        (("api", "v2", "provision"), None),
        (("api", "v1", "t", "claim"), None),
        (("api", "v1", "t", "rpc", "1", "2"), None),
        (("api", "v1", "t", "telemetry", "x"), None),
        (("API", "v1", "provision"), None),
        (("api", "v1", "a", "b", "provision"), None),
        ((".well-known", "core"), None),
    ],
)
def test_route(path: tuple[str, ...], expected: Target | None) -> None:
    assert route(path) == expected


def test_exceeds_limit() -> None:
    block = BlockOption.BlockwiseTuple
    assert not exceeds_limit(1024, None, None, 1024)
    assert exceeds_limit(1025, None, None, 1024)
    # Block n of size 2**(szx+4) ends at (n+1)*size: the block that crosses the limit is refused.
    assert not exceeds_limit(1024, block(63, True, 6), None, 65536)
    assert exceeds_limit(1024, block(64, True, 6), None, 65536)
    assert exceeds_limit(1, block(64, False, 6), None, 65536)
    assert not exceeds_limit(0, block(64, False, 6), None, 65536)
    # Size1 announces the whole body on the first block.
    assert exceeds_limit(1024, block(0, True, 6), 65537, 65536)
    assert not exceeds_limit(1024, block(0, True, 6), 65536, 65536)


class _Remote:
    def __init__(self, sockaddr: Any) -> None:
        self.sockaddr = sockaddr


@pytest.mark.parametrize(
    ("sockaddr", "expected"),
    [
        (("::ffff:192.0.2.7", 5683, 0, 0), "192.0.2.7"),
        (("2001:db8::1", 5683, 0, 0), "2001:db8::1"),
        (("::1", 40000, 0, 0), "::1"),
        (("10.0.0.1", 5683), "10.0.0.1"),
        (None, ""),
    ],
)
def test_source_ip(sockaddr: Any, expected: str) -> None:
    assert source_ip(_Remote(sockaddr)) == expected
    assert source_ip(object()) == ""


# --- outcome → CoAP answer ------------------------------------------------------------------------------


class StubApi:
    """Stands in for TransportApi: returns a preset outcome and records what the gateway asked."""

    def __init__(self, outcome: ProvisionOutcome | None = None, auth: AuthenticateResult | Exception | None = None):
        self.outcome, self.auth = outcome, auth
        self.calls: list[dict[str, Any]] = []
        self.published: list[tuple[str, bytes]] = []

    async def provision(self, payload: bytes, **kwargs: Any) -> ProvisionOutcome:
        self.calls.append({"payload": payload, **kwargs})
        assert self.outcome is not None
        return self.outcome

    async def authenticate(self, request: AuthenticateRequest) -> AuthenticateResult:
        self.calls.append({"token": request.token})
        if isinstance(self.auth, Exception):
            raise self.auth
        assert self.auth is not None
        return self.auth

    async def authenticate_token(self, token: str) -> AuthenticateResult:
        return await self.authenticate(AuthenticateRequest(token=token))

    async def publish_telemetry(self, device_id: str, payload: bytes) -> None:
        self.published.append((device_id, payload))


def _gateway(api: StubApi, limit: int = 2048) -> CoapGateway:
    return CoapGateway(api, Settings(max_body_bytes=limit, coap_port=15683))  # type: ignore[arg-type]


def _request(path: str, payload: bytes = b"", code: Code = Code.POST, **options: Any) -> aiocoap.Message:
    message = aiocoap.Message(code=code, uri_path=tuple(path.strip("/").split("/")), payload=payload, **options)
    message.remote = _Remote(("::ffff:198.51.100.4", 40000, 0, 0))
    return message


SUCCESS = ProvisionResult(status=ProvisionStatus.SUCCESS, device_id="d", credentials_type=CredentialsType.ACCESS_TOKEN,
                          credentials_value="tok")


def _answered(dialect: Dialect, result: ProvisionResult) -> ProvisionOutcome:
    return ProvisionOutcome(OutcomeKind.ANSWERED, dialect, render_result(dialect, result), result)


@pytest.mark.parametrize(
    ("outcome", "code", "content_format"),
    [
        (_answered(Dialect.THINGSBOARD, SUCCESS), Code.CREATED, 50),
        (_answered(Dialect.INNOWAY, SUCCESS), Code.CREATED, 50),
        (_answered(Dialect.PROTOBUF, SUCCESS), Code.CREATED, 42),
        (_answered(Dialect.THINGSBOARD, ProvisionResult.not_found()), Code.BAD_REQUEST, 50),
        (_answered(Dialect.THINGSBOARD, ProvisionResult.failure()), Code.BAD_REQUEST, 50),
        (_answered(Dialect.PROTOBUF, ProvisionResult.not_found()), Code.BAD_REQUEST, 42),
        (ProvisionOutcome(OutcomeKind.BAD_REQUEST, Dialect.INNOWAY, b'{"status":"FAILURE","error_msg":"x"}'),
         Code.BAD_REQUEST, 50),
        (ProvisionOutcome(OutcomeKind.UNAVAILABLE, Dialect.THINGSBOARD, b"timeout"), Code.SERVICE_UNAVAILABLE, 50),
        (ProvisionOutcome(OutcomeKind.UNAVAILABLE, Dialect.PROTOBUF, b"\x08\x03"), Code.SERVICE_UNAVAILABLE, 42),
    ],
)
async def test_provision_outcomes(outcome: ProvisionOutcome, code: Code, content_format: int) -> None:
    api = StubApi(outcome)
    answer = await _gateway(api).handle(_request("/api/v1/provision", b'{"k":1}'))
    assert (answer.code, answer.opt.content_format, answer.payload) == (code, content_format, outcome.body)
    assert answer.opt.max_age == (1 if code is Code.SERVICE_UNAVAILABLE else None)
    assert api.calls == [{"payload": b'{"k":1}', "transport": Transport.COAP, "source_address": "198.51.100.4",
                          "protobuf_fallback": True}]


async def test_undecodable_payload_is_answered_in_json() -> None:
    api = StubApi(ProvisionOutcome(OutcomeKind.BAD_REQUEST, Dialect.PROTOBUF, b"\x08\x03"))
    answer = await _gateway(api).handle(_request("/api/provision", b"\xff\x00"))
    assert answer.code is Code.BAD_REQUEST and answer.opt.content_format == 50
    assert answer.payload == render_error(
        Dialect.THINGSBOARD, "Payload is neither a valid JSON object nor a valid ProvisionDeviceRequestMsg")


async def test_empty_payload_is_refused_before_the_bus() -> None:
    api = StubApi()
    answer = await _gateway(api).handle(_request("/api/v1/provision"))
    assert answer.code is Code.BAD_REQUEST and b"Missing payload" in answer.payload
    assert api.calls == []


def test_precheck() -> None:
    gateway = _gateway(StubApi(), limit=2048)
    assert gateway.precheck(_request("/api/v1/provision", b"{}")) is None
    assert gateway.precheck(_request("/api/v1/tok/telemetry", b"{}")) is None
    not_found = gateway.precheck(_request("/nope", b"{}"))
    assert not_found is not None and not_found.code is Code.NOT_FOUND and not_found.opt.content_format == 50
    method = gateway.precheck(_request("/api/v1/provision", code=Code.GET))
    assert method is not None and method.code is Code.METHOD_NOT_ALLOWED and b"use POST" in method.payload
    assert gateway.precheck(_request("/api/v1/tok/attributes", code=Code.GET)) is None
    assert gateway.precheck(_request("/api/v1/tok/rpc", code=Code.GET)) is None
    put = gateway.precheck(_request("/api/v1/tok/attributes", b"{}", code=Code.PUT))
    assert put is not None and put.code is Code.METHOD_NOT_ALLOWED and b"use GET or POST" in put.payload
    reply = gateway.precheck(_request("/api/v1/tok/rpc/1", code=Code.GET))
    assert reply is not None and reply.code is Code.METHOD_NOT_ALLOWED
    big = gateway.precheck(_request("/api/v1/provision", b"x" * 1024,
                                    block1=BlockOption.BlockwiseTuple(2, True, 6)))
    assert big is not None and big.code is Code.REQUEST_ENTITY_TOO_LARGE and big.opt.size1 == 2048
    announced = gateway.precheck(_request("/api/v1/provision", b"x" * 1024, size1=4096,
                                          block1=BlockOption.BlockwiseTuple(0, True, 6)))
    assert announced is not None and announced.code is Code.REQUEST_ENTITY_TOO_LARGE


@pytest.mark.parametrize(
    ("auth", "payload", "code"),
    [
        (AuthenticateResult(authenticated=True, device_id="dev-1"), b'{"t":1}', Code.CREATED),
        (AuthenticateResult(authenticated=True, device_id="dev-1"), b"[1]", Code.CREATED),
        (AuthenticateResult(authenticated=False), b'{"t":1}', Code.UNAUTHORIZED),
        (RpcError("down"), b'{"t":1}', Code.SERVICE_UNAVAILABLE),
        (AuthenticateResult(authenticated=True, device_id="dev-1"), b"t=1", Code.BAD_REQUEST),
        (AuthenticateResult(authenticated=True, device_id="dev-1"), b'"text"', Code.BAD_REQUEST),
    ],
)
async def test_telemetry(auth: Any, payload: bytes, code: Code) -> None:
    api = StubApi(auth=auth)
    answer = await _gateway(api).handle(_request("/api/v1/tok-123/telemetry", payload))
    assert answer.code is code
    assert api.published == ([("dev-1", payload)] if code is Code.CREATED else [])
    if code is not Code.BAD_REQUEST:
        assert api.calls == [{"token": "tok-123"}]


async def test_stopping_gateway_answers_5_03_without_the_bus() -> None:
    api = StubApi()
    gateway = _gateway(api)
    await gateway.stop(drain_timeout=0.1)
    answer = await gateway.handle(_request("/api/v1/provision", b"{}"))
    assert answer.code is Code.SERVICE_UNAVAILABLE and answer.opt.max_age == 1
    assert api.calls == []
