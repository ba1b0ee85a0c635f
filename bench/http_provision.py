#!/usr/bin/env python3
"""HTTP provisioning load generator: provisions N devices at a given concurrency against a running stack.

    python bench/http_provision.py --url http://127.0.0.1:8080 --admin-url http://127.0.0.1:8081 \\
        -n 5000 -c 64 [--rate R] [--innoway] [--key K --secret S] [--warmup 200] [--max-seconds 120] [--json]

Without --key/--secret it first creates a fresh device profile (``bench-<run>``, strategy
ALLOW_CREATE_NEW_DEVICES) through the admin API, authenticated with --admin-token, else the
ADMIN_API_TOKEN environment variable, else the ADMIN_API_TOKEN= line of .local/stack.env.

Closed loop by default (each connection sends its next request when the answer came); ``--rate R``
offers R requests per second whatever the answers (open loop), which is how latency at a given load
is measured. One process, one asyncio loop (uvloop when importable) and a minimal HTTP/1.1 keep-alive
client written on asyncio streams: -c persistent connections, each with one request in flight. A general
client (httpx) costs several times more CPU per request, and on a small machine the generator
shares the cores with the server, so its own overhead would distort the numbers; the generator's
CPU time is printed next to the results for the same reason. Standard library only (plus uvloop).

See bench/README.md for what the numbers mean.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import ssl
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from _common import (  # bench/_common.py: python puts the script's directory first on sys.path
    SUCCESS,
    SetupError,
    add_rate_argument,
    add_run_arguments,
    check_run_arguments,
    open_loop,
    pick_runner,
    report,
    resolve_profile,
    run_summary,
    timed,
)

_SUCCESS_MARK = b'"status":"SUCCESS"'
_HEAD_LIMIT = 64 * 1024
_BODY_LIMIT = 16 * 1024 * 1024


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.x as this client understands it."""


# --------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    tls: bool
    path: str
    host_header: str

    @classmethod
    def parse(cls, url: str, endpoint: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SetupError(f"--url must be http://host[:port] or https://host[:port], not {url!r}")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        host = parts.hostname
        default_port = port == (443 if tls else 80)
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if default_port else f"{shown}:{port}"
        return cls(host, port, tls, parts.path.rstrip("/") + endpoint, host_header)


class RequestFactory:
    """Pre-rendered request bytes: only the device name and Content-Length vary per request."""

    def __init__(self, target: Target, innoway: bool, key: str, secret: str) -> None:
        if innoway:
            fields = ('{"device_name":', ',"provision_key":', ',"provision_secret":')
        else:
            fields = ('{"deviceName":', ',"provisionDeviceKey":', ',"provisionDeviceSecret":')
        self._prefix = fields[0].encode()
        self._suffix = (fields[1] + json.dumps(key) + fields[2] + json.dumps(secret) + "}").encode()
        self._head = (
            f"POST {target.path} HTTP/1.1\r\nHost: {target.host_header}\r\n"
            "User-Agent: bench-http-provision\r\nAccept: */*\r\nContent-Type: application/json\r\n"
            "Content-Length: "
        ).encode()

    def build(self, device_name: str) -> bytes:
        body = self._prefix + json.dumps(device_name).encode() + self._suffix
        return b"%s%d\r\n\r\n%s" % (self._head, len(body), body)


# --------------------------------------------------------------------------------------------
# the HTTP/1.1 client


class Connection:
    """One keep-alive connection; ``request`` sends one request and reads its whole response."""

    __slots__ = ("target", "ssl_ctx", "reader", "writer")

    def __init__(self, target: Target, ssl_ctx: ssl.SSLContext | None) -> None:
        self.target = target
        self.ssl_ctx = ssl_ctx
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    @property
    def is_open(self) -> bool:
        return self.writer is not None and not self.writer.is_closing()

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            self.target.host, self.target.port, ssl=self.ssl_ctx, limit=_HEAD_LIMIT,
            server_hostname=self.target.host if self.ssl_ctx else None,
        )

    def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):  # closing a broken transport must not raise
                self.writer.close()
        self.reader = self.writer = None

    async def request(self, data: bytes) -> tuple[int, bytes]:
        """Send ``data``; return (status code, body). Raises OSError/EOFError/ProtocolError."""
        if not self.is_open:
            await self.connect()
        reader, writer = self.reader, self.writer
        assert reader is not None and writer is not None
        writer.write(data)
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                raise EOFError("server closed the connection" if not exc.partial else "truncated headers") from None
            except asyncio.LimitOverrunError:
                raise ProtocolError("response headers too large") from None
            lines = head[:-4].split(b"\r\n")
            status_line = lines[0].split(None, 2)
            if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
                raise ProtocolError(f"bad status line {lines[0][:60]!r}")
            try:
                status = int(status_line[1])
            except ValueError:
                raise ProtocolError(f"bad status line {lines[0][:60]!r}") from None
            if 100 <= status < 200 and status != 101:
                continue  # interim response (100 Continue): the real one follows
            break
        length: int | None = None
        chunked = False
        close = status_line[0] == b"HTTP/1.0"
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    raise ProtocolError("bad Content-Length") from None
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                token = value.strip().lower()
                if token == b"close":
                    close = True
                elif token == b"keep-alive":
                    close = False
        try:
            if status in (204, 304):
                body = b""
            elif chunked:
                body = await self._read_chunked(reader)
            elif length is not None:
                if length > _BODY_LIMIT:
                    raise ProtocolError("response body too large")
                body = await reader.readexactly(length) if length else b""
            else:  # delimited by the end of the connection
                body = await reader.read(_BODY_LIMIT)
                close = True
        except asyncio.IncompleteReadError:
            raise EOFError("truncated body") from None
        if close:
            self.close()
        return status, body

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ProtocolError("bad chunk size") from None
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return b"".join(parts)
            total += size
            if total > _BODY_LIMIT:
                raise ProtocolError("response body too large")
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)


# --------------------------------------------------------------------------------------------
# the run


def classify(status: int, body: bytes) -> str:
    """SUCCESS, the provisioning status of another 200 answer, or ``HTTP <code>``."""
    if status == 200:
        if _SUCCESS_MARK in body:
            return SUCCESS
        try:
            value = json.loads(body).get("status")
        except (ValueError, AttributeError):
            value = None
        return str(value) if isinstance(value, str) and value else "200 without status"
    return f"HTTP {status}"


@dataclass
class Phase:
    """What one phase (warm-up or measured) saw."""

    outcomes: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    success_latencies_ms: list[float] = field(default_factory=list)
    attempted: int = 0
    elapsed_s: float = 0.0
    cpu_user_s: float = 0.0
    cpu_sys_s: float = 0.0


async def _exchange(conn: Connection, data: bytes, timeout: float, deadline: float, phase: Phase,
                    started: float) -> bool:
    """One request on ``conn``, recorded in ``phase`` with its latency counted from ``started`` (perf_counter
    time); False when the connection failed (it is closed; the next request reopens it)."""
    loop = asyncio.get_running_loop()
    phase.attempted += 1
    try:
        async with asyncio.timeout_at(min(loop.time() + timeout, deadline)):
            status, body = await conn.request(data)
    except TimeoutError:
        conn.close()  # the answer may still come: this connection is out of step now
        phase.errors["stopped by --max-seconds" if loop.time() >= deadline else "timeout"] += 1
        return True
    except (OSError, EOFError, ProtocolError, ssl.SSLError) as exc:
        conn.close()
        phase.errors[_error_name(exc)] += 1
        return False
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    outcome = classify(status, body)
    phase.outcomes[outcome] += 1
    phase.latencies_ms.append(elapsed_ms)
    if outcome == SUCCESS:
        phase.success_latencies_ms.append(elapsed_ms)
    return True


async def run_phase(conns: list[Connection], count: int, make_name, factory: RequestFactory,
                    timeout: float, deadline: float, phase: Phase) -> None:
    """Closed loop: send ``count`` requests over ``conns``, one in flight per connection, each sent as soon as
    the previous answer arrived, until done or ``deadline``."""
    loop = asyncio.get_running_loop()
    next_index = 0

    async def worker(conn: Connection) -> None:
        nonlocal next_index
        failures_in_a_row = 0
        while next_index < count and loop.time() < deadline:
            i = next_index
            next_index += 1
            data = factory.build(make_name(i))
            if await _exchange(conn, data, timeout, deadline, phase, time.perf_counter()):
                failures_in_a_row = 0
            else:
                failures_in_a_row += 1
                # a refused/reset server would otherwise burn through every request in a moment
                await asyncio.sleep(min(0.05 * failures_in_a_row, 1.0))

    await timed(phase, asyncio.gather(*(worker(c) for c in conns)))


async def run_open_loop(conns: list[Connection], count: int, rate: float, make_name, factory: RequestFactory,
                        timeout: float, deadline: float, phase: Phase) -> None:
    """:func:`_common.open_loop` over ``conns``: a due request takes an idle connection, waiting for one when all
    are busy."""
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for conn in conns:
        idle.put_nowait(conn)

    async def one(i: int, due: float) -> None:
        conn = await idle.get()
        try:
            await _exchange(conn, factory.build(make_name(i)), timeout, deadline, phase, due)
        finally:
            idle.put_nowait(conn)

    await timed(phase, open_loop(count, rate, deadline, one))


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, BrokenPipeError):
        return "broken pipe"
    if isinstance(exc, EOFError):
        return str(exc) or "server closed the connection"
    if isinstance(exc, ProtocolError):
        return f"protocol error: {exc}"
    return type(exc).__name__


async def open_connections(target: Target, count: int, timeout: float) -> tuple[list[Connection], Counter]:
    """Open ``count`` connections at once; failed ones stay closed (workers retry them) and are counted."""
    ssl_ctx = ssl.create_default_context() if target.tls else None
    conns = [Connection(target, ssl_ctx) for _ in range(count)]
    errors: Counter = Counter()

    async def one(conn: Connection) -> None:
        try:
            async with asyncio.timeout(timeout):
                await conn.connect()
        except TimeoutError:
            errors["connect timeout"] += 1
        except (OSError, ssl.SSLError) as exc:
            errors[_error_name(exc)] += 1

    await asyncio.gather(*(one(c) for c in conns))
    return conns, errors


async def bench(args: argparse.Namespace, key: str, secret: str, run_id: str) -> dict:
    endpoint = "/api/provision" if args.innoway else "/api/v1/provision"
    target = Target.parse(args.url, endpoint)
    factory = RequestFactory(target, args.innoway, key, secret)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.max_seconds

    n_conns = max(1, min(args.concurrency, max(args.requests, args.warmup)))
    conns, connect_errors = await open_connections(target, n_conns, min(args.timeout, args.max_seconds))
    if connect_errors and sum(connect_errors.values()) == n_conns:
        for conn in conns:
            conn.close()
        reason = ", ".join(f"{k} x{v}" for k, v in connect_errors.items())
        raise SetupError(f"cannot connect to {target.host}:{target.port}: {reason}")

    warm = Phase()
    if args.warmup > 0:
        await run_phase(conns, args.warmup, lambda i: f"bench-{run_id}-w{i}", factory,
                        args.timeout, deadline, warm)
    measured = Phase()
    if args.requests > 0 and loop.time() < deadline:
        if args.rate:
            await run_open_loop(conns, args.requests, args.rate, lambda i: f"bench-{run_id}-{i}", factory,
                                args.timeout, deadline, measured)
        else:
            await run_phase(conns, args.requests, lambda i: f"bench-{run_id}-{i}", factory,
                            args.timeout, deadline, measured)
    for conn in conns:
        conn.close()
    await asyncio.sleep(0)  # let the transports close

    elapsed = measured.elapsed_s
    cpu = measured.cpu_user_s + measured.cpu_sys_s
    return {
        "url": f"{args.url.rstrip('/')}{endpoint}",
        "dialect": "innoway" if args.innoway else "thingsboard",
        **run_summary(run_id=run_id, loop=loop, requested=args.requests, concurrency=n_conns,
                      warmup_requested=args.warmup, warm=warm, measured=measured),
        "other_status": sum(v for k, v in measured.outcomes.items() if k != SUCCESS and not k.startswith("HTTP ")),
        "http_errors": sum(v for k, v in measured.outcomes.items() if k.startswith("HTTP ")),
        "connection_errors": sum(measured.errors.values()),
        "errors": dict(measured.errors.most_common()),
        "initial_connect_errors": dict(connect_errors),
        "not_sent": max(0, args.requests - measured.attempted),
        "stopped_by_max_seconds": measured.attempted < args.requests or "stopped by --max-seconds" in measured.errors,
        "generator_cpu_s": round(cpu, 3),
        "generator_cpu_user_s": round(measured.cpu_user_s, 3),
        "generator_cpu_sys_s": round(measured.cpu_sys_s, 3),
        "generator_cpu_pct_of_one_core": round(100.0 * cpu / elapsed, 1) if elapsed > 0 else 0.0,
        "generator_cpu_us_per_request": round(1e6 * cpu / measured.attempted, 1) if measured.attempted else None,
        "cpu_count": os.cpu_count(),
        "offered_rate_per_s": args.rate,
    }


def render_human(result: dict, profile_note: str) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    lat, lat_all = result["latency_ms"], result["latency_all_responses_ms"]
    outcomes = "  ".join(f"{k} {v}" for k, v in result["outcomes"].items()) or "none"
    errors = "  ".join(f"{k} {v}" for k, v in result["errors"].items()) or "none"
    warm = result["warmup"]
    lines = [
        f"HTTP provisioning benchmark: POST {result['url']} ({result['dialect']} dialect, {result['event_loop']})",
        f"  run {result['run']}; {profile_note}",
        f"  requests      {result['attempted']} sent of {result['requested']}, {result['concurrency']} keep-alive "
        f"connections; warm-up {warm['attempted']} ({warm['success']} SUCCESS) not counted",
        *([f"  offered       {result['offered_rate_per_s']:g}/s open loop (latency from when each request was due,"
           " waiting for a free connection included)"] if result["offered_rate_per_s"] else []),
        f"  elapsed       {result['elapsed_s']:.2f} s" + ("   (stopped by --max-seconds)"
                                                        if result["stopped_by_max_seconds"] else ""),
        f"  provisions/s  {result['provisions_per_s']:.1f}   (SUCCESS answers per second;"
        f" all responses {result['responses_per_s']:.1f}/s)",
        f"  latency ms    p50 {ms(lat['p50'])}  p95 {ms(lat['p95'])}  p99 {ms(lat['p99'])}  max {ms(lat['max'])}"
        "   (SUCCESS answers)",
        f"                p50 {ms(lat_all['p50'])}  p95 {ms(lat_all['p95'])}  p99 {ms(lat_all['p99'])}"
        f"  max {ms(lat_all['max'])}   (every HTTP response)",
        f"  outcomes      {outcomes}",
        f"                SUCCESS {result['success']} / other status {result['other_status']}"
        f" / HTTP errors {result['http_errors']} / connection errors {result['connection_errors']}",
        f"  conn. errors  {errors}",
        f"  generator CPU {result['generator_cpu_s']:.2f} s (user {result['generator_cpu_user_s']:.2f}"
        f" + sys {result['generator_cpu_sys_s']:.2f}) = {result['generator_cpu_pct_of_one_core']:.0f}% of one core,"
        f" {result['generator_cpu_us_per_request'] or 0:.0f} us/request; this machine has {result['cpu_count']}"
        " cores shared with the server",
    ]
    if result["initial_connect_errors"]:
        failed = "  ".join(f"{k} {v}" for k, v in result["initial_connect_errors"].items())
        lines.append(f"  note          some connections failed to open at start: {failed} (retried by the workers)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Provision N devices over HTTP at a given concurrency and report throughput and latency.")
    p.add_argument("--url", default="http://127.0.0.1:8080", help="HTTP gateway base URL (default %(default)s)")
    p.add_argument("--innoway", action="store_true",
                   help="Innoway dialect: snake_case body to /api/provision (default: ThingsBoard, /api/v1/provision)")
    add_run_arguments(p, concurrency_help='keep-alive connections, one request in flight on each')
    add_rate_argument(p, concurrency_is="connections")
    args = p.parse_args(argv)
    check_run_arguments(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_id = secrets.token_hex(4)
    try:
        Target.parse(args.url, "/")
        key, secret, profile_note = resolve_profile(args.key, args.secret, args.admin_url, args.admin_token, run_id)
        result = pick_runner(args.no_uvloop)(bench(args, key, secret, run_id))
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

    return report(result, render_human(result, profile_note), args.json, args.requests)


if __name__ == "__main__":
    sys.exit(main())
