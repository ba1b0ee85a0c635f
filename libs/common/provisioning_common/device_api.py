"""ThingsBoard's device API after provisioning: its payload rules, shared by the three gateways.

Topics and paths are each transport's own (MQTT ``v1/devices/me/...``, HTTP and CoAP
``/api/v1/{token}/...``); what is carried is the same everywhere and lives here, as in ThingsBoard's
``JsonConverter``: client attributes are a JSON object, an attribute request names comma-separated
``clientKeys`` / ``sharedKeys``, its answer is ``{"client": {...}, "shared": {...}}``, an RPC is
``{"method": ..., "params": ...}``, and ``getSessionLimits`` is answered by the gateway itself with
the limits it enforces (:class:`SessionLimitsInfo`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .device_link import Downlink
from .models import MAX_ATTRIBUTE_KEY, AttributesQuery, AttributesSnapshot

#: The client-side RPC method a gateway answers itself (ThingsBoard's transport does, since 3.9).
SESSION_LIMITS_METHOD = "getSessionLimits"
#: Longest RPC method name (ThingsBoard stores it as varchar(255)).
MAX_METHOD = 255


class DeviceApiError(ValueError):
    """A device sent something ThingsBoard's device API does not accept (the message says what)."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400
        raise ValueError("number out of range")
    return value


def load_json(payload: bytes | str) -> Any:
    """JSON as RFC 8259 has it: NaN, Infinity and numbers beyond a double are refused (they would reach
    the bus as null)."""
    try:
        value = json.loads(payload, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise DeviceApiError("payload is not valid JSON") from None
    raw = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
    if b"\\ud" in raw.lower():
        # A ``\ud800``-style escape may leave an unpaired surrogate, which is no Unicode text: the bus
        # (pydantic) would turn it into U+FFFD and store another key than the device sent.
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise DeviceApiError("payload contains an unpaired surrogate") from None
    return value


def parse_attributes(payload: bytes | str) -> dict[str, Any]:
    """Client attributes a device publishes: a non-empty JSON object with non-empty keys of at most
    255 characters (ThingsBoard's ``JsonConverter.convertToAttributes``)."""
    obj = load_json(payload)
    if not isinstance(obj, dict):
        raise DeviceApiError("attributes must be a JSON object")
    if not obj:
        raise DeviceApiError("attributes must not be empty")
    for key in obj:
        if not key or len(key) > MAX_ATTRIBUTE_KEY or not key.strip():
            raise DeviceApiError(f"attribute keys must be 1 to {MAX_ATTRIBUTE_KEY} characters")
    return obj


def parse_keys(raw: str | None) -> list[str] | None:
    """``"a,b , c"`` -> ``["a", "b", "c"]``; None when not given. Blank entries are dropped."""
    if raw is None:
        return None
    keys = [key.strip() for key in raw.split(",")]
    keys = [key for key in keys if key]
    for key in keys:
        if len(key) > MAX_ATTRIBUTE_KEY:
            raise DeviceApiError(f"attribute keys must be at most {MAX_ATTRIBUTE_KEY} characters")
    return keys


def attributes_query(device_id: str, client_keys: str | None, shared_keys: str | None) -> AttributesQuery:
    """An attribute request from its two key lists (HTTP and CoAP query strings, MQTT's JSON fields).

    As in ThingsBoard: a scope that is named is answered with exactly those keys; naming neither
    asks for every client and shared attribute."""
    # A scope named with no keys ("clientKeys=") is a scope not asked for, not all of its keys.
    client, shared = parse_keys(client_keys) or None, parse_keys(shared_keys) or None
    if client is None and shared is None:
        client, shared = [], []
    return AttributesQuery(device_id=device_id, client_keys=client, shared_keys=shared)


def parse_attributes_request(device_id: str, payload: bytes) -> AttributesQuery:
    """MQTT's ``v1/devices/me/attributes/request/{id}`` payload: ``{"clientKeys": "a,b", "sharedKeys": "c"}``
    (either may be left out; an empty payload or ``{}`` asks for everything)."""
    if not payload.strip():
        return attributes_query(device_id, None, None)
    obj = load_json(payload)
    if not isinstance(obj, dict):
        raise DeviceApiError("an attribute request must be a JSON object")
    client, shared = obj.get("clientKeys"), obj.get("sharedKeys")
    for value in (client, shared):
        if value is not None and not isinstance(value, str):
            raise DeviceApiError("clientKeys and sharedKeys are comma-separated strings")
    return attributes_query(device_id, client, shared)


def render_attributes(snapshot: AttributesSnapshot) -> bytes:
    """``{"client": {...}, "shared": {...}}``, leaving out a scope with nothing found (as ThingsBoard)."""
    body: dict[str, Any] = {}
    if snapshot.client:
        body["client"] = snapshot.client
    if snapshot.shared:
        body["shared"] = snapshot.shared
    return json.dumps(body, separators=(",", ":")).encode()


def parse_rpc_call(payload: bytes | str) -> dict[str, Any]:
    """A client-side RPC request: ``{"method": "<1..255 chars>", "params": <any JSON>}``
    (``params`` may be left out: it is then null). Returned normalised to exactly those two keys."""
    obj = load_json(payload)
    if not isinstance(obj, dict):
        raise DeviceApiError("an RPC request must be a JSON object")
    method = obj.get("method")
    if not isinstance(method, str) or not method or len(method) > MAX_METHOD:
        raise DeviceApiError(f'an RPC request needs a "method" of 1 to {MAX_METHOD} characters')
    return {"method": method, "params": obj.get("params")}


def parse_rpc_response(payload: bytes | str) -> bytes:
    """A device's answer to a server-side RPC: any JSON document, passed on unchanged.

    ThingsBoard takes any payload here; we require JSON so that the backend gets what the contract says."""
    load_json(payload)
    return payload.encode() if isinstance(payload, str) else bytes(payload)


def render_server_rpc(downlink: Downlink, request_id: int | None = None) -> bytes:
    """A server-side RPC as the device receives it: ``{"method", "params"}`` on MQTT (the id is in the
    topic), ``{"id", "method", "params"}`` over HTTP and CoAP."""
    body: dict[str, Any] = {}
    if request_id is not None:
        body["id"] = request_id
    body["method"] = downlink.body.get("method")
    body["params"] = downlink.body.get("params")
    return json.dumps(body, separators=(",", ":")).encode()


def render_attribute_update(downlink: Downlink) -> bytes:
    """A shared-attribute update as the device receives it: ``{"key": value}`` or ``{"deleted": [...]}``."""
    return json.dumps(downlink.body, separators=(",", ":")).encode()


# --- rate limits in ThingsBoard's notation -------------------------------------------------------------


@dataclass
class RateLimit:
    """ThingsBoard's ``"capacity:seconds,capacity:seconds"`` (e.g. ``"100:1,3000:60"``): every window must
    have room. Token buckets refilled continuously; ``""`` means no limit. One instance per session."""

    spec: str
    _buckets: list[list[float]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._buckets = [[float(cap), float(secs), float(cap), time.monotonic()] for cap, secs in parse_rate(self.spec)]

    @property
    def limited(self) -> bool:
        return bool(self._buckets)

    def allow(self, amount: int = 1) -> bool:
        """Take ``amount`` from every window, or nothing (and False) when one of them has no room."""
        now = time.monotonic()
        for bucket in self._buckets:
            capacity, seconds, tokens, last = bucket
            bucket[2] = min(capacity, tokens + (now - last) * capacity / seconds)
            bucket[3] = now
        if any(bucket[2] < amount for bucket in self._buckets):
            return False
        for bucket in self._buckets:
            bucket[2] -= amount
        return True


def parse_rate(spec: str) -> list[tuple[int, int]]:
    """``"100:1,3000:60"`` -> ``[(100, 1), (3000, 60)]``; raises ValueError on anything else."""
    windows: list[tuple[int, int]] = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        capacity, _, seconds = part.partition(":")
        cap, secs = int(capacity), int(seconds)
        if cap <= 0 or secs <= 0:
            raise ValueError(f"rate limit {part!r}: capacity and seconds must be positive")
        windows.append((cap, secs))
    return windows


@dataclass(frozen=True)
class SessionLimitsInfo:
    """What ``getSessionLimits`` answers: the limits the gateway really enforces on the session."""

    max_payload_size: int
    max_inflight_messages: int
    #: ThingsBoard's notation; "" = none. Keys: messages, telemetryMessages, telemetryDataPoints.
    rate_limits: Mapping[str, str]

    def render(self) -> bytes:
        return json.dumps(
            {
                "maxPayloadSize": self.max_payload_size,
                "maxInflightMessages": self.max_inflight_messages,
                "rateLimits": dict(self.rate_limits),
            },
            separators=(",", ":"),
        ).encode()
