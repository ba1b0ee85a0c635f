"""``/api/provision-events``: the provisioning events (README "Provisioning events"), stored and live.

``GET /api/provision-events`` pages through what provisioning-core stored (newest first, filtered);
``GET /api/provision-events/stream`` is a live stream (server-sent events, one ``data:`` line of the
same JSON per event) fed from the ``provisioning.events`` exchange: each open stream has its own exclusive
queue, bound by ``<outcome>.<transport>`` (``*`` for a filter not given) and deleted when the client goes.
Hand-written on Starlette's StreamingResponse: the protocol is a few lines of text, not worth a dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from provisioning_common.contract import EVENTS_EXCHANGE
from provisioning_common.db import repository
from provisioning_common.events import Outcome, Reason
from provisioning_common.models import Transport

from ..dependencies import BusDep, Pool, SettingsDep, api_error
from ..schemas import MAX_PAGE, MAX_PAGE_SIZE, NO_CONTROLS, Page

log = logging.getLogger(__name__)

router = APIRouter(prefix="/provision-events")

#: Open live streams per admin API process (each holds a channel and a queue); one more gets 503.
MAX_STREAMS = 100
#: Events a stream's client may fall behind by; older ones are dropped (the stored events keep them all).
STREAM_BUFFER = 1000
#: A comment line this often keeps proxies and idle timeouts from closing a quiet stream.
KEEPALIVE_S = 15.0

_open_streams = 0
#: Channels of finished streams being closed (kept referenced until done).
_closing: set[asyncio.Future[None]] = set()


async def _close(channel: Any) -> None:
    with contextlib.suppress(Exception):
        await channel.close()


def _utc(moment: datetime.datetime | None) -> datetime.datetime | None:
    """A time without a zone is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=datetime.UTC)


@router.get("")
async def list_events(
    pool: Pool,
    outcome: Outcome | None = None,
    reason: Reason | None = None,
    deviceProfileId: uuid.UUID | None = None,
    deviceName: str | None = Query(None, min_length=1, max_length=255, pattern=NO_CONTROLS),
    transport: Transport | None = None,
    since: datetime.datetime | None = None,
    until: datetime.datetime | None = None,
    page: int = Query(0, ge=0, le=MAX_PAGE),
    pageSize: int = Query(100, ge=1, le=MAX_PAGE_SIZE),
) -> Page:
    """Stored events, newest first. ``since`` (inclusive) and ``until`` (exclusive): ISO 8601 (UTC unless a zone
    is given) or Unix time in seconds or milliseconds."""
    where = repository.EventFilter(
        outcome=outcome.value if outcome else None, reason=reason.value if reason else None,
        profile_id=deviceProfileId, device_name=deviceName, transport=transport.value if transport else None,
        since=_utc(since), until=_utc(until),
    )
    events, total = await repository.list_provision_events(pool, where, limit=pageSize, offset=page * pageSize)
    return Page(data=[e.wire() for e in events], totalElements=total, hasNext=(page + 1) * pageSize < total)


@router.get("/stream")
async def stream_events(
    request: Request,
    bus: BusDep,
    settings: SettingsDep,
    outcome: Outcome | None = None,
    reason: Reason | None = None,
    deviceProfileId: uuid.UUID | None = None,
    deviceName: str | None = Query(None, min_length=1, max_length=255, pattern=NO_CONTROLS),
    transport: Transport | None = None,
) -> StreamingResponse:
    """Events as they are decided (``text/event-stream``): ``data: {event JSON}`` per event, and a ``: keepalive``
    comment every 15 s. ``outcome`` and ``transport`` select by routing key; the other filters as on the list."""
    global _open_streams
    if _open_streams >= MAX_STREAMS:
        raise api_error(503, f"too many open event streams (at most {MAX_STREAMS}); retry later")
    binding = f"{outcome.value if outcome else '*'}.{transport.value if transport else '*'}"
    wanted: dict[str, Any] = {k: v for k, v in (("reason", reason.value if reason else None),
                                                ("deviceProfileId", str(deviceProfileId) if deviceProfileId else None),
                                                ("deviceName", deviceName)) if v is not None}
    received: asyncio.Queue[bytes] = asyncio.Queue(STREAM_BUFFER)

    async def on_message(message: Any) -> None:
        with contextlib.suppress(asyncio.QueueFull):  # a client that does not read loses the oldest it missed
            if received.full():
                received.get_nowait()
            received.put_nowait(message.body)

    _open_streams += 1
    try:
        channel = await bus.open_channel()
    except Exception:
        _open_streams -= 1
        raise api_error(503, "event stream unavailable: the bus is down; retry later") from None
    try:
        await bus.exchange(EVENTS_EXCHANGE)  # looked up (declared on a development broker)
        queue = await channel.declare_queue(settings.queue(f"admin_api.events.{uuid.uuid4().hex}"),
                                            exclusive=True, auto_delete=True)
        await queue.bind(settings.queue(EVENTS_EXCHANGE), routing_key=binding)
        await queue.consume(on_message, no_ack=True)
    except Exception as exc:
        _open_streams -= 1
        with contextlib.suppress(Exception):
            await channel.close()
        log.warning("event stream not opened: %s", type(exc).__name__)
        raise api_error(503, "event stream unavailable; retry later") from None

    async def client_gone() -> None:
        """Returns when the client disconnects (writing to a closed stream may not fail: it must be watched)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def body() -> AsyncIterator[bytes]:
        global _open_streams
        gone = asyncio.ensure_future(client_gone())
        pending: asyncio.Future[bytes] | None = None
        try:
            yield b"retry: 3000\n\n"
            while True:
                pending = pending or asyncio.ensure_future(received.get())
                waiting: set[asyncio.Future[Any]] = {pending, gone}
                done, _ = await asyncio.wait(waiting, timeout=KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED)
                if gone in done:
                    return
                if pending not in done:
                    yield b": keepalive\n\n"
                    continue
                raw, pending = pending.result(), None
                try:
                    events = json.loads(raw)  # one message: the events of one flush with one routing key
                except ValueError:
                    continue
                for event in events if isinstance(events, list) else [events]:
                    if isinstance(event, dict) and all(event.get(key) == value for key, value in wanted.items()):
                        yield b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
        finally:
            for task in (gone, pending):
                if task is not None:
                    task.cancel()
            _open_streams -= 1
            # Not awaited here: a client that left cancels this generator, and a cancelled await would leave the
            # channel (and its queue's consumer) open. Closing it deletes the stream's auto-delete queue.
            closing = asyncio.ensure_future(_close(channel))
            _closing.add(closing)
            closing.add_done_callback(_closing.discard)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
