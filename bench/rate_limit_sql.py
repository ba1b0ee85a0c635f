#!/usr/bin/env python3
"""The provisioning rate limiter alone (provisioning_common.rate_limit.PostgresStore), as the core calls it.

    python bench/rate_limit_sql.py [--database-url URL] [-n 20000] [-c 64] [--profiles 1]

Each call is what one provision with the right secret costs: check the source's two wrong-secret
buckets, take one token from the profile's two provisions buckets and the source's two (six buckets).
``-c`` callers call concurrently, as ``-c`` concurrent provisions would; the store batches what arrives
while a batch is in flight into one transaction. With one profile (``--profiles 1``) every call takes
from the same hot row, the worst case for row locks. Limits are set high so that
nothing is refused. Prints calls per second and latency percentiles; DATABASE_URL (or --database-url)
must name a database with the migrations applied (``make up`` or ``python -m devstack migrate``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time

import asyncpg
from provisioning_common.rate_limit import Bucket, PostgresStore


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database-url", default=os.environ.get(
        "DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/provisioning"))
    parser.add_argument("-n", type=int, default=20000)
    parser.add_argument("-c", type=int, default=64)
    parser.add_argument("--profiles", type=int, default=1)
    args = parser.parse_args()
    pool = await asyncpg.create_pool(args.database_url, min_size=4, max_size=8)
    store = PostgresStore(pool)
    latencies: list[float] = []
    refused = 0

    async def one(i: int) -> None:
        nonlocal refused
        source = f"10.{i % 250}.{i // 250 % 250}.{random.randrange(250)}"
        profile = f"bench-{i % args.profiles}"
        names = [f"fs:{source}", f"fk:{source}|key", f"pp:{profile}:60", f"pp:{profile}:3600",
                 f"ps:{source}:60", f"ps:{source}:3600"]
        periods = [60, 60, 60, 3600, 60, 3600]
        buckets = [Bucket(name, 10**9, period) for name, period in zip(names, periods, strict=True)]
        start = time.perf_counter()
        code, _ = await store.admit(buckets[:2], buckets[2:])
        latencies.append(time.perf_counter() - start)
        refused += code != 0

    queue = iter(range(args.n))

    async def worker() -> None:
        for i in queue:
            await one(i)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.c)))
    elapsed = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100)
    print(f"PostgresStore.admit: {args.n} calls, {args.c} concurrent, {args.profiles} profile(s): "
          f"{args.n / elapsed:.0f} calls/s; latency ms p50 {q[49] * 1000:.2f} p95 {q[94] * 1000:.2f} "
          f"p99 {q[98] * 1000:.2f}; refused {refused}")
    await pool.execute("DELETE FROM rate_limit_buckets WHERE bucket LIKE 'pp:bench-%' OR bucket LIKE 'ps:10.%'")
    await pool.close()


if __name__ == "__main__":
    asyncio.run(main())
