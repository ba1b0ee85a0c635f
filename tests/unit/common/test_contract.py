"""The bus contract: one declaration per method, used by callers and servers alike.

A call returns the declared reply model (to mypy too); serving refuses, before it consumes anything,
a handler of the wrong type, a method left unserved, one served twice, or one of another service.
The round trips run through an in-memory stand-in for the broker (what the Bus uses of aio_pika).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from provisioning_common.contract import CORE, CREDENTIALS, CREDENTIALS_INTERNAL, ContractError, Handler, Service
from provisioning_common.secretbox import SecretBox, generate_key
from pydantic import BaseModel

from .fake_broker import Broker, connect, install

REPO = Path(__file__).resolve().parents[3]


class Ping(BaseModel):
    text: str


class Pong(BaseModel):
    text: str


class Other(BaseModel):
    number: int


ECHO_SERVICE = Service("unit_echo")
ECHO = ECHO_SERVICE.rpc("echo", Ping, Pong)
NOTE = ECHO_SERVICE.one_way("note", Ping)


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> tuple[Broker, dict[str, Any]]:
    return install(monkeypatch)


# --- calls ---------------------------------------------------------------------------------------


async def test_call_returns_the_declared_reply_and_one_way_messages_arrive(broker: tuple[Broker, Any]) -> None:
    notes: asyncio.Queue[Ping] = asyncio.Queue()

    async def echo(request: Ping) -> Pong:
        return Pong(text=request.text.upper())

    async def note(request: Ping) -> None:
        await notes.put(request)

    server, client = await connect(ECHO_SERVICE.name), await connect("unit_client")
    await server.serve(ECHO_SERVICE, [ECHO.handler(echo), NOTE.handler(note)])
    reply = await client.call(ECHO, Ping(text="hi"))
    assert type(reply) is Pong and reply == Pong(text="HI")
    client.send_reliably(NOTE, Ping(text="later"))
    assert await asyncio.wait_for(notes.get(), 5) == Ping(text="later")
    assert broker[0].declared.count("unit.unit_echo") == 2  # the caller declares the queue it calls too
    await client.close()
    await server.stop_consuming(1)
    await server.close()


async def test_each_call_has_its_own_ids_unique_across_processes(broker: tuple[Broker, Any]) -> None:
    """Correlation ids pair replies with calls, and a call's message id (when not given) is what handlers
    replay answers by: none may repeat, within a process or across two (a counter behind a random prefix)."""
    seen: list[tuple[str, str]] = []

    async def echo(request: Ping) -> Pong:
        return Pong(text=request.text)

    async def note(request: Ping) -> None:
        pass

    original = broker[0].deliver

    def deliver(routing_key: str, message: Any) -> None:
        if getattr(message, "type", None) == ECHO.name:
            seen.append((message.correlation_id, message.message_id))
        original(routing_key, message)

    broker[0].deliver = deliver  # type: ignore[method-assign]
    server, first, second = await connect(ECHO_SERVICE.name), await connect("unit_a"), await connect("unit_b")
    await server.serve(ECHO_SERVICE, [ECHO.handler(echo), NOTE.handler(note)])
    for client in (first, second, first, second):
        assert await client.call(ECHO, Ping(text="x")) == Pong(text="x")
    assert await first.call(ECHO, Ping(text="y"), message_id="chosen-by-the-caller") == Pong(text="y")
    correlation_ids = [correlation_id for correlation_id, _ in seen]
    assert len(set(correlation_ids)) == 5
    assert all(len(value) == 32 and int(value, 16) >= 0 for value in correlation_ids)
    assert [message_id for _, message_id in seen] == [*correlation_ids[:4], "chosen-by-the-caller"]
    for bus in (first, second, server):
        await bus.close()


async def test_a_one_way_message_kept_from_its_work_by_an_outage_is_delivered_again(
    broker: tuple[Broker, Any]
) -> None:
    """An abandon that finds the database down must not be lost: it is requeued and done later."""
    from provisioning_common.bus import Unavailable

    attempts: list[str] = []

    async def note(request: Ping) -> None:
        attempts.append(request.text)
        if len(attempts) < 3:
            raise Unavailable("database unavailable")

    server = await connect(ECHO_SERVICE.name, bus_reconnect_interval_s=0.01)
    client = await connect("unit_client")

    async def echo(request: Ping) -> Pong:
        return Pong(text=request.text)

    await server.serve(ECHO_SERVICE, [ECHO.handler(echo), NOTE.handler(note)])
    client.send_reliably(NOTE, Ping(text="abandon me"))
    for _ in range(500):
        if len(attempts) == 3:
            break
        await asyncio.sleep(0.01)
    assert attempts == ["abandon me"] * 3 and broker[0].requeued == 2
    await client.close()
    await server.stop_consuming(1)
    await server.close()


async def test_the_connection_is_named_after_the_service(broker: tuple[Broker, dict[str, Any]]) -> None:
    await connect("provisioning_core")
    assert broker[1]["client_properties"] == {"connection_name": "provisioning_core"}


# --- serving: refused before anything is consumed ------------------------------------------------


async def _echo(request: Ping) -> Pong:
    return Pong(text=request.text)


async def _note(request: Ping) -> None:
    return None


async def _refused(handlers: list[Handler], broker: Broker, match: str) -> None:
    server = await connect(ECHO_SERVICE.name)
    with pytest.raises(ContractError, match=match):
        await server.serve(ECHO_SERVICE, handlers)
    assert broker.declared == [] and broker.consumers == {}


async def test_a_method_left_unserved_is_refused(broker: tuple[Broker, Any]) -> None:
    await _refused([ECHO.handler(_echo)], broker[0], "unit_echo does not serve note")


async def test_a_handler_taking_another_request_is_refused(broker: tuple[Broker, Any]) -> None:
    async def wrong(request: Other) -> Pong:
        return Pong(text=str(request.number))

    handler = ECHO.handler(wrong)  # type: ignore[arg-type]  # what mypy refuses, refused at start too
    await _refused([handler, NOTE.handler(_note)], broker[0], "unit_echo.echo takes Other, not Ping")


async def test_a_handler_returning_another_reply_is_refused(broker: tuple[Broker, Any]) -> None:
    async def wrong(request: Ping) -> Other:
        return Other(number=1)

    handler = ECHO.handler(wrong)  # type: ignore[arg-type]
    await _refused([handler, NOTE.handler(_note)], broker[0], "unit_echo.echo returns Other, not Pong")


async def test_a_handler_that_takes_no_request_is_refused(broker: tuple[Broker, Any]) -> None:
    async def wrong() -> Pong:
        return Pong(text="")

    handler = ECHO.handler(wrong)  # type: ignore[arg-type]
    await _refused([handler, NOTE.handler(_note)], broker[0], "must take one argument")


async def test_twice_the_same_method_or_another_services_method_is_refused(broker: tuple[Broker, Any]) -> None:
    await _refused([ECHO.handler(_echo), ECHO.handler(_echo), NOTE.handler(_note)], broker[0], "two handlers")
    other = Service("unit_other")
    foreign = other.rpc("echo", Ping, Pong)
    await _refused([ECHO.handler(_echo), NOTE.handler(_note), foreign.handler(_echo)], broker[0],
                   "unit_other.echo is not a method of unit_echo")


def test_a_method_is_declared_once() -> None:
    service = Service("unit_once")
    service.rpc("m", Ping, Pong)
    with pytest.raises(ContractError, match="declared twice"):
        service.one_way("m", Ping)


def test_the_services_serve_exactly_their_contract() -> None:
    """The real entry points pass the same check (the credentials service's guarded handlers included)."""
    from credentials.service import CredentialsService
    from provisioning_core.rate_limit import RateLimiter
    from provisioning_core.service import ProvisioningCore

    core = ProvisioningCore(None, None, SecretBox(generate_key()), RateLimiter.in_memory())  # type: ignore[arg-type]
    assert set(CORE.entry_points(core.handlers())) == {"provision", "provision_x509_chain", "abandon",
                                                             "report_timeout"}
    credentials = CredentialsService(pool=None)  # type: ignore[arg-type]
    handlers = list(credentials.handlers())
    assert set(CREDENTIALS.entry_points([h for h in handlers if h.method.service is CREDENTIALS])) == {"authenticate"}
    assert set(CREDENTIALS_INTERNAL.entry_points([h for h in handlers if h.method.service is CREDENTIALS_INTERNAL])) \
        == {"prepare", "prepare_many", "mint_tokens", "verify_chain", "issue_certificate"}


# --- the types, as mypy sees them ----------------------------------------------------------------

_TYPED = '''
from provisioning_common.bus import Bus
from provisioning_common.contract import ABANDON, AUTHENTICATE, PROVISION
from provisioning_common.models import AuthenticateRequest, ProvisionRequest, ProvisionResult


async def caller(bus: Bus, request: ProvisionRequest) -> None:
    reveal_type(await bus.call(PROVISION, request))
    await bus.call(AUTHENTICATE, request)
    bus.send_reliably(ABANDON, request)
    bus.send_reliably(PROVISION, request)


async def handler(request: AuthenticateRequest) -> ProvisionResult:
    return ProvisionResult.failure()

PROVISION.handler(handler)
'''


def test_mypy_sees_the_declared_types(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    module = tmp_path / "typed_calls.py"
    module.write_text(_TYPED)
    # A process of its own: mypy raises the recursion limit of the interpreter it runs in.
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "pyproject.toml", "--no-error-summary", str(module)],
        cwd=REPO, capture_output=True, text=True, timeout=240,  # pyproject's mypy_path is relative to REPO
    ).stdout
    lines = [line.split(": ", 1)[1] for line in out.splitlines()]
    assert lines[0] == 'note: Revealed type is "provisioning_common.models.ProvisionResult"', out
    assert lines[1].startswith('error: Cannot infer value of type parameter "Req" of "call"'), out  # wrong request
    assert lines[2].startswith('error: Argument 1 to "send_reliably" of "Bus" has incompatible type "Rpc['), out
    assert lines[3].startswith('error: Argument 1 to "handler" of "Rpc" has incompatible type'), out
    assert len(lines) == 4, out
