"""Ports for the servers the tests start: free now, below the kernel's ephemeral range, apart per xdist worker.

Below the ephemeral range because the suite makes tens of thousands of short connections: a port from that
range (what binding port 0 gives) is soon some client's source port, and then a server cannot listen there
(RabbitMQ's distribution check failed that way 3 times in 5; a gateway started on "its" port failed with
EADDRINUSE once the suite ran on several workers). Apart per worker (``PYTEST_XDIST_WORKER`` gwN: slice N of
the range) because two workers checking the same free port at once would both take it.
"""

from __future__ import annotations

import os
import random
import re
import socket
from collections.abc import Iterable
from pathlib import Path

#: The machine's shared servers: nothing here may ever bind, signal or configure them.
SHARED_PORTS = frozenset({5432, 5672, 25672, 4369, 15672, 15692, 1883, 6379, 4222, 3306})
#: Slices of the range: at least as many as make test's workers.
SLICES = 8

_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _range() -> tuple[int, int]:
    high = _ephemeral_low() - 1
    low = max(10000, high - 16000)
    worker = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
    if worker is None:
        return low, high
    size = (high - low) // SLICES
    first = low + (int(worker[1]) % SLICES) * size
    return first, first + size - 1


def free_port(taken: Iterable[int] = (), *, udp: bool = False) -> int:
    """A TCP (or UDP) port nothing uses now, in this worker's slice, never a shared server's port, never one
    handed out before by this process."""
    avoid = set(taken) | SHARED_PORTS | _HANDED_OUT
    low, high = _range()
    rng = random.SystemRandom()
    for _ in range(2000):
        port = rng.randint(low, high)
        if port in avoid:
            continue
        try:
            # No SO_REUSEADDR: a TCP port with TIME_WAIT leftovers is refused too.
            with socket.socket(type=socket.SOCK_DGRAM if udp else socket.SOCK_STREAM) as sock:
                sock.bind(("0.0.0.0", port))
        except OSError:
            continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free {'UDP' if udp else 'TCP'} port in {low}-{high}")


def free_udp_port() -> int:
    return free_port(udp=True)
