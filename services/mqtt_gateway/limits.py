"""Resource limits of the MQTT listener: the connection cap, file descriptors, and logging them once.

Why a module of its own: a listener on the open internet meets idle sockets, slow and half-sent
packets and more clients than it can hold. Deadlines per connection live in the session and the codec;
what is per *process* lives here:

* :class:`ConnectionGate` counts every accepted connection (plain and TLS, TLS from the TCP accept on,
  handshake included, since that is when the descriptor is taken) against ``MQTT_MAX_CONNECTIONS``;
* :func:`raise_nofile_limit` lifts the soft ``RLIMIT_NOFILE`` to the hard one (the soft default of
  1024 would cap a gateway at about a thousand devices), and :func:`effective_connection_cap` keeps the
  cap below what the process can actually open, so that a full gateway refuses cleanly rather than
  by running out of descriptors (both are :mod:`provisioning_common.descriptors`, shared with HTTP;
  here is what the MQTT gateway keeps free, FD_RESERVE);
* :class:`DescriptorWatch` notices when descriptors run out anyway (something else holds them): asyncio
  would log a traceback per failed ``accept()`` and uvloop (libuv) says nothing at all;
* :class:`EpisodeLog` turns a flood of identical events into one WARNING when it starts and one INFO
  line with the count when it is over, which is what an operator can act on.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable
from typing import Any

from provisioning_common.descriptors import (
    connection_cap,
    descriptor_shortage,
    is_descriptor_shortage,
    raise_nofile_limit,  # here for server.py, with the gateway's other limits
)

log = logging.getLogger(__name__)

__all__ = [
    "ConnectionGate",
    "DescriptorWatch",
    "EpisodeLog",
    "effective_connection_cap",
    "raise_nofile_limit",
]

#: Descriptors kept free for everything but client sockets: listeners, the RabbitMQ connection, the
#: health listener, the event loop's own, log files, and the connections being refused (see server.py).
FD_RESERVE = 128

#: ``accept()`` failures asyncio reports through the loop's exception handler with this message.
_ACCEPT_OUT_OF_RESOURCES = "socket.accept() out of system resource"


class EpisodeLog:
    """One WARNING when a run of events starts, one INFO line when it has been quiet for ``quiet_s``.

    An *episode* is a run of events (refused connections, failed accepts) with gaps shorter than
    ``quiet_s``. Thousands of refusals a second thus give two log lines, not thousands, and a problem
    that comes back after a quiet spell is reported again.
    """

    def __init__(
        self,
        logger: logging.Logger,
        warning: str,
        summary: str,
        *,
        quiet_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``warning`` is logged as is; ``summary`` is a format with ``{count}`` and ``{seconds}``."""
        self._log = logger
        self._warning = warning
        self._summary = summary
        self._quiet_s = quiet_s
        self._clock = clock
        self._started: float | None = None
        self._last = 0.0
        self._count = 0
        self._timer: asyncio.TimerHandle | None = None
        #: Episodes started so far (tests and metrics).
        self.episodes = 0

    @property
    def active(self) -> bool:
        return self._started is not None

    def event(self, detail: str = "") -> None:
        """Record one event; logs the WARNING if this event starts an episode."""
        now = self._clock()
        if self._started is not None and now - self._last >= self._quiet_s:
            self._end(now)
        if self._started is None:
            self._started = now
            self._count = 0
            self.episodes += 1
            self._log.warning("%s%s", self._warning, f" ({detail})" if detail else "")
            self._arm(self._quiet_s)
        self._count += 1
        self._last = now

    def _arm(self, delay: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # outside a loop (unit tests): the end is noticed at the next event
            return
        self._timer = loop.call_later(max(delay, 0.01), self._check)

    def _check(self) -> None:
        self._timer = None
        if self._started is None:
            return
        remaining = self._last + self._quiet_s - self._clock()
        if remaining > 0:
            self._arm(remaining)
        else:
            self._end(self._clock())

    def _end(self, now: float) -> None:
        assert self._started is not None
        seconds = max(0.0, self._last - self._started)
        self._log.info(self._summary.format(count=self._count, seconds=round(seconds, 1)))
        self._started = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        """Cancel the pending end-of-episode timer (on shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def effective_connection_cap(configured: int, soft_limit: int) -> int:
    """``MQTT_MAX_CONNECTIONS`` lowered to fit ``soft_limit`` with FD_RESERVE kept (``connection_cap``)."""
    return connection_cap(configured, soft_limit, reserve=FD_RESERVE)


class ConnectionGate:
    """Counts the open client connections of both listeners against one cap.

    ``try_enter`` at accept, ``leave`` when that connection is gone. A refusal records an event in
    the cap's :class:`EpisodeLog`: one WARNING naming ``MQTT_MAX_CONNECTIONS`` per episode.
    """

    def __init__(self, cap: int, *, quiet_s: float = 60.0) -> None:
        self.cap = cap
        self.open = 0
        self.refused = 0
        self.episode = EpisodeLog(
            log,
            f"MQTT connection limit reached: {cap} connections open (MQTT_MAX_CONNECTIONS); "
            "new connections are refused (CONNACK 'server unavailable' on the plain port, closed at accept "
            "on the TLS port) until some close",
            "MQTT connection limit episode over: {count} connection(s) refused in {seconds} s "
            "(MQTT_MAX_CONNECTIONS)",
            quiet_s=quiet_s,
        )

    def try_enter(self) -> bool:
        """Count a new connection in; False (and the connection must be refused) at the cap."""
        if self.open >= self.cap:
            self.refused += 1
            self.episode.event()
            return False
        self.open += 1
        return True

    def leave(self) -> None:
        """A counted connection is gone."""
        if self.open > 0:
            self.open -= 1


class DescriptorWatch:
    """Logs "out of file descriptors" once per episode, on asyncio's and uvloop's event loops alike.

    * asyncio reports each failed ``accept()`` (EMFILE/ENFILE) to the loop's exception handler, which by
      default logs an ERROR with a traceback every time: :meth:`install` routes those reports here.
    * uvloop (libuv) hides EMFILE on accept: it accepts the waiting connections on a reserved descriptor
      and closes them at once. Nothing reaches Python, so :meth:`after_accept` checks, at each accepted
      connection, whether one more descriptor could still be opened (``descriptor_shortage``): when the
      connection just accepted took the last one, the next clients will be turned away.

    The listener itself keeps running in both cases; the log tells the operator why clients fail.
    """

    def __init__(self, *, quiet_s: float = 60.0) -> None:
        self.episode = EpisodeLog(
            log,
            "MQTT listener out of file descriptors (RLIMIT_NOFILE): new connections are being refused by the "
            "operating system; raise the hard limit (ulimit -n, LimitNOFILE=, docker --ulimit nofile=) or "
            "lower MQTT_MAX_CONNECTIONS",
            "MQTT listener has file descriptors again: {count} failure(s) in {seconds} s",
            quiet_s=quiet_s,
        )
        self._previous_handler: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take over the loop's reports of failed accepts; every other report goes where it went before."""
        self._previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._handle)

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if context.get("message") == _ACCEPT_OUT_OF_RESOURCES or (
            is_descriptor_shortage(exc) and "accept" in str(context.get("message"))
        ):
            self.episode.event(_describe(exc))
            return
        if self._previous_handler is not None:
            self._previous_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    def after_accept(self) -> None:
        """Check that a descriptor is still available after a connection took one."""
        shortage = descriptor_shortage()
        if shortage is not None:
            self.episode.event(shortage)

    def close(self) -> None:
        """Cancel the episode timer (on shutdown)."""
        self.episode.close()


def _describe(exc: object) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    return type(exc).__name__ if exc is not None else ""
