"""JSON reading and writing with ThingsBoard's (Gson's) observable behaviour."""

from __future__ import annotations

import json
from typing import Any


class DialectError(ValueError):
    """The request cannot be understood; ``message`` is safe to show to the caller (no secrets)."""

    def __init__(self, message: str, dialect: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.dialect = dialect


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON literal {name}")


#: One decoder for every request (json.loads with keyword arguments builds a new one per call).
_DECODER = json.JSONDecoder(parse_int=str, parse_float=str, parse_constant=_reject_constant)


def loads_object(body: bytes) -> dict[str, Any]:
    """Parse a request body; numbers keep their source text, as Gson's ``getAsString`` does."""
    try:
        # Decode strictly first: json.loads(bytes) would let UTF-8-encoded surrogates through.
        text = body.decode("utf-8") if isinstance(body, (bytes, bytearray)) else body
        value = _DECODER.decode(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DialectError(f"Request body is not valid JSON: {_short(exc)}") from None
    except RecursionError:
        raise DialectError("Request body is not valid JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise DialectError("Request body must be a JSON object")
    return value


def _short(exc: Exception) -> str:
    # json's messages name a position, never the content: safe to echo.
    return str(exc).split("\n", 1)[0][:200]


def get_string(obj: dict[str, Any], key: str, *, required: bool = False) -> str:
    """Read a field like Gson's ``getAsString``: strings, numbers and booleans; not null/objects/arrays."""
    if key not in obj:
        if required:
            raise DialectError(f"Failed to find the field {key} in JSON body!")
        return ""
    value = obj[key]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise DialectError(f"Field {key} is not valid Unicode (lone surrogate)") from None
        return value
    kind = "null" if value is None else type(value).__name__.replace("dict", "object").replace("list", "array")
    raise DialectError(f"Field {key} must be a string, not {kind}")


def get_bool(obj: dict[str, Any], key: str) -> bool:
    """Gson ``getAsBoolean``: true/false, or a string that equals "true" ignoring case."""
    if key not in obj:
        return False
    value = obj[key]
    if isinstance(value, bool):
        return value
    if isinstance(value, str):  # numbers arrive as their text too
        return value.lower() == "true"
    raise DialectError(f"Field {key} must be a boolean")


def dumps(obj: dict[str, Any]) -> bytes:
    """Compact JSON as Gson writes it: no HTML escaping, raw UTF-8, U+2028/2029 escaped."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").encode("utf-8")
