"""Batched bus calls on a real RabbitMQ (issue 18): concurrent calls of a ``batched`` method travel in one
message, and each is still handled, answered and failed on its own.

A service of the test's own (an echo) runs in this process on a bus of its own, so the batch-size histograms of
both sides (``provisioning_batch_size{batch="call.<service>.<method>"}`` for the calls' messages,
``batch="reply.<service>"`` for the answers') are read from this process's registry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aio_pika
import pytest
from prometheus_client import REGISTRY
from provisioning_common.bus import BATCH_HEADER, Bus, DeadlineExceeded, RpcError, current_deadline
from provisioning_common.context import current_request_id, request_scope
from provisioning_common.contract import Service
from provisioning_common.settings import Settings
from pydantic import BaseModel

from .conftest import Env


class Echo(BaseModel):
    text: str


class Echoed(BaseModel):
    text: str
    request_id: str | None
    deadline: float | None


@dataclass
class Served:
    service: Service
    caller: Bus
    server: Bus
    #: Set to let the request "slow" finish.
    release: asyncio.Event
    settings: Settings
    #: The texts the service handled, in order.
    seen: list[str]


def _batches(name: str) -> tuple[float, float]:
    """(messages, requests) the batch-size histogram of ``name`` has seen so far."""
    count = REGISTRY.get_sample_value("provisioning_batch_size_count", {"batch": name}) or 0.0
    total = REGISTRY.get_sample_value("provisioning_batch_size_sum", {"batch": name}) or 0.0
    return count, total


async def _serve(env: Env, batch_max: int) -> AsyncIterator[Served]:
    settings = Settings(rabbitmq_url=env.infra.rabbitmq_url, bus_namespace=env.namespace, provision_timeout_s=5,
                        bus_call_batch_max=batch_max)
    service = Service(f"batch-echo-{uuid.uuid4().hex[:8]}")
    echo = service.rpc("echo", Echo, Echoed, batched=True)
    release = asyncio.Event()
    seen: list[str] = []

    async def handle(request: Echo) -> Echoed:
        seen.append(request.text)
        if request.text == "fail":
            raise RpcError("asked to fail")
        if request.text == "slow":
            await release.wait()
        return Echoed(text=request.text, request_id=current_request_id(), deadline=current_deadline())

    server = await Bus.connect(settings, "batch-echo")
    caller = await Bus.connect(settings, "batch-caller")
    await server.serve(service, [echo.handler(handle)])
    try:
        yield Served(service, caller, server, release, settings, seen)
    finally:
        release.set()
        await caller.close()
        await server.stop_consuming(drain_timeout=2)
        await server.close()


@pytest.fixture
async def served(env: Env) -> AsyncIterator[Served]:
    async for value in _serve(env, batch_max=32):
        yield value


@pytest.fixture
async def unbatched(env: Env) -> AsyncIterator[Served]:
    async for value in _serve(env, batch_max=1):
        yield value


async def _call(served: Served, text: str, request_id: str, **kwargs: float) -> Echoed:
    echo = served.service.methods["echo"]
    with request_scope(request_id):
        return await served.caller.call(echo, Echo(text=text), **kwargs)  # type: ignore[arg-type]


async def test_concurrent_calls_travel_in_one_message_and_each_gets_its_own_answer(served: Served) -> None:
    name = f"call.{served.service.name}.echo"
    await _call(served, "warm-up", "warm-up")  # the reply queue and the route exist from now on
    before = _batches(name)
    deadlines = [time.time() + 3 + i / 10 for i in range(20)]
    answers = await asyncio.gather(*(_call(served, f"text-{i}", f"rid-{i}", deadline=deadlines[i]) for i in range(20)))
    after = _batches(name)
    # Each caller got its own answer, handled with its own request id and deadline in force.
    assert [a.text for a in answers] == [f"text-{i}" for i in range(20)]
    assert [a.request_id for a in answers] == [f"rid-{i}" for i in range(20)]
    assert [a.deadline for a in answers] == pytest.approx(deadlines)
    # Twenty calls made in one turn of the loop left in fewer messages than calls: batches formed.
    assert after[1] - before[1] == 20
    assert after[0] - before[0] < 20


async def test_a_slow_request_does_not_hold_up_its_neighbours_answers(served: Served) -> None:
    await _call(served, "warm-up", "warm-up")
    name = f"call.{served.service.name}.echo"
    before = _batches(name)
    slow = asyncio.ensure_future(_call(served, "slow", "rid-slow"))
    fast = [asyncio.ensure_future(_call(served, f"fast-{i}", f"rid-{i}")) for i in range(10)]
    # The fast ones are answered while the slow one (sent in the same batch) still waits: with one answer per
    # batch they could not be, and this wait would run into the calls' time-out.
    done = await asyncio.gather(*fast)
    assert [a.text for a in done] == [f"fast-{i}" for i in range(10)]
    assert not slow.done()
    assert _batches(name)[0] - before[0] < 11  # they did share messages
    served.release.set()
    assert (await slow).text == "slow"


async def test_one_failing_request_fails_alone(served: Served) -> None:
    await _call(served, "warm-up", "warm-up")
    results = await asyncio.gather(*(_call(served, text, text) for text in ("a", "fail", "b")), return_exceptions=True)
    assert isinstance(results[0], Echoed) and results[0].text == "a"
    assert isinstance(results[1], RpcError) and "asked to fail" in str(results[1])
    assert isinstance(results[2], Echoed) and results[2].text == "b"


async def test_a_batch_on_the_wire_is_answered_request_by_request(served: Served) -> None:
    """The documented message (README "Bus"): a JSON array of {id, dl, rid, b}; the answer, an array of
    {id, err, b} - including a request already past its deadline and one its method's model refuses."""
    connection = await aio_pika.connect(served.settings.rabbitmq_url.get_secret_value())
    try:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)
        await replies.bind(served.settings.queue("rpc.replies"), routing_key=replies.name)
        now = time.time()
        body = json.dumps([
            {"id": "one", "dl": now + 5, "rid": "wire-1", "b": json.dumps({"text": "hello"})},
            {"id": "late", "dl": now - 1, "rid": None, "b": json.dumps({"text": "too late"})},
            {"id": "bad", "dl": now + 5, "b": json.dumps({"nothing": 1})},
        ]).encode()
        exchange = await channel.get_exchange(served.settings.queue(f"rpc.{served.service.name}"))
        await exchange.publish(
            aio_pika.Message(body, type="echo", correlation_id="wire", reply_to=replies.name,
                             headers={BATCH_HEADER: 3}),
            routing_key=served.settings.queue(served.service.name),
        )
        answers: dict[str, dict[str, object]] = {}
        async with replies.iterator() as messages:
            async for message in messages:
                async with message.process():
                    assert message.headers.get(BATCH_HEADER)
                    for answer in json.loads(message.body):
                        answers[answer["id"]] = answer
                if len(answers) == 3:
                    break
    finally:
        await connection.close()
    assert answers["one"]["err"] is False
    assert json.loads(str(answers["one"]["b"]))["text"] == "hello"
    assert json.loads(str(answers["one"]["b"]))["request_id"] == "wire-1"
    assert answers["late"]["err"] is True
    assert json.loads(str(answers["late"]["b"]))["code"] == "deadline_exceeded"
    assert answers["bad"]["err"] is True
    assert "invalid echo request" in json.loads(str(answers["bad"]["b"]))["error"]


async def test_a_malformed_batch_is_dropped_with_a_warning_and_the_service_goes_on(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    connection = await aio_pika.connect(served.settings.rabbitmq_url.get_secret_value())
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(served.settings.queue(f"rpc.{served.service.name}"))
        with caplog.at_level(logging.WARNING, logger="provisioning_common.bus"):
            await exchange.publish(aio_pika.Message(b"not a batch", type="echo", reply_to="nobody",
                                                    headers={BATCH_HEADER: 1}),
                                   routing_key=served.settings.queue(served.service.name))
            for _ in range(100):
                if "dropped a batch message" in caplog.text:
                    break
                await asyncio.sleep(0.05)
        assert "dropped a batch message" in caplog.text
        assert "Traceback" not in caplog.text
    finally:
        await connection.close()
    assert (await _call(served, "still here", "after")).text == "still here"


async def test_with_bus_call_batch_max_1_every_call_is_its_own_message(unbatched: Served) -> None:
    name = f"call.{unbatched.service.name}.echo"
    await _call(unbatched, "warm-up", "warm-up")
    before = _batches(name)
    answers = await asyncio.gather(*(_call(unbatched, f"t{i}", f"r{i}") for i in range(10)))
    assert [a.text for a in answers] == [f"t{i}" for i in range(10)]
    # Not one batched message: the batcher is not even used.
    assert _batches(name) == before


async def test_a_call_whose_deadline_passes_in_the_queue_is_refused_alone(served: Served) -> None:
    """Each request of a batch keeps its own deadline: one that passes while the batch waits in the queue is
    answered "deadline exceeded", its neighbour (a later deadline) is served."""
    await _call(served, "warm-up", "warm-up")
    await served.server.stop_consuming(drain_timeout=1)  # requests wait in the queue from now on
    pending = [asyncio.ensure_future(_call(served, "short", "short", deadline=time.time() + 0.5)),
               asyncio.ensure_future(_call(served, "long", "long", deadline=time.time() + 8))]
    await asyncio.sleep(1.0)  # the short one's deadline passes while it waits
    echo = served.service.methods["echo"]

    async def handle(request: Echo) -> Echoed:
        return Echoed(text=request.text, request_id=current_request_id(), deadline=current_deadline())

    await served.server.serve(served.service, [echo.handler(handle)])  # type: ignore[arg-type]
    short, long = await asyncio.gather(*pending, return_exceptions=True)
    assert isinstance(short, DeadlineExceeded | RpcError)
    assert isinstance(long, Echoed) and long.text == "long"


async def test_a_call_whose_caller_gave_up_before_its_batch_left_is_not_sent(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its caller may already have answered "timed out" (and sent its abandon): the request must not reach the
    service after that."""
    await _call(served, "warm-up", "warm-up")
    held = asyncio.Event()
    publishing = asyncio.Event()
    publish = served.caller._publish_properties  # noqa: SLF001 - held to keep the next batch waiting

    async def slow_publish(*args: object, **kwargs: object) -> None:
        if not held.is_set():
            publishing.set()
            await held.wait()
        await publish(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(served.caller, "_publish_properties", slow_publish)
    first = asyncio.ensure_future(_call(served, "first", "first"))
    await publishing.wait()  # the first message is being published: the next calls wait for the next batch
    gave_up = asyncio.ensure_future(_call(served, "gave up", "gave-up"))
    kept = asyncio.ensure_future(_call(served, "kept", "kept"))
    await asyncio.sleep(0.05)
    gave_up.cancel()  # its caller stops waiting (a time-out, a closed connection) before the batch leaves
    held.set()
    assert (await first).text == "first"
    assert (await kept).text == "kept"  # its neighbour in that batch went out and was answered
    assert "gave up" not in served.seen
    assert served.seen[-2:] == ["first", "kept"]
