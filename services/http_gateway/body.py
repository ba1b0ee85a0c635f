"""Reading request bodies under the gateway's size limit (shared by the provisioning fast path and the device API)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

JSON = "application/json"


async def read_body(scope: Mapping[str, Any], receive: Callable[..., Any], limit: int) -> bytes | None:
    """The whole body, or None as soon as it is known to exceed ``limit`` bytes."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            return None
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunk: bytes = message.get("body", b"")
        body += chunk
        if len(body) > limit:
            return None
        if not message.get("more_body"):
            return body
