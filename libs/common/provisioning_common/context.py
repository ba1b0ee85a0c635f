"""The request id of the call being handled, in a context variable: one id per provision request,
made (or taken from a client's ``X-Request-Id``) by the gateway that received it, carried in the
``x-request-id`` header of every bus message sent on its behalf (:mod:`.bus`, like ``x-deadline``),
and set again by the serving side, so that the gateway's, the core's and the credentials service's
log lines (and provisioning events) of one request carry the same id::

    from provisioning_common.context import current_request_id
    current_request_id()  # "9f2c..." inside a request, None outside one

It is not the provision request's ``request_id`` (the idempotency key the core replays answers by):
a client chooses this one, so it must never decide anything.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import os
import re
import secrets
from collections.abc import Iterator

#: The bus message header (nameko's call-context style, beside ``x-deadline``).
REQUEST_ID_HEADER = "x-request-id"
#: The HTTP header a client may set (and that the HTTP gateway answers with).
HTTP_REQUEST_ID_HEADER = "X-Request-Id"
#: What a request id may be: short, and only characters that cannot break a log line or a header.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
MAX_REQUEST_ID_LENGTH = 64

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def current_request_id() -> str | None:
    """The request id of the call being handled in this task, or None outside any request."""
    return _request_id.get()


class _Ids:
    """Fresh request ids: a random 64-bit prefix per process (drawn again in a forked child) and a counter, so
    that ids never repeat across processes without a getrandom() per request (a uuid4 each cost ~2 us)."""

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.prefix = secrets.token_hex(8)
        self.counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


_IDS = _Ids()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_IDS.reseed)


def new_request_id() -> str:
    """A fresh request id (32 hex digits), unique across processes; not a secret (a client sees its own)."""
    return _IDS.next()


def valid_request_id(value: object) -> str | None:
    """``value`` as a request id if it is one (1-64 characters of ``[A-Za-z0-9._:-]``, starting with a
    letter or digit; bytes are decoded as ASCII), else None: anything else is ignored, never logged."""
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str) or len(value) > MAX_REQUEST_ID_LENGTH:
        return None
    return value if REQUEST_ID_PATTERN.fullmatch(value) else None


def choose_request_id(request_id: object = None) -> str:
    """The id a request runs under: ``request_id`` if it is valid, else the current one if a request is already
    being handled, else a fresh one."""
    return valid_request_id(request_id) or _request_id.get() or new_request_id()


@contextlib.contextmanager
def request_scope(request_id: object = None) -> Iterator[str]:
    """Run the block as one request, under :func:`choose_request_id`'s id. Yields the id in force."""
    chosen = choose_request_id(request_id)
    token = _request_id.set(chosen)
    try:
        yield chosen
    finally:
        _request_id.reset(token)


def set_request_id(request_id: object) -> contextvars.Token[str | None]:
    """Set the request id for the rest of this task's context (a valid one, else none); reset with the token."""
    return _request_id.set(valid_request_id(request_id))


def reset_request_id(token: contextvars.Token[str | None]) -> None:
    _request_id.reset(token)
