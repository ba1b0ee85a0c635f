#!/usr/bin/env python3
"""HTTP provisions/s with provisioning events on vs off, in the same run window (issue 15).

Two stacks run side by side, one with ``PROVISION_EVENTS_ENABLED=true`` (the default) and one with ``false``
(see bench/README.md, "events on vs off"); this runs ``bench/http_provision.py`` against them alternately,
``--rounds`` times each (on, off, off, on, ...), so that the noise of a shared machine falls on both, and prints
each run and the median of each side::

    python bench/events_on_off.py --on http://127.0.0.1:8080,http://127.0.0.1:8081,TOKEN_ON \\
        --off http://127.0.0.1:28080,http://127.0.0.1:28081,TOKEN_OFF -n 3000 -c 32 --rounds 2

Each side is ``gateway URL,admin API URL,admin token``. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(side: str, n: int, c: int, warmup: int) -> dict[str, object]:
    url, admin_url, token = side.split(",", 2)
    out = subprocess.run(
        [sys.executable, str(HERE / "http_provision.py"), "--url", url, "--admin-url", admin_url, "--admin-token",
         token, "-n", str(n), "-c", str(c), "--warmup", str(warmup), "--json"],
        capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        sys.exit(f"http_provision.py failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--on", required=True, help="gateway URL,admin URL,admin token of the events-on stack")
    parser.add_argument("--off", required=True, help="the same for the stack with PROVISION_EVENTS_ENABLED=false")
    parser.add_argument("-n", "--requests", type=int, default=3000)
    parser.add_argument("-c", "--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating (default 2)")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {"on": [], "off": []}
    for round_ in range(args.rounds):
        # on, off, then off, on: a machine getting busier or quieter over the window weighs on both sides alike.
        for label in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
            result = run(getattr(args, label), args.requests, args.concurrency, args.warmup)
            rate = float(result["provisions_per_s"])  # type: ignore[arg-type]
            latency = result["latency_ms"]
            rates[label].append(rate)
            print(f"round {round_ + 1} events {label:3}  {rate:7.1f} provisions/s  latency ms {latency}  "
                  f"outcomes {result['outcomes']}", flush=True)
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    print(f"median: events on {on:.1f} /s, off {off:.1f} /s: on is {100 * (on - off) / off:+.1f}% vs off")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
