"""Logs (issue 15): LOG_FORMAT text or json, the request id on every record of a request (and across the
bus), and control characters a client chose escaped so that one record is always one line."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from provisioning_common import context, metrics, runtime
from provisioning_common.contract import Service
from provisioning_common.settings import Settings
from pydantic import BaseModel

from .fake_broker import connect, install

FORGED = "dev\r\n2026-01-01 00:00:00,000 provisioning_core INFO forged: SUCCESS\x1b[2K\x1b]0;t\x07\u2028\x85end"


@pytest.fixture
def captured() -> Iterator[Any]:
    """setup_logging(LOG_FORMAT) writing to a buffer; the root logger restored afterwards."""
    root = logging.getLogger()
    lifecycle = logging.getLogger(runtime.LIFECYCLE_LOGGER)
    saved = (root.level, list(root.handlers), list(lifecycle.handlers))
    buffer = io.StringIO()

    def start(log_format: str) -> io.StringIO:
        root.handlers.clear()
        lifecycle.handlers.clear()
        runtime.setup_logging(Settings(log_format=log_format, log_level="INFO"), "unit_service")
        for handler in (*root.handlers, *lifecycle.handlers):
            assert isinstance(handler, logging.StreamHandler)
            handler.setStream(buffer)
        return buffer

    yield start
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    lifecycle.handlers[:] = saved[2]
    for name in ("aiormq", "aio_pika"):
        logging.getLogger(name).setLevel(logging.NOTSET)


@pytest.mark.parametrize(("text", "escaped"), [
    ("plain name", "plain name"),
    ("a\nb", "a\\nb"),
    ("a\r\nb", "a\\r\\nb"),
    ("\x1b[31mred", "\\x1b[31mred"),
    ("tab\there", "tab\\there"),
    ("nul\x00 del\x7f c1\x85 csi\x9b", "nul\\x00 del\\x7f c1\\x85 csi\\x9b"),
    ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),
    ("already \\n escaped", "already \\n escaped"),  # backslashes are kept: escaping twice changes nothing
    ("ünïcödé ✓ 设备", "ünïcödé ✓ 设备"),
])
def test_control_characters_are_written_out(text: str, escaped: str) -> None:
    assert runtime.escape_controls(text) == escaped
    assert runtime.escape_controls(escaped) == escaped


def test_text_format_one_line_per_record_with_the_request_id(captured: Any) -> None:
    buffer = captured("text")
    log = logging.getLogger("unit.module")
    log.info("device %s provisioned", FORGED)
    with context.request_scope("req-123"):
        log.warning("inside %s", "a request")
    runtime.announce_ready("unit_service", "on queue q")
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert "unit_service INFO unit.module: device dev\\r\\n2026-01-01 00:00:00,000 provisioning_core INFO forged" \
           in lines[0]
    assert "\\x1b[2K\\x1b]0;t\\x07\\u2028\\x85end provisioned" in lines[0]
    assert lines[1].endswith("unit_service WARNING unit.module [req-123]: inside a request")
    assert lines[2].endswith("unit_service INFO provisioning.lifecycle: unit_service ready on queue q")
    assert not any(char in buffer.getvalue() for char in "\r\x1b\x07\u2028\x85")


def test_text_format_tracebacks_are_indented_and_escaped(captured: Any) -> None:
    buffer = captured("text")
    try:
        raise ValueError(f"bad name {FORGED}")
    except ValueError:
        logging.getLogger("unit.module").exception("failed for %s", "x\ny")
    first, *rest = buffer.getvalue().rstrip("\n").split("\n")
    assert first.endswith("unit.module: failed for x\\ny")
    # The message's own line feed still breaks the traceback's line, but every line of it is indented
    # (none can pass for a record) and nothing else is raw.
    assert rest and all(line.startswith("    ") for line in rest)
    assert rest[-2] == "    ValueError: bad name dev\\r"
    assert rest[-1].startswith("    2026-01-01 00:00:00,000 provisioning_core INFO forged: SUCCESS\\x1b[2K")
    assert not any(char in buffer.getvalue() for char in "\r\x1b\x07\u2028\x85")


def test_json_format_one_object_per_record(captured: Any) -> None:
    buffer = captured("json")
    log = logging.getLogger("unit.module")
    log.info("device %s provisioned", FORGED)
    with context.request_scope("req-456"):
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")
    records = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert len(records) == 2
    first, second = records
    assert list(first)[:5] == ["time", "level", "service", "logger", "message"]
    assert first["level"] == "INFO" and first["service"] == "unit_service" and first["logger"] == "unit.module"
    assert first["message"].startswith("device dev\\r\\n2026-01-01") and "\x1b" not in first["message"]
    assert "request_id" not in first
    assert first["time"].endswith("+00:00")
    assert second["request_id"] == "req-456" and second["level"] == "ERROR"
    assert "RuntimeError: boom" in second["exc_info"]
    assert "request_tag" not in second


def test_a_log_call_with_wrong_arguments_does_not_raise(captured: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """As without our filter: logging reports the mistake (handleError) and the caller goes on."""
    captured("text")
    logging.getLogger("unit.module").info("two %s %s", "only-one")
    assert "Logging error" in capsys.readouterr().err


def test_the_lifecycle_line_keeps_its_format_in_json(captured: Any) -> None:
    buffer = captured("json")
    runtime.announce_ready("unit_service", "on queue q")
    assert json.loads(buffer.getvalue())["message"] == "unit_service ready on queue q"


def test_an_invalid_log_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log_format"):
        Settings(log_format="xml")


@pytest.mark.parametrize(("value", "expected"), [
    ("9f2c0d1e", "9f2c0d1e"),
    ("req-1.2:3_4", "req-1.2:3_4"),
    (b"abc", "abc"),
    ("a" * 64, "a" * 64),
    ("a" * 65, None),
    ("", None),
    ("-leading-dash", None),
    ("has space", None),
    ("line\nfeed", None),
    ("esc\x1b", None),
    ("ünï", None),
    (b"\xff\xfe", None),
    (42, None),
    (None, None),
])
def test_request_ids_are_short_and_safe(value: object, expected: str | None) -> None:
    assert context.valid_request_id(value) == expected


def test_request_scope_keeps_the_request_in_force_and_restores() -> None:
    assert context.current_request_id() is None
    with context.request_scope("outer") as outer:
        assert outer == context.current_request_id() == "outer"
        with context.request_scope() as inner:  # nested: the request in force
            assert inner == "outer"
        with context.request_scope("bad id\n") as replaced:  # invalid: the one in force
            assert replaced == "outer"
    assert context.current_request_id() is None
    with context.request_scope() as fresh, context.request_scope("bad id") as kept:
        assert len(fresh) == 32 and kept == fresh


def test_fresh_request_ids_never_repeat_even_in_a_forked_child() -> None:
    import os

    ids = {context.new_request_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(value) == 32 and context.valid_request_id(value) for value in ids)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child draws its own prefix: its ids are not its parent's next ones
        os.write(writer, context.new_request_id().encode())
        os._exit(0)
    os.close(writer)
    child = os.read(reader, 64).decode()
    os.close(reader)
    os.waitpid(pid, 0)
    assert len(child) == 32 and child not in ids and child != context.new_request_id()
    assert child[:16] != next(iter(ids))[:16]


class Text(BaseModel):
    text: str


GATEWAY_FACING = Service("unit_core")
CORE_FACING = Service("unit_credentials")
PROVISION = GATEWAY_FACING.rpc("provision", Text, Text)
AUTHENTICATE = CORE_FACING.rpc("authenticate", Text, Text)


def _sample(name: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return value or 0.0


async def test_the_request_id_travels_in_a_bus_header_through_nested_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """gateway -> core -> credentials: each handler runs with the gateway's request id in force, although
    the consumers run in a context of their own (as with a real broker): only the header carries it."""
    broker, _ = install(monkeypatch)

    def deliver(routing_key: str, message: Any) -> None:  # no context copied from the publisher
        consumer = broker.consumers.get(routing_key)
        if consumer is None:
            broker.waiting.setdefault(routing_key, []).append(message)
            return
        from .fake_broker import Delivered

        task = asyncio.create_task(consumer(Delivered(message, broker, routing_key)), context=contextvars.Context())
        broker.tasks.add(task)
        task.add_done_callback(broker.tasks.discard)

    monkeypatch.setattr(broker, "deliver", deliver)
    seen: list[tuple[str, str | None]] = []
    core_bus, credentials_bus, gateway = await connect("core"), await connect("credentials"), await connect("gw")

    async def authenticate(request: Text) -> Text:
        seen.append(("credentials", context.current_request_id()))
        return request

    async def provision(request: Text) -> Text:
        seen.append(("core", context.current_request_id()))
        return await core_bus.call(AUTHENTICATE, request)

    await core_bus.serve(GATEWAY_FACING, [PROVISION.handler(provision)])
    await credentials_bus.serve(CORE_FACING, [AUTHENTICATE.handler(authenticate)])
    before = _sample("provisioning_rpc_client_calls_total", service="unit_core", method="provision", outcome="ok")
    served = _sample("provisioning_rpc_server_calls_total", service="unit_credentials", method="authenticate",
                     outcome="ok")

    with context.request_scope("gw-req-1"):
        assert await gateway.call(PROVISION, Text(text="hi")) == Text(text="hi")
    assert seen == [("core", "gw-req-1"), ("credentials", "gw-req-1")]

    seen.clear()  # no request in force: none invented on the way
    await gateway.call(PROVISION, Text(text="hi"))
    assert seen == [("core", None), ("credentials", None)]

    seen.clear()  # a header that is not a valid request id is dropped, never logged
    token = context._request_id.set("forged\nline")
    try:
        await gateway.call(PROVISION, Text(text="hi"))
    finally:
        context._request_id.reset(token)
    assert seen == [("core", None), ("credentials", None)]

    assert _sample("provisioning_rpc_client_calls_total", service="unit_core", method="provision",
                   outcome="ok") == before + 3
    assert _sample("provisioning_rpc_server_calls_total", service="unit_credentials", method="authenticate",
                   outcome="ok") == served + 3
    assert _sample("provisioning_rpc_client_duration_seconds_count", service="unit_core", method="provision") >= 3
    for bus in (gateway, core_bus, credentials_bus):
        await bus.close()


async def test_rpc_time_outs_are_counted_per_method(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch)
    gateway = await connect("gw", bus_reply_grace_s=0.1)  # nobody serves unit_core: the call times out
    before = _sample("provisioning_rpc_client_calls_total", service="unit_core", method="provision",
                     outcome="timeout")
    from provisioning_common.bus import RpcTimeout

    with pytest.raises(RpcTimeout):
        await gateway.call(PROVISION, Text(text="hi"), timeout=0.1)
    assert _sample("provisioning_rpc_client_calls_total", service="unit_core", method="provision",
                   outcome="timeout") == before + 1
    await gateway.close()
