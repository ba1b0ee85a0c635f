"""Helpers shared by the load generators in bench/ (standard library only).

* :func:`find_admin_token` and :func:`create_profile`: the admin API side of a run (a fresh
  ``bench-<run>`` device profile with strategy ALLOW_CREATE_NEW_DEVICES);
* :func:`percentile` and :func:`latency_summary`: nearest-rank latency statistics;
* :func:`cpu_times` and :func:`pick_runner`: generator CPU accounting and the event loop choice.

The scripts import this module as ``_common``: running ``python bench/<script>.py`` puts bench/
first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

SUCCESS = "SUCCESS"


class SetupError(Exception):
    """Something prevents the run from starting; the message is shown as is."""


def find_admin_token(explicit: str | None) -> str | None:
    """--admin-token, else $ADMIN_API_TOKEN, else the ADMIN_API_TOKEN= line of .local/stack.env."""
    if explicit:
        return explicit
    if os.environ.get("ADMIN_API_TOKEN"):
        return os.environ["ADMIN_API_TOKEN"]
    repo_root = Path(__file__).resolve().parent.parent
    for candidate in (Path.cwd() / ".local/stack.env", repo_root / ".local/stack.env"):
        try:
            text = candidate.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("ADMIN_API_TOKEN="):
                value = line.split("=", 1)[1].strip().strip("\"'")
                if value:
                    return value
    return None


def create_profile(admin_url: str, token: str, name: str, timeout: float = 15.0) -> tuple[str, str, str]:
    """POST {admin_url}/api/device-profiles; returns (id, provisionDeviceKey, provisionDeviceSecret)."""
    url = admin_url.rstrip("/") + "/api/device-profiles"
    body = json.dumps({"name": name, "provisionStrategy": "ALLOW_CREATE_NEW_DEVICES"}).encode()
    request = urllib.request.Request(
        url, data=body, method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode("utf-8", "replace")
        hint = " (wrong --admin-token?)" if exc.code == 401 else ""
        raise SetupError(f"creating the device profile failed: HTTP {exc.code}{hint}: {detail}") from None
    except (OSError, ValueError) as exc:
        raise SetupError(f"cannot reach the admin API at {url}: {exc}") from None
    if status != 201:
        raise SetupError(f"creating the device profile: expected HTTP 201, got {status}")
    try:
        profile = json.loads(raw)
        return str(profile.get("id", "")), profile["provisionDeviceKey"], profile["provisionDeviceSecret"]
    except (ValueError, KeyError, TypeError):
        raise SetupError("the admin API's answer has no provisionDeviceKey/provisionDeviceSecret") from None


NO_TOKEN_MESSAGE = ("no admin token: pass --admin-token, set ADMIN_API_TOKEN, or run from the repo"
                    " root after `make up` (.local/stack.env); or give --key/--secret")


def percentile(sorted_values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * pct // 100))  # ceil
    return sorted_values[int(rank) - 1]


def latency_summary(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    out: dict[str, float | None] = {
        f"p{p}": percentile(ordered, p) for p in (50, 95, 99)
    }
    out["min"] = ordered[0] if ordered else None
    out["max"] = ordered[-1] if ordered else None
    out["mean"] = sum(ordered) / len(ordered) if ordered else None
    return {k: (round(v, 2) if v is not None else None) for k, v in out.items()}


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def cpu_times() -> tuple[float, float]:
    """(user, system) CPU seconds this process has used so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


def pick_runner(no_uvloop: bool):  # type: ignore[no-untyped-def]
    """uvloop.run when importable (and not refused), else asyncio.run."""
    if not no_uvloop:
        try:
            import uvloop

            return uvloop.run
        except ImportError:
            pass
    return asyncio.run


def resolve_profile(key: str | None, secret: str | None, admin_url: str, admin_token: str | None,
                    run_id: str) -> tuple[str, str, str]:
    """(key, secret, note): the profile given by --key/--secret, or a fresh one made through the admin API."""
    if key is not None and secret is not None:
        return key, secret, "profile given by --key/--secret"
    token = find_admin_token(admin_token)
    if not token:
        raise SetupError(NO_TOKEN_MESSAGE)
    profile_id, key, secret = create_profile(admin_url, token, f"bench-{run_id}")
    return key, secret, f"created device profile bench-{run_id} ({profile_id})"


def report(result: dict, human: str, as_json: bool, requests: int) -> int:
    """Print the run (JSON on stdout with --json, the human block on stderr) and choose the exit code."""
    if as_json:
        print(human, file=sys.stderr, flush=True)
        print(json.dumps(result, separators=(",", ":")), flush=True)
    else:
        print(human, flush=True)
    return 0 if result["success"] > 0 or requests == 0 else 1


def run_summary(*, run_id: str, loop: object, requested: int, concurrency: int, warmup_requested: int,
                warm: object, measured: object) -> dict:
    """The fields every bench reports: run, counts, rate, latency percentiles, outcomes."""
    outcomes = measured.outcomes  # type: ignore[attr-defined]
    completed = sum(outcomes.values())
    successes = outcomes.get(SUCCESS, 0)
    elapsed = measured.elapsed_s  # type: ignore[attr-defined]
    return {
        "run": run_id,
        "event_loop": type(loop).__module__.split(".")[0],
        "requested": requested,
        "concurrency": concurrency,
        "warmup": {"requested": warmup_requested, "attempted": warm.attempted,  # type: ignore[attr-defined]
                   "success": warm.outcomes.get(SUCCESS, 0),  # type: ignore[attr-defined]
                   "elapsed_s": round(warm.elapsed_s, 3)},  # type: ignore[attr-defined]
        "attempted": measured.attempted,  # type: ignore[attr-defined]
        "completed": completed,
        "elapsed_s": round(elapsed, 3),
        "provisions_per_s": round(successes / elapsed, 1) if elapsed > 0 else 0.0,
        "responses_per_s": round(completed / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_ms": latency_summary(measured.success_latencies_ms),  # type: ignore[attr-defined]
        "latency_all_responses_ms": latency_summary(measured.latencies_ms),  # type: ignore[attr-defined]
        "outcomes": dict(outcomes.most_common()),
        "success": successes,
    }


def add_run_arguments(p: argparse.ArgumentParser, *, concurrency_help: str, unit: str = "requests",
                      max_seconds_help: str = "hard cap on the whole run, warm-up included",
                      timeout_help: str = "per-request timeout in seconds") -> None:
    """The options every generator takes: admin API, counts, profile, bounds, output, event loop."""
    p.add_argument("--admin-url", default="http://127.0.0.1:8081",
                   help="admin API base URL, used to create the device profile (default %(default)s)")
    p.add_argument("--admin-token", default=None,
                   help="admin bearer token (default: $ADMIN_API_TOKEN, else ADMIN_API_TOKEN= in .local/stack.env)")
    p.add_argument("-n", "--requests", type=int, default=5000, help=f"measured provision {unit} (default %(default)s)")
    p.add_argument("-c", "--concurrency", type=int, default=64, help=f"{concurrency_help} (default %(default)s)")
    p.add_argument("--key", help="provision key of an existing profile (with --secret; skips creating one)")
    p.add_argument("--secret", help="provision secret of an existing profile")
    p.add_argument("--warmup", type=int, default=200, help=f"uncounted {unit} sent first (default %(default)s)")
    p.add_argument("--max-seconds", type=float, default=120.0, help=f"{max_seconds_help} (default %(default)s)")
    p.add_argument("--timeout", type=float, default=30.0, help=f"{timeout_help} (default %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON line on stdout (the human-readable block then goes to stderr)")
    p.add_argument("--no-uvloop", action="store_true", help="use the standard asyncio loop even if uvloop is installed")


async def timed(phase: object, work: Awaitable[object]) -> None:
    """Run ``work``, recording its wall time and this process's CPU time in ``phase`` (``elapsed_s``,
    ``cpu_user_s``, ``cpu_sys_s``)."""
    user0, sys0 = cpu_times()
    t0 = time.perf_counter()
    await work
    phase.elapsed_s = time.perf_counter() - t0  # type: ignore[attr-defined]
    user1, sys1 = cpu_times()
    phase.cpu_user_s, phase.cpu_sys_s = user1 - user0, sys1 - sys0  # type: ignore[attr-defined]


def add_rate_argument(p: argparse.ArgumentParser, *, concurrency_is: str) -> None:
    """``--rate R``: the open-loop mode of every generator (:func:`open_loop`)."""
    p.add_argument("--rate", type=float, default=None,
                   help="open loop: start this many requests per second whatever the answers (latency counted "
                        f"from when each was due); -c is then the most {concurrency_is} in use (default: closed loop)")


async def open_loop(count: int, rate: float, deadline: float,
                    start: Callable[[int, float], Awaitable[None]]) -> None:
    """Open loop: request ``i`` is due at ``i / rate`` seconds (``time.perf_counter``) whatever the answers, so a
    slow server cannot slow the load down and hide its latency (coordinated omission). ``start(i, due)`` runs
    it (waiting for a free connection or socket when all are busy, its latency counted from ``due``); none
    is started once the loop's ``deadline`` passed. Returns when every started request is done."""
    loop = asyncio.get_running_loop()
    began = time.perf_counter()
    tasks = []
    for i in range(count):
        due = began + i / rate
        if (delay := due - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        if loop.time() >= deadline:
            break
        tasks.append(asyncio.create_task(start(i, due)))
    await asyncio.gather(*tasks)


def check_run_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse inconsistent values of the options added by :func:`add_run_arguments` (and --port)."""
    if (args.key is None) != (args.secret is None):
        p.error("--key and --secret go together")
    if args.requests < 0 or args.warmup < 0:
        p.error("-n and --warmup must not be negative")
    if args.concurrency < 1:
        p.error("-c must be at least 1")
    if getattr(args, "rate", None) is not None and args.rate <= 0:
        p.error("--rate must be positive")
    if hasattr(args, "port") and not 0 < args.port < 65536:
        p.error("--port must be 1..65535")
    if args.max_seconds <= 0 or args.timeout <= 0:
        p.error("--max-seconds and --timeout must be positive")
