"""``python -m provisioning_common.db migrate``: create the database if missing and apply pending migrations.

The one-shot step of a deployment (compose service ``migrate``, Kubernetes init container of
provisioning-core) that runs before the core starts. Services still migrate at start-up under the
same advisory lock, so running it twice or beside them is harmless. Waits up to ``--wait`` seconds
for Postgres to accept connections; exits 1 with one line (no URL, no password) when it cannot.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import asyncpg

from ..settings import Settings
from .migrate import apply_migrations, ensure_database


async def migrate(database_url: str, wait_s: float) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            await ensure_database(database_url)
            conn = await asyncpg.connect(database_url)
            break
        except (OSError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError):
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(1)
    try:
        return await apply_migrations(conn)
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m provisioning_common.db")
    parser.add_argument("command", choices=["migrate"])
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for Postgres (default 60)")
    args = parser.parse_args(argv)
    try:
        applied = asyncio.run(migrate(Settings().database_url.get_secret_value(), args.wait))
    except Exception as exc:  # noqa: BLE001 - one clear line for an operator, never the URL
        # Server and socket errors name no password; a malformed URL's error might quote it.
        detail = f": {exc}" if isinstance(exc, (asyncpg.PostgresError, OSError)) else ""
        print(f"migrate: failed ({type(exc).__name__}{detail}); check DATABASE_URL and that Postgres is up",
              file=sys.stderr)
        return 1
    print(f"migrate: applied {applied or 'nothing'}; schema is up to date", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
