"""File descriptors of a process that holds many client connections: the limit, the cap, running out.

Every listener of ours (HTTP through uvicorn, MQTT plain and TLS) pays one descriptor per client
connection, so the same three things matter to each of them:

* the soft ``RLIMIT_NOFILE`` is often 1024 while the hard one allows far more: without
  :func:`raise_nofile_limit` a gateway would stop at about a thousand devices;
* a connection cap above what the process can open is a lie: the process runs out of descriptors
  first, and then the event loop drops new connections (uvloop silently) while the held ones, maybe
  idle attackers, stay. :func:`fit_connection_cap` lowers the cap below the limit, saying so, so that
  a full listener refuses cleanly instead;
* when descriptors run out anyway (something else holds them), nothing tells the operator:
  :func:`descriptor_shortage` checks whether one more descriptor could be opened.

What each transport does about it (uvicorn's protocol and server tick for HTTP, the accept loop and
the event loop's exception handler for MQTT) and how it logs an episode stays with the transport.
"""

from __future__ import annotations

import errno
import logging
import os

try:
    import resource
except ImportError:  # pragma: no cover - not POSIX: no descriptor limit to read or raise
    resource = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

__all__ = ["connection_cap", "descriptor_shortage", "fit_connection_cap", "is_descriptor_shortage",
           "raise_nofile_limit", "soft_nofile_limit"]

#: The errors of an ``open``/``accept``/``dup`` that found no free descriptor: EMFILE is this
#: process's limit (RLIMIT_NOFILE), ENFILE the whole system's.
_SHORTAGE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; returns the soft limit (before, after).

    The soft limit is what the process can open now, and is often 1024; the hard limit is how far an
    unprivileged process may raise it. When the hard limit is "unlimited", Linux still refuses
    anything above ``fs.nr_open``, so that is the target then. Nothing is changed where the kernel
    refuses (logged as a WARNING) or the soft limit is unlimited already; ``(0, 0)`` where there is
    no ``resource`` module (not POSIX), meaning "unknown". An unlimited value is
    ``resource.RLIM_INFINITY``.
    """
    if resource is None:  # pragma: no cover - not POSIX
        return (0, 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _nr_open(fallback=soft)
    if soft == resource.RLIM_INFINITY or target <= soft:
        return (soft, soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("Could not raise the descriptor limit RLIMIT_NOFILE from %d to %d: %s", soft, target, exc)
        return (soft, soft)
    return (soft, target)


def soft_nofile_limit() -> int:
    """The soft ``RLIMIT_NOFILE`` now, for messages about running out; 0 if unknown (not POSIX)."""
    if resource is None:  # pragma: no cover - not POSIX
        return 0
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _nr_open(fallback: int) -> int:
    """The kernel's ceiling for any descriptor limit (Linux ``fs.nr_open``), or ``fallback`` if unknown."""
    try:
        with open("/proc/sys/fs/nr_open") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return fallback


def connection_cap(configured: int, soft_limit: int, *, reserve: int) -> int:
    """``configured``, lowered to leave ``reserve`` of the ``soft_limit`` descriptors for other uses.

    The reserve is for what is not a client connection: listeners, broker and database connections,
    the event loop's own, log files, connections being refused. At least 1. A ``soft_limit`` of 0
    (unknown) or ``RLIM_INFINITY`` leaves ``configured`` as it is.
    """
    if soft_limit <= 0 or (resource is not None and soft_limit == resource.RLIM_INFINITY):
        return configured
    return max(1, min(configured, soft_limit - reserve))


def fit_connection_cap(configured: int, soft_limit: int, *, setting: str, reserve: int,
                       logger: logging.Logger) -> int:
    """:func:`connection_cap`, with a WARNING on ``logger`` naming ``setting`` when the cap is lowered.

    The operator set ``setting`` and gets less: the line says what was configured, what fits, and
    how to allow more (the hard limit, which this process cannot raise itself).
    """
    cap = connection_cap(configured, soft_limit, reserve=reserve)
    if cap < configured:
        logger.warning(
            "%s=%d does not fit below the descriptor limit (RLIMIT_NOFILE %d, of which %d are kept for other "
            "uses): capping connections at %d; raise the hard limit (ulimit -Hn, docker --ulimit nofile=, "
            "systemd LimitNOFILE=) to allow more",
            setting, configured, soft_limit, soft_limit - cap, cap,
        )
    return cap


def descriptor_shortage() -> str | None:
    """Why this process cannot open one more descriptor right now ("EMFILE" or "ENFILE"), or None if it can.

    An ``accept`` then fails the same way, and event loops hide that: uvloop (libuv) accepts and at
    once closes the waiting connections, asyncio retries a second later. Opening ``/dev/null`` (and
    closing it again) is how to find out; it costs a few microseconds.
    """
    try:
        fd = os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        return errno.errorcode[exc.errno] if exc.errno is not None and is_descriptor_shortage(exc) else None
    os.close(fd)
    return None


def is_descriptor_shortage(exc: object) -> bool:
    """Whether ``exc`` is the error of a call that found no free descriptor (EMFILE or ENFILE)."""
    return isinstance(exc, OSError) and exc.errno in _SHORTAGE_ERRNOS

