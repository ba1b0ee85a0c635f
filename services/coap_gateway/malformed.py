"""Datagrams aiocoap cannot take: counted, and summarized in one WARNING per minute at most.

A CoAP port on the internet receives garbage all the time. aiocoap (0.4.17) reports each such datagram
on its own, in one of three ways, which at thousands per second would bury everything else:

* ``"Ignoring unparsable message from %s"``: WARNING on the ``coap-server`` logger (``transports/udp6.py``):
  bad version, token length, option encoding, or a payload marker without a payload.
* ``"Received a message with code %s and type %s (those don't fit) from %s, ignoring it."``: WARNING on
  ``coap-server`` (``messagemanager.py``): a request sent as an ACK, a response code in a CON, ...
* an exception raised out of udp6's ``datagram_msg_received``: ``Message.decode`` only catches its own
  ``UnparsableMessage``, so a string option (Uri-Path, Uri-Query, ...) that is not UTF-8 escapes as
  ``UnicodeDecodeError`` into the event loop, whose exception handler logs ``"Exception in callback ...rr()"``
  with a traceback (``asyncio`` logger). An exception raised further in, by ``dispatch_message``, is logged
  by udp6 first (``"Exception raised through dispatch_message: %s"``, ERROR with traceback), then re-raised.

:class:`MalformedDatagrams` takes those three over: a filter on the ``coap-server`` logger for the two
messages (compared by their format strings, so a reworded message in a later aiocoap shows up again
instead of vanishing), and the loop's exception handler for exceptions whose traceback runs through
aiocoap's datagram handler and through none of our code. Anything else goes where it went before:
an exception in our request handling is raised in a render task, which aiocoap logs ("An exception
occurred while rendering a resource") and answers 5.00, and that is never counted here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from types import TracebackType
from typing import Any

import aiocoap
import provisioning_common

log = logging.getLogger("coap_gateway.malformed")

#: At most one summary per this many seconds (and one more when the gateway stops).
SUMMARY_INTERVAL_S = 60.0
#: The logger aiocoap's server context writes to (``Context.create_server_context``'s default loggername).
AIOCOAP_LOGGER = "coap-server"

_UNPARSABLE = "Ignoring unparsable message from %s"
_MISFIT = "Received a message with code %s and type %s (those don't fit) from %s, ignoring it."
_DISPATCH_RAISED = "Exception raised through dispatch_message: %s"
_AIOCOAP_DIR = os.path.dirname(aiocoap.__file__) + os.sep
_OUR_DIRS = (os.path.dirname(__file__) + os.sep, os.path.dirname(provisioning_common.__file__) + os.sep)


def from_aiocoap_datagram_handler(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside aiocoap's udp6 ``datagram_msg_received`` and in none of our code.

    Walks the traceback: one of our frames anywhere means a bug of ours, which must stay visible.
    """
    handler = False
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_filename.startswith(_OUR_DIRS):
            return False
        if code.co_name == "datagram_msg_received" and code.co_filename.startswith(_AIOCOAP_DIR):
            handler = True
        tb = tb.tb_next
    return handler


def _kind(exc: BaseException) -> str:
    return "option not UTF-8" if isinstance(exc, UnicodeDecodeError) else type(exc).__name__


class MalformedDatagrams:
    """Counts malformed datagrams by kind and logs ``"N malformed CoAP datagrams dropped in the last 60 s
    (kind: n, ...)"`` at most once per :data:`SUMMARY_INTERVAL_S`, never a traceback per datagram."""

    def __init__(self, interval_s: float = SUMMARY_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._counts: Counter[str] = Counter()
        self._since = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous_handler: Any = None
        self.total = 0  # since start, for tests and debugging

    # --- what aiocoap reports --------------------------------------------------------------------

    def count(self, kind: str) -> None:
        """One more malformed datagram; the first one of a quiet period starts the summary's interval."""
        self.total += 1
        if not self._counts:
            self._since = time.monotonic()
            if self._loop is not None and self._timer is None:
                self._timer = self._loop.call_later(self._interval_s, self.flush)
        self._counts[kind] += 1

    def filter(self, record: logging.LogRecord) -> bool:
        """``logging`` filter for aiocoap's logger: count and drop its per-datagram complaints."""
        if record.msg == _UNPARSABLE:
            self.count("unparsable")
            return False
        if record.msg == _MISFIT:
            self.count("type and code do not fit")
            return False
        if record.msg == _DISPATCH_RAISED and record.exc_info and record.exc_info[1] is not None:
            # Counted once, when the same exception reaches the loop's exception handler.
            return not from_aiocoap_datagram_handler(record.exc_info[1])
        return True

    def exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The loop's exception handler: count what escaped aiocoap's datagram handler, pass on the rest."""
        exc = context.get("exception")
        if isinstance(exc, Exception) and from_aiocoap_datagram_handler(exc):
            self.count(_kind(exc))
            return
        if self._previous_handler is not None:
            self._previous_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    # --- life cycle --------------------------------------------------------------------------------

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(self.exception_handler)
        logging.getLogger(AIOCOAP_LOGGER).addFilter(self.filter)

    def uninstall(self) -> None:
        """Restore the loop's handler, remove the filter, and log what the last interval counted."""
        logging.getLogger(AIOCOAP_LOGGER).removeFilter(self.filter)
        if self._loop is not None:
            if self._loop.get_exception_handler() == self.exception_handler:
                self._loop.set_exception_handler(self._previous_handler)
            self._loop = None
        self.flush()

    def flush(self) -> None:
        """Log the interval's summary (if anything was counted) and start counting afresh."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._counts:
            return
        counts, self._counts = self._counts, Counter()
        kinds = ", ".join(f"{kind}: {n}" for kind, n in counts.most_common())
        log.warning("%d malformed CoAP datagrams dropped in the last %.0f s (%s)", sum(counts.values()),
                    max(time.monotonic() - self._since, 1.0), kinds)
