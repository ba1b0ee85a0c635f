"""MQTT user/password logins: time for a known user vs an unknown one (issue 13, uniform-time checks).

Runs the credentials service's ``authenticate`` in-process against a one-row stand-in for Postgres (no stack
needed), so the numbers are the service's own work: the scrypt check, and for an unknown user the check
against the dummy hash. Before issue 13 a known user took ~31 ms and an unknown one ~2 ms (an existence
oracle); both should now print about the same.

    .venv/bin/python bench/mqtt_password_timing.py            # 30 logins of each kind
    .venv/bin/python bench/mqtt_password_timing.py -n 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "services"), str(ROOT / "libs" / "common")]

from credentials import hashing  # noqa: E402
from credentials.service import CredentialsService  # noqa: E402
from provisioning_common.models import AuthenticateRequest  # noqa: E402


class OneRow:
    def __init__(self, row: dict[str, Any]) -> None:
        self.row = row

    async def fetchrow(self, sql: str, credentials_id: str) -> dict[str, Any] | None:
        return self.row if credentials_id == "known-user" else None


async def timed(service: CredentialsService, request: AuthenticateRequest, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        await service.authenticate(request)
        times.append((time.perf_counter() - start) * 1000)
    return times


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=30, help="logins of each kind (default 30)")
    args = parser.parse_args()
    row = {"device_id": uuid.uuid4(), "device_name": "dev", "credentials_type": "MQTT_BASIC",
           "secret_hash": hashing.hash_password("right-password"),
           "public_value": json.dumps({"clientId": "", "userName": "known-user"})}
    service = CredentialsService(OneRow(row))  # type: ignore[arg-type]
    hashing.dummy_hash()  # made once per process, at the first unknown user: not part of any login's time
    kinds = {
        "known user, right password": AuthenticateRequest(username="known-user", password="right-password"),
        "known user, wrong password": AuthenticateRequest(username="known-user", password="wrong-password"),
        "unknown user": AuthenticateRequest(username="nobody", password="any-password"),
    }
    for label, request in kinds.items():
        times = await timed(service, request, args.n)
        print(f"{label:28s} median {statistics.median(times):6.1f} ms  min {min(times):6.1f}  max {max(times):6.1f}"
              f"  (n={args.n})")


if __name__ == "__main__":
    asyncio.run(main())
