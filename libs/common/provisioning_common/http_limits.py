"""Limits on slow, idle and hostile HTTP clients for every uvicorn listener of ours.

uvicorn with httptools (what ``runtime.serve_http`` runs: http_gateway, admin_api, broker_auth) has
no limit on the size of a request head, no deadline for a head or a body to arrive and no cap on
connections: ``h11_max_incomplete_event_size`` applies to h11 only, and ``limit_concurrency`` answers
503 only once a whole head has arrived, which slowloris never sends. Measured before this module:
5,000 slowloris connections held 60 s, an 8 MB header accepted, and 21,000 idle connections used up
the descriptor limit while new devices were refused with nothing logged. Found while building
this: uvicorn queues every pipelined request it parses (thousands per read), waits without end for
a client that does not read its answers, and leaves a connection answered before its body ended
without an idle timer; those are bounded here too.

``LimitedHttpToolsProtocol`` adds these limits around uvicorn's own protocol (one instance per
connection), ``ConnectionGuard`` holds what one process shares (counters, the cap's log episodes,
descriptor exhaustion), and ``serve`` runs uvicorn with both. Each limit is a setting
(``HTTP_MAX_HEADER_BYTES``, ``HTTP_HEADER_TIMEOUT_S``, ``HTTP_BODY_TIMEOUT_S``,
``HTTP_KEEP_ALIVE_TIMEOUT_S``, ``HTTP_MAX_CONNECTIONS``). The descriptor limit, fitting the cap below
it and noticing exhaustion are :mod:`provisioning_common.descriptors`, shared with the MQTT gateway.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .descriptors import descriptor_shortage, fit_connection_cap, raise_nofile_limit, soft_nofile_limit
from .settings import Settings

log = logging.getLogger(__name__)

#: Descriptors kept below RLIMIT_NOFILE for everything but held connections: the broker and
#: database connections, log files, libuv's own, and refused connections being closed.
RESERVED_DESCRIPTORS = 128
#: How long a refused (503) or rejected (431) connection keeps reading and dropping what the client
#: still sends before it is closed: closing at once with unread input makes the kernel send a reset,
#: which can destroy the answer before the client reads it.
LINGER_S = 2.0
#: At most one "cap reached" or "out of descriptors" WARNING per this many seconds; the counts of
#: what the limits did are logged (INFO) at most this often too.
LOG_INTERVAL_S = 60.0
#: Requests a client may send ahead of its answers (HTTP/1.1 pipelining, which devices and browsers
#: do not use); beyond this the connection is closed.
MAX_PIPELINED = 32
#: Largest piece of input handed to the parser at once, bounding the pipelined requests one read can
#: queue before MAX_PIPELINED is checked.
FEED_BYTES = 4096
#: uvicorn server ticks (0.1 s each) between checks for descriptor exhaustion: about one a second.
DESCRIPTOR_CHECK_TICKS = 10


@dataclass(frozen=True)
class HttpLimits:
    """The limits of one HTTP listener; see the ``http_*`` settings for their meaning."""

    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    keep_alive_timeout_s: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        return cls(
            max_header_bytes=settings.http_max_header_bytes,
            header_timeout_s=settings.http_header_timeout_s,
            body_timeout_s=settings.http_body_timeout_s,
            keep_alive_timeout_s=settings.http_keep_alive_timeout_s,
            max_connections=settings.http_max_connections,
        )


def fit_descriptor_limit(limits: HttpLimits) -> HttpLimits:
    """Raise the soft RLIMIT_NOFILE to the hard limit; lower ``HTTP_MAX_CONNECTIONS`` if it does not fit below it.

    See :mod:`provisioning_common.descriptors` for why. Here the reserve is RESERVED_DESCRIPTORS but at
    most a quarter of the limit, so that a small limit still leaves most descriptors to connections.
    """
    _, soft = raise_nofile_limit()
    cap = fit_connection_cap(limits.max_connections, soft, setting="HTTP_MAX_CONNECTIONS",
                             reserve=min(RESERVED_DESCRIPTORS, soft // 4), logger=log)
    return limits if cap == limits.max_connections else replace(limits, max_connections=cap)


class ConnectionGuard:
    """What the connections of one process share: the limits, counters and rate-limited log lines.

    Slowloris means thousands of closed connections a minute, so nothing here logs per connection:
    reaching the cap and running out of descriptors are logged once per episode (at most once per
    ``LOG_INTERVAL_S``), and what the limits closed is summed up at most once per ``LOG_INTERVAL_S``.
    """

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        #: Refused or rejected connections still open (reading what the client sends, see LINGER_S).
        self.lingering = 0
        #: Above this many lingering connections a refused one is closed at once: lingering must not
        #: use the descriptors the cap keeps free.
        self.max_lingering = max(1, min(RESERVED_DESCRIPTORS, limits.max_connections) // 2)
        self.counts: Counter[str] = Counter()
        self._at_cap = False
        self._cap_logged_at = -LOG_INTERVAL_S
        self._out_of_descriptors_since: float | None = None
        self._descriptors_logged_at = -LOG_INTERVAL_S
        self._summary_at = time.monotonic()

    def refused(self, open_connections: int) -> None:
        """A connection was refused because ``open_connections`` reached the cap."""
        self.counts["refused"] += 1
        if self._at_cap:
            return
        self._at_cap = True
        now = time.monotonic()
        if now - self._cap_logged_at >= LOG_INTERVAL_S:
            self._cap_logged_at = now
            log.warning(
                "HTTP connection cap reached: %d connections open (HTTP_MAX_CONNECTIONS=%d); new connections "
                "get 503 with Retry-After and are closed until some of these close",
                open_connections, self.limits.max_connections,
            )

    def admitted(self) -> None:
        """A connection was accepted under the cap: the current episode at the cap, if any, is over."""
        self._at_cap = False

    def tick(self, open_connections: int) -> None:
        """Called about once a second: check for descriptor exhaustion, log the periodic summary."""
        now = time.monotonic()
        self.check_descriptors(open_connections, now)
        if now - self._summary_at >= LOG_INTERVAL_S:
            self._summary_at = now
            self.log_summary()

    def check_descriptors(self, open_connections: int, now: float | None = None) -> None:
        """Log the start and the end of an episode without free descriptors.

        uvloop (libuv) hides EMFILE on accept: it accepts and at once closes pending connections and
        tells nobody; :func:`~provisioning_common.descriptors.descriptor_shortage` notices it. Polled
        each second, the episode ends as soon as a descriptor is free again.
        """
        now = time.monotonic() if now is None else now
        shortage = descriptor_shortage()
        if shortage is not None:
            if self._out_of_descriptors_since is None:
                self._out_of_descriptors_since = now
                if now - self._descriptors_logged_at >= LOG_INTERVAL_S:
                    self._descriptors_logged_at = now
                    log.warning(
                        "Out of file descriptors (%s, RLIMIT_NOFILE %d, %d HTTP connections open): new "
                        "connections are accepted and closed at once until descriptors are free; lower "
                        "HTTP_MAX_CONNECTIONS or raise the hard descriptor limit",
                        shortage, soft_nofile_limit(), open_connections,
                    )
        elif self._out_of_descriptors_since is not None:
            log.warning("File descriptors available again after %.0f s without: accepting connections",
                        now - self._out_of_descriptors_since)
            self._out_of_descriptors_since = None

    def log_summary(self) -> None:
        """One INFO line with what the limits did since the previous one (nothing when they did nothing)."""
        if not self.counts:
            return
        counts, self.counts = self.counts, Counter()
        log.info(
            "HTTP limits since the last summary: %d connections closed at the header deadline "
            "(HTTP_HEADER_TIMEOUT_S), %d at the body deadline (HTTP_BODY_TIMEOUT_S), %d heads over "
            "HTTP_MAX_HEADER_BYTES (431), %d connections refused at the cap (503), %d closed with answers "
            "left unread for HTTP_BODY_TIMEOUT_S, %d closed for more than %d pipelined requests",
            counts["header"], counts["body"], counts["oversized"], counts["refused"], counts["unread"],
            counts["pipelined"], MAX_PIPELINED,
        )


def _plain_response(status: int, text: bytes, extra: bytes = b"") -> bytes:
    """A whole response written by the protocol itself (no app involved), ending the connection."""
    return b"".join([
        STATUS_LINE[status], extra, b"content-type: text/plain; charset=utf-8\r\n",
        b"content-length: %d\r\n" % len(text), b"connection: close\r\n\r\n", text,
    ])


_TOO_LARGE_TEXT = b"Request header fields too large"
_HEADER_TOO_LARGE = _plain_response(431, _TOO_LARGE_TEXT)
_REFUSED = _plain_response(503, b"Too many connections; retry later", b"retry-after: 1\r\n")


async def _header_too_large_app(scope: Any, receive: Any, send: Any) -> None:
    """Answers a request whose head was over the limit but arrived whole (pipelined after another)."""
    await send({"type": "http.response.start", "status": 431, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(_TOO_LARGE_TEXT)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": _TOO_LARGE_TEXT})


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head size limit, read deadlines and a connection cap.

    - Cap: a connection beyond ``max_connections`` open ones gets 503 + Retry-After + Connection:
      close at once (no request is read), then is closed.
    - Head: the request line and headers must arrive within ``header_timeout_s`` of the accept (or,
      on a kept-alive connection, of the first byte of the next request: the wait for that byte is
      uvicorn's keep-alive timeout) and be at most ``max_header_bytes``; bytes are counted as they
      arrive, so an oversized head is never buffered whole. Over the limit: 431, then closed.
    - Body: from the end of the head to the end of the body at most ``body_timeout_s``; an answer
      the client does not read (the write buffer stays full) also gets ``body_timeout_s``.
    - Pipelining: more than MAX_PIPELINED requests ahead of their answers close the connection.
    A deadline that passes closes the connection without an answer (the client is gone or hostile).

    A deadline is noted when its phase starts, but a timer is armed only when a read ends with the
    phase unfinished: a request that arrives whole costs no timer.

    Only uvicorn's protocol hooks are extended (``connection_made``, ``data_received``,
    ``on_headers_complete``, ``on_message_complete``, ``pause_writing``, ``resume_writing``,
    ``connection_lost``); each calls uvicorn's own.
    """

    guard: ClassVar[ConnectionGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase: str | None = None  # "header" or "body" while one is being read
        self._phase_ends = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_for: str | None = None  # "header", "body", "idle" or "linger"
        self._write_deadline: asyncio.TimerHandle | None = None
        self._unanswered: list[Any] = []  # pipelined requests without a complete answer
        self._reading_head = True
        self._head_bytes = 0
        self._discarding = False
        self._lingers = False

    # --- connection ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.guard.limits.max_connections:
            self.transport = transport
            self.guard.refused(len(self.connections))
            self._answer_and_close(_REFUSED)
            return
        self.guard.admitted()
        super().connection_made(transport)
        self._start_phase("header", self.guard.limits.header_timeout_s)
        self._arm_phase_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._cancel_write_deadline()
        # uvicorn tells only its latest request that the client is gone; a pipelined one that is
        # running (e.g. waiting for a full write buffer) would then write to the closed transport
        # and log a traceback.
        for cycle in self._unanswered:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        if self._lingers:
            self._lingers = False
            self.guard.lingering -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._timer_for == "idle":
            self._cancel_timer()
        if self._reading_head and self._phase is None:  # the first byte of a request after another
            self._start_phase("header", self.guard.limits.header_timeout_s)
        limit = self.guard.limits.max_header_bytes
        # Feed the parser in pieces: while a head is read, at most what it may still take (the parser
        # buffers an unfinished header whole, so an oversized head is refused before it is ever held
        # in memory); otherwise FEED_BYTES, so a flood of pipelined requests is stopped after a few.
        while data:
            size = FEED_BYTES
            if self._reading_head:
                size = min(size, limit - self._head_bytes)
                if size <= 0:
                    self._head_too_large()
                    return
            piece, data = data[:size], data[size:]
            if self._reading_head:
                self._head_bytes += len(piece)
            super().data_received(piece)
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                return
            if len(self.pipeline) > MAX_PIPELINED:
                self._too_many_pipelined()
                return
        self._arm_phase_timer()

    def pause_writing(self) -> None:
        """The client does not read its answers: uvicorn waits for it without end; we do not."""
        if self.flow is None:  # a refused connection: uvicorn's flow control was never set up
            return
        super().pause_writing()
        if self._write_deadline is None:
            self._write_deadline = self.loop.call_later(self.guard.limits.body_timeout_s, self._write_stalled)

    def resume_writing(self) -> None:
        self._cancel_write_deadline()
        if self.flow is not None:
            super().resume_writing()

    # --- parser callbacks ---------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._start_phase("body", self.guard.limits.body_timeout_s)
        previous = self.cycle
        if self._parsed_head_bytes() > self.guard.limits.max_header_bytes:
            # A pipelined head that arrived in the same read as the request before it was not
            # counted in data_received; answer it through uvicorn, after the responses before it.
            self.guard.counts["oversized"] += 1
            self.app, app = _header_too_large_app, self.app
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        else:
            super().on_headers_complete()
        if self.pipeline:  # this request waits behind an unanswered one
            self._unanswered = [c for c in self._unanswered if not c.response_complete]
            self._unanswered += [c for c in (previous, self.cycle) if c is not None and c not in self._unanswered]

    def on_message_complete(self) -> None:
        self._phase = None
        if self._timer_for == "body":
            self._cancel_timer()
        self._reading_head = True
        self._head_bytes = 0
        super().on_message_complete()
        if self.cycle is not None and self.cycle.response_complete and not self.transport.is_closing():
            # Answered before the body ended (e.g. 413): uvicorn armed its keep-alive timer at the
            # response and the body's bytes cancelled it; an idle connection must still be closed.
            self._arm_timer("idle", self.timeout_keep_alive)

    # --- helpers ------------------------------------------------------------------------------

    def _parsed_head_bytes(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _too_many_pipelined(self) -> None:
        """uvicorn queues every pipelined request it parses (~9,000 from one 256 KB read of tiny ones)
        and answers one per read: without a bound, one client grows the process by gigabytes."""
        self.guard.counts["pipelined"] += 1
        self.transport.abort()

    def _head_too_large(self) -> None:
        self.guard.counts["oversized"] += 1
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # an answer to an earlier request is still due: nothing may precede it
            return
        self._answer_and_close(_HEADER_TOO_LARGE)

    def _answer_and_close(self, response: bytes) -> None:
        """Write ``response``, stop sending, drop what the client still sends, close after LINGER_S."""
        self._discarding = True
        self._phase = None
        transport = self.transport
        transport.write(response)
        if self.guard.lingering >= self.guard.max_lingering or not transport.can_write_eof():
            self._cancel_timer()
            transport.close()
            return
        self.guard.lingering += 1
        self._lingers = True
        transport.write_eof()
        self._arm_timer("linger", LINGER_S)

    def _start_phase(self, phase: str, seconds: float) -> None:
        """Note when ``phase`` must be over; a timer for another phase is no longer wanted."""
        self._phase = phase
        self._phase_ends = self.loop.time() + seconds
        if self._timer_for is not None and self._timer_for != phase:
            self._cancel_timer()

    def _arm_phase_timer(self) -> None:
        """A read ended with the head or body unfinished: make sure its deadline will be enforced."""
        if self._phase is not None and self._timer_for != self._phase:
            self._cancel_timer()
            self._timer = self.loop.call_at(self._phase_ends, self._expire, self._phase)
            self._timer_for = self._phase

    def _arm_timer(self, what: str, delay: float) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(delay, self._expire, what)
        self._timer_for = what

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_for = None

    def _cancel_write_deadline(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _write_stalled(self) -> None:
        self._write_deadline = None
        if self.transport.get_protocol() is self:
            self.guard.counts["unread"] += 1
            self.transport.abort()

    def _expire(self, what: str) -> None:
        self._timer = None
        self._timer_for = None
        if self.transport.is_closing() and not self._lingers:
            return
        if self.transport.get_protocol() is not self:  # upgraded to another protocol
            return
        if what in ("header", "body"):
            self.guard.counts[what] += 1
        self.transport.abort()  # nothing useful is left to send; do not wait on a client that does not read


def protocol_class(limits: HttpLimits) -> type[LimitedHttpToolsProtocol]:
    """A protocol class bound to one process's guard (uvicorn builds protocols from a class)."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"guard": ConnectionGuard(limits)})


class LimitedServer(uvicorn.Server):
    """uvicorn's server that also checks, about once a second, for descriptor exhaustion."""

    def __init__(self, config: uvicorn.Config, guard: ConnectionGuard) -> None:
        super().__init__(config)
        self.guard = guard

    async def on_tick(self, counter: int) -> bool:
        if counter % DESCRIPTOR_CHECK_TICKS == 0:
            self.guard.tick(len(self.server_state.connections))
        return await super().on_tick(counter)


def trusted_proxies(setting: str) -> list[str]:
    """``FORWARDED_ALLOW_IPS`` as uvicorn takes it: IPs and CIDRs (or ``*``); raises SystemExit on a typo.

    uvicorn would take a malformed entry as a literal that never matches, silently trusting nobody."""
    entries = [entry.strip() for entry in setting.split(",") if entry.strip()]
    if entries == ["*"]:
        return entries
    for entry in entries:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise SystemExit(f"FORWARDED_ALLOW_IPS: {entry!r} is not an IP address or network") from None
    return entries


def serve(app: object, *, host: str, port: int, settings: Settings, access_log: bool,
          timeout_graceful_shutdown: int) -> None:
    """Run ``app`` with uvicorn (uvloop + httptools) under the HTTP_* limits of ``settings``.

    The client address (``scope["client"]``: rate limits, logs) is the peer's, or, when the peer is one of
    ``FORWARDED_ALLOW_IPS``, the nearest address in ``X-Forwarded-For`` that is not a trusted proxy. By
    default nobody is trusted (uvicorn alone would trust 127.0.0.1, so that any local proxy let its clients
    choose their address)."""
    limits = fit_descriptor_limit(HttpLimits.from_settings(settings))
    proxies = trusted_proxies(settings.forwarded_allow_ips)
    protocol = protocol_class(limits)
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        loop="uvloop",
        http=protocol,
        access_log=access_log,
        log_config=None,
        proxy_headers=bool(proxies),
        forwarded_allow_ips=proxies or [],
        timeout_keep_alive=limits.keep_alive_timeout_s,  # type: ignore[arg-type]  # a float works
        timeout_graceful_shutdown=timeout_graceful_shutdown,
    )
    log.info(
        "HTTP limits: head %d bytes within %g s, body within %g s, keep-alive %g s, %d connections",
        limits.max_header_bytes, limits.header_timeout_s, limits.body_timeout_s, limits.keep_alive_timeout_s,
        limits.max_connections,
    )
    server = LimitedServer(config, protocol.guard)
    server.run()
    if not server.started:
        raise SystemExit(3)  # uvicorn.run's exit code when start-up failed (e.g. port in use)
