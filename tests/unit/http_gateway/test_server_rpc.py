"""Server-side RPC ids: the tag claimed once per instance, ids ThingsBoard's SDK can echo back, a
bounded pending map, and answers resolved locally or forwarded to the issuing instance."""

from __future__ import annotations

import time
from typing import Any

import pytest
from http_gateway.server_rpc import MAX_TAG, SEQ_BITS, ServerRpcIds, queue_name, tag_of
from provisioning_common.bus import RpcError
from provisioning_common.contract import DOWNLINK_RPC
from provisioning_common.device_link import Downlink
from provisioning_common.settings import Settings

from .fakes import FakeApi

SETTINGS = Settings(bus_namespace="unit.")


def two_way(deadline: float | None = None, method: str = "reboot") -> Downlink:
    return Downlink(DOWNLINK_RPC, {"method": method, "params": None}, "reply.q", "corr-1",
                    time.time() + 30 if deadline is None else deadline)


def one_way() -> Downlink:
    return Downlink(DOWNLINK_RPC, {"method": "blink"})


def ids(api: FakeApi, **kwargs: Any) -> ServerRpcIds:
    return ServerRpcIds(lambda: api.links, SETTINGS, **kwargs)  # type: ignore[arg-type, return-value]


async def test_a_tag_is_claimed_once_and_a_taken_tag_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeApi()
    api.bus.taken.add(queue_name(SETTINGS, 7))
    draws = iter([6, 6, 8])  # secrets.randbelow(MAX_TAG) + 1: 7 (taken), 7 again, then 9
    monkeypatch.setattr("http_gateway.server_rpc.secrets.randbelow", lambda n: next(draws))
    rpc = ids(api)
    await rpc.start()
    await rpc.start()
    assert rpc.tag == 9
    assert set(api.bus.queues) == {"unit.http_gateway.rpc.9"}


async def test_start_fails_cleanly_when_the_bus_is_down() -> None:
    api = FakeApi()
    api.bus.down = True
    with pytest.raises(RpcError):
        await ids(api).start()


async def test_ids_are_positive_java_ints_carrying_the_tag() -> None:
    api = FakeApi()
    rpc = ids(api)
    await rpc.start()
    issued = [rpc.issue("device-a", one_way()) for _ in range(1000)]
    assert len(set(issued)) == 1000
    assert all(0 < i < 2**31 and tag_of(i) == rpc.tag for i in issued)
    assert rpc.pending == 0  # one-way RPCs wait for nothing


async def test_the_device_that_got_the_rpc_answers_it_once() -> None:
    api = FakeApi()
    rpc = ids(api)
    await rpc.start()
    request = two_way()
    request_id = rpc.issue("device-a", request)
    await rpc.answer("device-b", request_id, b'{"not":"mine"}')  # someone else's id: dropped
    assert api.links.answers == [] and rpc.pending == 1
    await rpc.answer("device-a", request_id, b'{"ok":true}')
    await rpc.answer("device-a", request_id, b'{"again":true}')  # repeated: dropped
    assert api.links.answers == [(request, b'{"ok":true}')] and rpc.pending == 0


async def test_expired_and_unknown_ids_are_dropped() -> None:
    api = FakeApi()
    rpc = ids(api)
    await rpc.start()
    assert rpc.tag is not None
    late = rpc.issue("device-a", two_way(deadline=time.time() - 1))
    await rpc.answer("device-a", late, b"{}")
    for unknown in (0, -5, 1, (MAX_TAG + 1) << SEQ_BITS, (rpc.tag << SEQ_BITS) | 12345):
        await rpc.answer("device-a", unknown, b"{}")
    assert api.links.answers == [] and api.bus.replies == []


async def test_the_pending_map_is_bounded_oldest_first() -> None:
    api = FakeApi()
    rpc = ids(api, max_pending=3)
    await rpc.start()
    issued = [rpc.issue("device-a", two_way()) for _ in range(5)]
    assert rpc.pending == 3
    assert not await rpc.resolve("device-a", issued[0], b"{}")
    assert await rpc.resolve("device-a", issued[4], b"{}")


async def test_an_answer_for_another_instance_is_forwarded_and_resolved_there() -> None:
    issuer_api, other_api = FakeApi(), FakeApi()
    other_api.bus = issuer_api.bus  # one broker
    other_api.links.bus = issuer_api.bus
    issuer, other = ids(issuer_api), ids(other_api)
    await issuer.start()
    request = two_way()
    request_id = issuer.issue("device-a", request)
    await other.answer("device-a", request_id, b'{"ok":1}')
    [(queue, correlation, body)] = issuer_api.bus.replies
    assert queue == queue_name(SETTINGS, tag_of(request_id)) and correlation == f"device-a/{request_id}"

    class Message:
        correlation_id = correlation

    Message.body = body  # type: ignore[attr-defined]
    await issuer._on_forwarded(Message())  # type: ignore[arg-type]
    assert issuer_api.links.answers == [(request, b'{"ok":1}')]


async def test_a_failed_answer_stays_pending_for_a_retry() -> None:
    api = FakeApi()
    rpc = ids(api)
    await rpc.start()
    request_id = rpc.issue("device-a", two_way())

    async def broken(downlink: Downlink, body: bytes) -> bool:
        raise RpcError("bus unavailable")

    answer = api.links.answer
    api.links.answer = broken  # type: ignore[method-assign]
    with pytest.raises(RpcError):
        await rpc.answer("device-a", request_id, b"{}")
    api.links.answer = answer  # type: ignore[method-assign]
    await rpc.answer("device-a", request_id, b"{}")
    assert len(api.links.answers) == 1
