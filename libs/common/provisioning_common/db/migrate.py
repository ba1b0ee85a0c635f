"""Versioned schema migrations, applied at start-up by every service that touches Postgres.

Safe when several instances start at once: the whole run holds a session advisory lock, and
each migration commits together with its row in ``schema_migrations``.
"""

from __future__ import annotations

import logging
import re
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from .. import metrics

log = logging.getLogger(__name__)

_LOCK_KEY = 0x70726F76  # "prov"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every shipped migration, in order."""
    found = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


async def apply_migrations(conn: asyncpg.Connection) -> list[int]:
    """Apply the migrations this database lacks; returns the versions applied now."""
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in migrations():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            log.info("applied migration %s", name)
            applied_now.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now


async def ensure_database(database_url: str) -> bool:
    """Create the database named in ``database_url`` if it is missing; True if it was created."""
    parts = urlsplit(database_url)
    name = parts.path.lstrip("/")
    if not name:
        return False
    try:
        conn = await asyncpg.connect(database_url)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return False
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        quoted = '"' + name.replace('"', '""') + '"'
        await admin.execute(f"CREATE DATABASE {quoted}")
    except asyncpg.DuplicateDatabaseError:
        return False
    finally:
        await admin.close()
    log.info("created database %s", name)
    return True


async def _reset(conn: asyncpg.Connection) -> None:
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def create_pool(database_url: str, *, min_size: int, max_size: int, migrate: bool = True) -> asyncpg.Pool:
    """A connection pool, after applying pending migrations on one connection."""
    if migrate:
        conn = await asyncpg.connect(database_url)
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
    # Only roll back on release: the services leave no other session state (no LISTEN, SET or
    # advisory locks on pooled connections), and asyncpg's default reset is a round trip per use.
    pool = await asyncpg.create_pool(database_url, min_size=min_size, max_size=max_size, reset=_reset)
    assert pool is not None
    metrics.watch_pool(pool)  # provisioning_db_pool_* on /metrics while it is open
    return pool
