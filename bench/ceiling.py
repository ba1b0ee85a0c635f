#!/usr/bin/env python3
"""One run that says where provisioning stands against the database's own ceiling (issue 18).

    python bench/ceiling.py [--database-url URL] [-n 5000] [-c 64] [--pgbench-seconds 10]
        [--http-url http://127.0.0.1:8080] [--mqtt-port 11883] [--coap-port 5683] [--transports http,mqtt,coap]

1. **The ceiling**: pgbench, 16 clients for ``--pgbench-seconds``, each transaction what one provision
   writes at the least (a device row and a credentials row, both with unique indexes), in a scratch
   schema of the database it is given (dropped afterwards).
2. **Each transport**: bench/http_provision.py, mqtt_provision.py and coap_provision.py, one after the other
   against the running stack (``make up``; the provisions limits must be off for a single-source
   generator: ``PROVISION_RATE_LIMIT_PER_SOURCE= PROVISION_RATE_LIMIT_PER_PROFILE= make up``).
3. **CPU per provision**: for each transport, the CPU time each process of the stack used during its run
   (read from /proc: the services by their ``python -m <service>`` command line, every Postgres process,
   RabbitMQ's beam.smp, the generator itself) divided by the provisions made.

Prints one table; ``--json`` adds one JSON line. Linux only (/proc). Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERVICES = ("http_gateway", "mqtt_gateway", "coap_gateway", "provisioning_core", "credentials", "admin_api")
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

PGBENCH_SETUP = """
DROP SCHEMA IF EXISTS bench_ceiling CASCADE;
CREATE SCHEMA bench_ceiling;
CREATE TABLE bench_ceiling.devices (id uuid PRIMARY KEY, name text NOT NULL UNIQUE, profile_id uuid NOT NULL,
    device_key text NOT NULL, created_at timestamptz NOT NULL DEFAULT now(), UNIQUE (profile_id, device_key));
CREATE TABLE bench_ceiling.device_credentials (device_id uuid PRIMARY KEY REFERENCES bench_ceiling.devices (id),
    credentials_type text NOT NULL, credentials_id text NOT NULL UNIQUE, value_enc bytea);
"""
#: One provision's minimal write: a device and its credentials, in one transaction (ids from a 63-bit random).
PGBENCH_SCRIPT = """\\set n random(1, 9000000000000000000)
BEGIN;
INSERT INTO bench_ceiling.devices (id, name, profile_id, device_key)
    VALUES (md5(:client_id || ':' || :n)::uuid, 'd-' || :client_id || '-' || :n,
            '00000000-0000-0000-0000-000000000001', 'k-' || :client_id || '-' || :n);
INSERT INTO bench_ceiling.device_credentials (device_id, credentials_type, credentials_id)
    VALUES (md5(:client_id || ':' || :n)::uuid, 'ACCESS_TOKEN', md5('t' || :client_id || ':' || :n));
COMMIT;
"""


def pgbench_ceiling(database_url: str, seconds: int) -> float:
    """Transactions per second of the minimal provisioning write (device + credentials row)."""
    psql, pgbench = shutil.which("psql"), shutil.which("pgbench")
    if not psql or not pgbench:
        raise SystemExit("pgbench and psql are needed (Debian: postgresql-client)")
    quiet = {**os.environ, "PGOPTIONS": "-c client_min_messages=warning"}
    subprocess.run([psql, database_url, "-q", "-v", "ON_ERROR_STOP=1", "-c", PGBENCH_SETUP], check=True,
                   stdout=subprocess.DEVNULL, env=quiet)
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
            f.write(PGBENCH_SCRIPT)
        done = subprocess.run([pgbench, "-n", "-c", "16", "-j", "2", "-T", str(seconds), "-f", f.name, database_url],
                              capture_output=True, text=True)
        found = re.search(r"tps = ([\d.]+)", done.stdout)
        if done.returncode != 0 or not found:
            raise SystemExit(f"pgbench failed: {done.stderr.strip() or done.stdout.strip()}")
        return float(found[1])
    finally:
        os.unlink(f.name)
        subprocess.run([psql, database_url, "-q", "-c", "DROP SCHEMA IF EXISTS bench_ceiling CASCADE"],
                       stdout=subprocess.DEVNULL, env=quiet)


def _processes() -> dict[int, tuple[int, str, str, list[str]]]:
    """pid -> (parent pid, comm, command line, the fields of /proc/pid/stat after the name)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        found[int(entry.name)] = (int(fields[1]), comm, cmdline, fields)
    return found


def cpu_by_group() -> dict[str, float]:
    """CPU seconds (user + system) used so far by each process group of the stack, from /proc: the services
    started by ``make up`` (descendants of its ``devstack up``, when one runs: other stacks on the machine,
    such as a test suite's, are left out), every Postgres process and RabbitMQ's beam.smp."""
    processes = _processes()
    roots = {pid for pid, (_, _, cmdline, _) in processes.items() if "devstack up" in cmdline}

    def in_stack(pid: int) -> bool:
        seen = 0
        while pid > 1 and seen < 64:
            if pid in roots:
                return True
            pid, seen = processes[pid][0] if pid in processes else 0, seen + 1
        return not roots

    groups: dict[str, float] = {}
    for pid, (_, comm, cmdline, fields) in processes.items():
        group = next((s for s in SERVICES if f"-m {s}" in cmdline), None)
        if group is not None and not in_stack(pid):
            continue
        if group is None and (comm == "postgres" or cmdline.startswith("postgres")):
            group = "postgres"
        elif group is None and comm.startswith("beam.smp"):
            group = "rabbitmq"
        if group is not None:
            groups[group] = groups.get(group, 0.0) + (int(fields[11]) + int(fields[12])) / TICKS
    return groups


def run_transport(name: str, args: argparse.Namespace) -> dict:
    common = ["-n", str(args.requests), "-c", str(args.concurrency), "--json", "--admin-url", args.admin_url]
    if args.admin_token:
        common += ["--admin-token", args.admin_token]
    command = {
        "http": [sys.executable, str(HERE / "http_provision.py"), "--url", args.http_url],
        "mqtt": [sys.executable, str(HERE / "mqtt_provision.py"), "--port", str(args.mqtt_port)],
        "coap": [sys.executable, str(HERE / "coap_provision.py"), "--port", str(args.coap_port)],
        # The same requests from coap_provision.py's own minimal client, which leaves more CPU to the stack.
        "coap-raw": [sys.executable, str(HERE / "coap_provision.py"), "--port", str(args.coap_port), "--client", "raw"],
    }[name] + common
    before = cpu_by_group()
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = cpu_by_group()
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode not in (0, 1) or not lines:
        raise SystemExit(f"{name} bench failed: {done.stderr.strip()[-500:]}")
    result = json.loads(lines[-1])
    provisions = max(1, result["success"] + result["warmup"]["success"])
    cpu_ms = {group: round(1000 * (after.get(group, 0.0) - before.get(group, 0.0)) / provisions, 3)
              for group in sorted(set(after) | set(before))}
    cpu_ms["generator"] = round(1000 * result["generator_cpu_s"] / max(1, result["success"]), 3)
    return {"provisions_per_s": result["provisions_per_s"], "latency_ms": result["latency_ms"],
            "success": result["success"], "outcomes": result["outcomes"], "wall_s": round(wall, 1),
            "cpu_ms_per_provision": {k: v for k, v in cpu_ms.items() if v > 0}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL",
                                                            "postgresql://postgres@127.0.0.1:5432/provisioning"))
    p.add_argument("--pgbench-seconds", type=int, default=10)
    p.add_argument("-n", "--requests", type=int, default=5000)
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("--http-url", default="http://127.0.0.1:8080")
    p.add_argument("--mqtt-port", type=int, default=int(os.environ.get("MQTT_PORT", "11883")),
                   help="the stack's MQTT gateway (make up moves it to 11883 when 1883 is taken)")
    p.add_argument("--coap-port", type=int, default=5683)
    p.add_argument("--admin-url", default="http://127.0.0.1:8081")
    p.add_argument("--admin-token", default=None)
    p.add_argument("--transports", default="http,mqtt,coap",
                   help="any of http, mqtt, coap (aiocoap's client) and coap-raw (coap_provision.py --client raw)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    ceiling = pgbench_ceiling(args.database_url, args.pgbench_seconds)
    print(f"ceiling: pgbench, 16 clients, device + credentials row per transaction: {ceiling:,.0f} tps", flush=True)
    results = {}
    for name in [t.strip() for t in args.transports.split(",") if t.strip()]:
        results[name] = run = run_transport(name, args)
        lat = run["latency_ms"]
        cpu = "  ".join(f"{k} {v:.2f}" for k, v in sorted(run["cpu_ms_per_provision"].items(), key=lambda kv: -kv[1]))
        total = sum(v for k, v in run["cpu_ms_per_provision"].items() if k != "generator")
        rate, answers = run["provisions_per_s"], sum(run["outcomes"].values())
        print(f"{name:8s} {rate:>8,.1f} provisions/s = {rate / ceiling:.2f} of the ceiling;"
              f" p50 {lat['p50']} / p99 {lat['p99']} ms; {run['success']} SUCCESS of {answers}", flush=True)
        print(f"      CPU ms per provision: {cpu}  (stack total {total:.2f})", flush=True)
    if args.json:
        print(json.dumps({"ceiling_tps": ceiling, "transports": results}, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
