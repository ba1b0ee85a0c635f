"""Bulk import throughput against a running admin API (issue 16): rows/s and the admin process's memory.

Creates a CHECK_PRE_PROVISIONED_DEVICES profile, generates a CSV of ``--rows`` devices (each with its own
access token; ``--minted`` leaves the token column empty so the credentials service generates them), uploads
it to ``POST /api/devices/import`` and polls the job until it ends. With ``--pid`` (the admin API's process;
found from ``--url``'s port when omitted, on Linux) it samples the process's resident memory every 50 ms and
prints the peak during the import next to the peak before it.

    .venv/bin/python bench/bulk_import.py --rows 100000
    .venv/bin/python bench/bulk_import.py --url http://127.0.0.1:8081 --token "$ADMIN_API_TOKEN" --rows 100000

Defaults: PROVISIONING_URL (else http://127.0.0.1:8081) and ADMIN_API_TOKEN (else .local/stack.env, as
``make up`` writes it). Nothing here imports a service.
"""

from __future__ import annotations

import argparse
import io
import os
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import httpx


def _token_default() -> str | None:
    token = os.environ.get("ADMIN_API_TOKEN")
    if token:
        return token
    stack_env = Path(".local/stack.env")
    if stack_env.exists():
        for line in stack_env.read_text().splitlines():
            if line.startswith("ADMIN_API_TOKEN="):
                return line.split("=", 1)[1].strip()
    return None


def _rss_kib(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _find_pid(port: int) -> int | None:
    """The process listening on ``port`` (a ``python -m admin_api`` whose ADMIN_PORT is that port)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if b"admin_api" not in cmdline:
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"ADMIN_PORT={port}".encode() in environ:
            return int(proc.name)
    return None


def make_csv(rows: int, prefix: str, minted: bool) -> bytes:
    out = io.StringIO()
    out.write("name,deviceKey,accessToken\n")
    for i in range(rows):
        token = "" if minted else f"{prefix}-token-{i:07d}-xxxxxxxx"
        out.write(f"{prefix}-{i:07d},serial-{i:07d},{token}\n")
    return out.getvalue().encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("PROVISIONING_URL", "http://127.0.0.1:8081"))
    parser.add_argument("--token", default=_token_default())
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--minted", action="store_true", help="no tokens in the file: generated at import")
    parser.add_argument("--pid", type=int, help="the admin API's process id (memory sampling)")
    args = parser.parse_args()
    if not args.token:
        raise SystemExit("no token: --token, ADMIN_API_TOKEN or .local/stack.env")
    client = httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {args.token}"}, timeout=120)
    pid = args.pid or _find_pid(urlsplit(args.url).port or 80)
    profile = client.post("/api/device-profiles", json={
        "name": f"bench-import-{uuid.uuid4().hex[:8]}", "provisionStrategy": "CHECK_PRE_PROVISIONED_DEVICES",
    }).raise_for_status().json()
    body = make_csv(args.rows, f"b{uuid.uuid4().hex[:6]}", args.minted)
    before = _rss_kib(pid) if pid else 0
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], _rss_kib(pid))  # type: ignore[arg-type]

    if pid:
        threading.Thread(target=sample, daemon=True).start()
    started = time.perf_counter()
    response = client.post("/api/devices/import", params={"deviceProfileId": profile["id"]}, content=body,
                           headers={"Content-Type": "text/csv"})
    response.raise_for_status()
    accepted = time.perf_counter() - started
    job_id = response.json()["id"]
    while True:
        job = client.get(f"/api/devices/import/{job_id}").json()
        if job["status"] != "running":
            break
        time.sleep(0.2)
    elapsed = time.perf_counter() - started
    done.set()
    print(f"rows: {args.rows} ({len(body) / 1e6:.1f} MB CSV, tokens {'generated' if args.minted else 'in the file'})")
    print(f"job: {job['status']} created={job['created']} rejected={job['rejected']} {job.get('message') or ''}")
    print(f"upload accepted (202) after {accepted:.2f} s; import done after {elapsed:.2f} s")
    print(f"throughput: {args.rows / elapsed:,.0f} rows/s")
    if pid:
        print(f"admin API RSS: {before / 1024:.0f} MiB before, peak {peak[0] / 1024:.0f} MiB during the import"
              f" (+{(peak[0] - before) / 1024:.0f} MiB)")


if __name__ == "__main__":
    main()
