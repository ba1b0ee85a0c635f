"""Server-side RPC: ``POST /api/devices/{id}/rpc`` and ThingsBoard's ``POST /api/rpc/{twoway|oneway}/{deviceId}``.

The call ``{"method", "params"}`` is published to ``device.downlink`` (type ``rpc``, routing key = device id),
where the gateway instance holding the device's session receives it:

- two-way: published with ``reply_to`` / ``correlation_id`` (:meth:`Bus.ask`); 200 with the device's answer
  (JSON) as the body, 504 when it did not answer within ``timeout``;
- one-way: 200 ``{}`` once a session has taken it;
- a device without a session: 409 "device is offline" at once (the message was unroutable); an unknown
  device: 404.

``timeout`` is in milliseconds (ThingsBoard's unit); without it the device has
``DEVICE_RPC_DEFAULT_TIMEOUT_S``; never less than ``DEVICE_RPC_MIN_TIMEOUT_S`` nor more than
``DEVICE_RPC_MAX_TIMEOUT_S``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Response
from provisioning_common.bus import DEADLINE_HEADER, Bus, NoRoute, RpcError, RpcTimeout
from provisioning_common.contract import DOWNLINK_EXCHANGE, DOWNLINK_RPC
from provisioning_common.db import repository
from provisioning_common.settings import Settings

from ..dependencies import BusDep, Pool, SettingsDep, api_error
from ..schemas import RpcIn

router = APIRouter()

OFFLINE = "device is offline"


def rpc_timeout_s(settings: Settings, timeout_ms: int | None) -> float:
    """The time the device has to answer: the caller's ``timeout`` (ms), by default
    ``DEVICE_RPC_DEFAULT_TIMEOUT_S``; at least ``DEVICE_RPC_MIN_TIMEOUT_S`` (as ThingsBoard's min_timeout:
    a few milliseconds would not even cover the trip to the gateway), at most ``DEVICE_RPC_MAX_TIMEOUT_S``."""
    wanted = settings.device_rpc_default_timeout_s if timeout_ms is None else timeout_ms / 1000
    return min(max(wanted, settings.device_rpc_min_timeout_s), settings.device_rpc_max_timeout_s)


def _answer(body: bytes) -> Response:
    """The device's answer as the response body: JSON as it came, anything else as a JSON string."""
    try:
        json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        body = json.dumps(body.decode("utf-8", "replace")).encode()
    return Response(content=body, media_type="application/json")


async def send_rpc(device_id: uuid.UUID, call: RpcIn, pool: Any, bus: Bus, settings: Settings,
                   *, oneway: bool) -> Response:
    if await repository.device_record(pool, device_id) is None:
        raise api_error(404, f"Device {device_id} not found")
    timeout = rpc_timeout_s(settings, call.timeout)
    try:
        body = json.dumps({"method": call.method, "params": call.params}, separators=(",", ":"),
                          allow_nan=False).encode()
    except ValueError:
        raise api_error(400, "params must be JSON (no NaN or Infinity)") from None
    key = str(device_id)
    try:
        if oneway:
            await bus.publish(DOWNLINK_EXCHANGE, key, body, type=DOWNLINK_RPC, mandatory=True, expiration=timeout,
                              headers={DEADLINE_HEADER: f"{time.time() + timeout:.6f}"})
            return Response(content=b"{}", media_type="application/json")
        answer = await bus.ask(DOWNLINK_EXCHANGE, key, body, timeout=timeout, type=DOWNLINK_RPC)
    except NoRoute:
        raise api_error(409, OFFLINE) from None
    except RpcTimeout:
        raise api_error(504, f"the device did not answer within {timeout:g} s") from None
    except RpcError:  # the bus is unreachable or dropped meanwhile
        raise api_error(503, "message bus unavailable; retry later") from None
    return _answer(answer)


@router.post("/devices/{device_id}/rpc", response_class=Response,
             responses={200: {"description": "two-way: the device's answer (JSON); one-way: {}"}})
async def device_rpc(device_id: uuid.UUID, call: RpcIn, pool: Pool, bus: BusDep, settings: SettingsDep) -> Response:
    """Send ``{"method", "params"}`` to the device; ``"oneway": true`` does not wait for an answer."""
    return await send_rpc(device_id, call, pool, bus, settings, oneway=call.oneway)


# ThingsBoard's paths: the same call, left out of /openapi.json (documented once, above; the fuzz test's
# time goes to operations that differ).
@router.post("/rpc/twoway/{device_id}", response_class=Response, include_in_schema=False)
async def twoway_rpc(device_id: uuid.UUID, call: RpcIn, pool: Pool, bus: BusDep, settings: SettingsDep) -> Response:
    """ThingsBoard's two-way RPC path."""
    return await send_rpc(device_id, call, pool, bus, settings, oneway=False)


@router.post("/rpc/oneway/{device_id}", response_class=Response, include_in_schema=False)
async def oneway_rpc(device_id: uuid.UUID, call: RpcIn, pool: Pool, bus: BusDep, settings: SettingsDep) -> Response:
    """ThingsBoard's one-way RPC path."""
    return await send_rpc(device_id, call, pool, bus, settings, oneway=True)
