#!/usr/bin/env python3
"""The CPU a caller spends per bus RPC (issue 18, "cheaper gateways"), without a gateway or a core around it.

    python bench/bus_rpc.py [-n 20000] [-c 64] [--rabbitmq-url amqp://guest:guest@127.0.0.1:5672/] [--json]

Starts an echo service in a child process (``Bus.serve``, a handler that answers at once) and makes ``-n``
calls from this process, ``-c`` at a time, through :meth:`Bus.call` with a provision-sized request, in a
namespace of its own (``bench-bus-<random>.``, its queue deleted afterwards). Prints calls per second and
the CPU time (user + system, from ``getrusage``) each side used per call: the caller's is what every
gateway pays per provision on the bus path, apart from its own protocol. Run it under two source trees
(``PYTHONPATH=<tree>/libs/common``) to compare them; the machine's other load moves the numbers less than
an end-to-end run's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import sys
import time
import uuid
from typing import Any

from provisioning_common.bus import Bus
from provisioning_common.contract import Service
from provisioning_common.settings import Settings
from pydantic import BaseModel


class Request(BaseModel):
    """About a provision request's size and shape."""

    provision_device_key: str
    provision_device_secret: str
    device_name: str
    request_id: str
    transport: str = "HTTP"
    source_address: str = "127.0.0.1"


class Reply(BaseModel):
    status: str
    device_id: str
    credentials_type: str
    credentials_value: str


ECHO = Service("bench_echo")
CALL = ECHO.rpc("call", Request, Reply, batched=True)  # as provision is: --batch-max 1 turns batching off
ANSWER = Reply(status="SUCCESS", device_id=str(uuid.uuid4()), credentials_type="ACCESS_TOKEN",
               credentials_value="x" * 20)


def _settings(url: str, namespace: str, batch_max: int = 32) -> Settings:
    return Settings(rabbitmq_url=url, bus_namespace=namespace, provision_timeout_s=30, bus_call_batch_max=batch_max)


def serve(url: str, namespace: str, ready: Any, stop: Any, cpu: Any) -> None:
    async def main() -> None:
        bus = await Bus.connect(_settings(url, namespace), "bench_echo")

        async def answer(_: Request) -> Reply:
            return ANSWER

        await bus.serve(ECHO, [CALL.handler(answer)])
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu.value = usage.ru_utime + usage.ru_stime
        await bus.stop_consuming(2)
        channel = await bus.open_channel()
        await channel.queue_delete(f"{namespace}{ECHO.name}")
        await bus.close()

    asyncio.run(main())


async def call_many(url: str, namespace: str, count: int, concurrency: int, batch_max: int) -> tuple[float, float]:
    """Wall seconds and caller CPU seconds for ``count`` calls (after 500 uncounted ones)."""
    bus = await Bus.connect(_settings(url, namespace, batch_max), "bench_caller")
    next_index = 0

    async def worker(until: int) -> None:
        nonlocal next_index
        while next_index < until:
            i = next_index
            next_index += 1
            request = Request(provision_device_key="k" * 20, provision_device_secret="s" * 20,
                              device_name=f"bench-{i}", request_id=uuid.uuid4().hex)
            await bus.call(CALL, request)

    await asyncio.gather(*(worker(500) for _ in range(concurrency)))
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    await asyncio.gather(*(worker(500 + count) for _ in range(concurrency)))
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    await bus.close()
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--requests", type=int, default=20000)
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("--rabbitmq-url", default=os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    p.add_argument("--batch-max", type=int, default=32,
                   help="BUS_CALL_BATCH_MAX of the caller (the method is declared batched, as provision is); 1: off")
    p.add_argument("--json", action="store_true", help="print one JSON line as well")
    args = p.parse_args()
    namespace = f"bench-bus-{uuid.uuid4().hex[:8]}."
    context = multiprocessing.get_context("spawn")
    ready, stop, cpu = context.Event(), context.Event(), context.Value("d", 0.0)
    server = context.Process(target=serve, args=(args.rabbitmq_url, namespace, ready, stop, cpu), daemon=True)
    server.start()
    if not ready.wait(30):
        server.kill()
        sys.exit("the echo service did not start (is RabbitMQ at --rabbitmq-url?)")
    try:
        wall, caller_cpu = asyncio.run(call_many(args.rabbitmq_url, namespace, args.requests, args.concurrency,
                                                args.batch_max))
    finally:
        stop.set()
        server.join(15)
    result = {"calls_per_s": round(args.requests / wall, 1),
              "caller_cpu_us_per_call": round(1e6 * caller_cpu / args.requests, 1),
              "service_cpu_s_total": round(cpu.value, 2), "requests": args.requests, "concurrency": args.concurrency,
              "batch_max": args.batch_max}
    print(f"{result['calls_per_s']:,.0f} calls/s; caller CPU {result['caller_cpu_us_per_call']} us per call "
          f"({args.requests} calls, {args.concurrency} at a time, BUS_CALL_BATCH_MAX {args.batch_max}; echo service "
          f"CPU {result['service_cpu_s_total']} s, its start and 500 warm-up calls included)")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
