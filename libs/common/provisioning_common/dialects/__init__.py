"""Wire dialects: the one place where JSON bodies become :class:`ProvisionRequest` and back.

Every transport calls :func:`parse_provision_request` and :func:`render_result`; the dialect is
chosen from the body (``provision_key`` without ``provisionDeviceKey`` means Innoway), never from
the transport, so any endpoint answers each request in the dialect it was asked in.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ..models import Dialect, ProvisionRequest, ProvisionResult, Transport
from . import innoway, protobuf, thingsboard
from ._json import DialectError, loads_object
from .limits import check_request

__all__ = ["DialectError", "EXTRA_MAX_BYTES", "EXTRA_MAX_DEPTH", "parse_provision_request", "render_result",
           "render_error", "detect_dialect"]

#: The most the fields a device sends beyond its dialect's own (``ProvisionRequest.extra``, for the profile's
#: pre-provisioning hook) may take as compact UTF-8 JSON; more (or text that is not Unicode) are dropped (the
#: hook sees ``"extra": null``), never refused, since ThingsBoard accepts any field it does not read.
EXTRA_MAX_BYTES = 4096
#: ... and at most this deep (arrays and objects in one another; the bus's JSON parser stops at 200).
EXTRA_MAX_DEPTH = 32

_MODULES: dict[Dialect, ModuleType] = {
    Dialect.THINGSBOARD: thingsboard,
    Dialect.INNOWAY: innoway,
    Dialect.PROTOBUF: protobuf,
}


def detect_dialect(obj: dict[str, object]) -> Dialect:
    if innoway.KEY_FIELD in obj and thingsboard.KEY_FIELD not in obj:
        return Dialect.INNOWAY
    return Dialect.THINGSBOARD


def parse_provision_request(
    body: bytes, *, transport: Transport, source_address: str = "", protobuf_fallback: bool = False
) -> ProvisionRequest:
    """Parse a provision payload in whichever dialect it is written.

    With ``protobuf_fallback`` (MQTT, CoAP), a payload that is not a JSON object is decoded as
    ThingsBoard's ``ProvisionDeviceRequestMsg``, as ThingsBoard does. Every string field is then
    checked against ``limits.FIELD_LIMITS`` (length, control characters), here and nowhere else.
    Raises :class:`DialectError` whose ``dialect`` says how to render the error.
    """
    try:
        obj = loads_object(body)
    except DialectError as exc:
        if not protobuf_fallback:
            exc.dialect = Dialect.THINGSBOARD
            raise
        dialect, request = Dialect.PROTOBUF, protobuf.parse(body, transport=transport, source_address=source_address)
    else:
        dialect = detect_dialect(obj)
        try:
            request = _MODULES[dialect].parse(obj, transport=transport, source_address=source_address)
        except DialectError as exc:
            exc.dialect = dialect
            raise
        if not _MODULES[dialect].FIELDS.issuperset(obj):
            request = request.model_copy(update={"extra": _extra(body, _MODULES[dialect].FIELDS)})
    try:
        check_request(request, _MODULES[dialect].WIRE_NAMES)
    except DialectError as exc:
        exc.dialect = dialect
        raise
    return request


def _extra(body: bytes, fields: frozenset[str]) -> dict[str, Any] | None:
    """The body's fields other than ``fields``, with their JSON types (the dialects read numbers as their
    source text, as Gson does): parsed again, only for the bodies that have such fields."""
    try:
        extra = {k: v for k, v in json.loads(body).items() if k not in fields}
        if not _shallow(extra, EXTRA_MAX_DEPTH):
            return None
        # As UTF-8: a lone surrogate (a "\ud800" escape) cannot cross the bus, and drops them like excess.
        encoded = json.dumps(extra, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return extra if len(encoded) <= EXTRA_MAX_BYTES else None
    except (RecursionError, ValueError):  # UnicodeEncodeError is a ValueError
        return None


def _shallow(value: Any, depth: int) -> bool:
    """Whether ``value`` nests at most ``depth`` arrays/objects deep (checked without recursion)."""
    level: list[Any] = [value]
    for _ in range(depth + 1):
        level = [v for item in level if isinstance(item, (dict, list))
                 for v in (item.values() if isinstance(item, dict) else item)]
        if not level:
            return True
    return False


def render_result(dialect: Dialect, result: ProvisionResult) -> bytes:
    render: Callable[[ProvisionResult], bytes] = _MODULES[dialect].render
    return render(result)


def render_error(dialect: Dialect, message: str) -> bytes:
    render: Callable[[str], bytes] = _MODULES[dialect].render_error
    return render(message)
