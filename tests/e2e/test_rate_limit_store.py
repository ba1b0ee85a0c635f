"""The rate limiter's shared store (provisioning_core.rate_limit.PostgresStore) on a real Postgres: concurrent
requests batched into one transaction still get an exact budget, shared by every instance, all-or-nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import replace

import asyncpg
import pytest
from provisioning_common.db.migrate import apply_migrations
from provisioning_common.rate_limit import Bucket, PostgresStore

from tests.conftest import Infra

from .conftest import Env, _create_database, _drop_database


@pytest.fixture(scope="module")
def database(infra: Infra) -> Iterator[str]:
    env = Env(infra)
    _create_database(env)

    async def migrate() -> None:
        conn = await asyncpg.connect(env.database_url)
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()

    asyncio.run(migrate())
    try:
        yield env.database_url
    finally:
        _drop_database(env)


def _bucket(capacity: int, period_s: float = 60.0) -> Bucket:
    return Bucket(f"test:{uuid.uuid4().hex}", capacity, period_s)


async def test_two_instances_batching_concurrent_requests_share_one_exact_budget(database: str) -> None:
    pools = [await asyncpg.create_pool(database, min_size=1, max_size=4) for _ in range(2)]
    try:
        stores = [PostgresStore(pool, max_batch=16) for pool in pools]
        shared = _bucket(25)
        # 200 concurrent requests over two instances, each its own pool and batches: exactly 25 admitted.
        verdicts = await asyncio.gather(*(stores[i % 2].admit([], [shared]) for i in range(200)))
        codes = [code for code, _ in verdicts]
        assert codes.count(0) == 25 and codes.count(2) == 175
        # The refused know when there is room again: one token is 60/25 = 2.4 s away at most.
        assert all(0 < retry <= 2.4 + 0.5 for code, retry in verdicts if code)
    finally:
        for pool in pools:
            await pool.close()


async def test_a_request_takes_all_its_buckets_or_none_and_a_checked_bucket_is_not_taken(database: str) -> None:
    async with asyncpg.create_pool(database, min_size=1, max_size=2) as pool:
        store = PostgresStore(pool)
        roomy, tight, checked = _bucket(10), _bucket(1), _bucket(1)
        assert await store.admit([checked], [roomy, tight]) == (0, 0.0)
        # tight is empty now: the second request is refused and takes nothing from roomy either.
        code, retry = await store.admit([], [roomy, tight])
        assert code == 2 and 55 < retry <= 60
        levels = await pool.fetch("SELECT bucket, tat - extract(epoch FROM clock_timestamp()) AS ahead"
                                  " FROM rate_limit_buckets WHERE bucket = ANY($1)", [roomy.name, checked.name])
        ahead = {row["bucket"]: row["ahead"] for row in levels}
        assert checked.name not in ahead  # checked, never taken
        assert 5 < ahead[roomy.name] <= 6  # one token of 10 per minute: 6 s ahead, not 12
        # A checked bucket that is empty refuses with code 1, before any take.
        await store.admit([], [checked])
        assert (await store.admit([checked], [replace(roomy, capacity=10)]))[0] == 1


async def test_a_failing_batch_fails_each_of_its_waiters_and_the_next_batch_works(database: str) -> None:
    async with asyncpg.create_pool(database, min_size=1, max_size=2) as pool:
        store = PostgresStore(pool)
        await pool.execute("ALTER TABLE rate_limit_buckets RENAME TO rate_limit_buckets_away")
        try:
            results = await asyncio.gather(*(store.admit([], [_bucket(5)]) for _ in range(3)),
                                           return_exceptions=True)
        finally:
            await pool.execute("ALTER TABLE rate_limit_buckets_away RENAME TO rate_limit_buckets")
        assert all(isinstance(r, asyncpg.UndefinedTableError) for r in results)
        assert await store.admit([], [_bucket(5)]) == (0, 0.0)


async def test_a_batch_that_only_checks_refuses_on_an_empty_bucket_and_writes_nothing(database: str) -> None:
    """Requests with nothing to take (the right secret with no provisions limit) are decided by one read: an
    empty checked bucket refuses, with the time until it has room; nothing is created or moved."""
    async with asyncpg.create_pool(database, min_size=1, max_size=2) as pool:
        store = PostgresStore(pool)
        empty, unknown = _bucket(1), _bucket(3)
        assert await store.admit([], [empty]) == (0, 0.0)  # takes its only token
        before = await pool.fetchval("SELECT tat FROM rate_limit_buckets WHERE bucket = $1", empty.name)
        verdicts = await asyncio.gather(store.admit([empty], []), store.admit([unknown], []),
                                        store.admit([empty, unknown], []))
        assert [code for code, _ in verdicts] == [1, 0, 1]
        assert 55 < verdicts[0][1] <= 60 and verdicts[1] == (0, 0.0)
        assert await pool.fetchval("SELECT tat FROM rate_limit_buckets WHERE bucket = $1", empty.name) == before
        assert await pool.fetchval("SELECT count(*) FROM rate_limit_buckets WHERE bucket = $1", unknown.name) == 0
