"""The fault harness itself: private servers that really are private, that provision under a real
service stack, that die, freeze and come back on command, and that never outlive their fixtures.

If these fail, the fault scenarios' numbers mean nothing; so they come first and must pass today.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import asyncpg
import pytest

from .conftest import Deployment, private_postgres, private_rabbitmq, wait_services_back
from .infra import SHARED_PORTS, PrivatePostgres, PrivateRabbitMQ, is_running, port_accepts
from .load import make_requests, run_load

pytestmark = pytest.mark.faults


def _listeners(port: int) -> set[int]:
    """PIDs listening on ``port`` (via ``ss``), to prove the shared servers are left alone."""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out)}


@pytest.fixture(scope="module")
def shared_before() -> dict[int, set[int]]:
    return {port: _listeners(port) for port in (5432, 5672, 25672, 4369)}


def test_private_rabbitmq_has_its_own_everything(shared_before: dict[int, set[int]], rabbit: PrivateRabbitMQ) -> None:
    assert rabbit.node_name.startswith("fault-") and rabbit.node_name.endswith("@localhost")
    assert not set(rabbit.ports()) & SHARED_PORTS
    assert len(set(rabbit.ports())) == 3
    for port in rabbit.ports():
        assert port_accepts(port), port
    # Every listener of the private node belongs to a process of ours.
    ours = set(rabbit.pids())
    assert _listeners(rabbit.amqp_port) <= ours and _listeners(rabbit.epmd_port) <= ours
    assert rabbit.start_times and rabbit.start_times[0] < 90
    print(f"private RabbitMQ {rabbit.node_name} ports {rabbit.ports()} started in {rabbit.start_times[0]:.1f}s")


async def test_stack_provisions_across_a_broker_kill_and_restart(deployment: Deployment) -> None:
    rabbit = deployment.rabbit
    first = await run_load(deployment.http_url, make_requests(deployment.profile, 50, "h1"), concurrency=16)
    assert first.counts() == {"SUCCESS": 50}, first.counts()

    pids = rabbit.pids()
    await asyncio.to_thread(rabbit.kill)
    assert not [pid for pid in pids if is_running(pid)]
    assert not [port for port in rabbit.ports() if port_accepts(port)]

    seconds = await asyncio.to_thread(rabbit.restart)
    back = await wait_services_back(deployment, timeout=60)
    second = await run_load(deployment.http_url, make_requests(deployment.profile, 50, "h2"), concurrency=16)
    assert second.counts() == {"SUCCESS": 50}, second.counts()
    print(f"RabbitMQ restarted in {seconds:.1f}s; services back after {back}")


async def test_private_postgres_stall_resume_and_restart(postgres: PrivatePostgres) -> None:
    assert postgres.port not in SHARED_PORTS
    conn = await asyncpg.connect(postgres.url)
    await conn.execute("CREATE TABLE IF NOT EXISTS harness (v int)")
    await conn.execute("INSERT INTO harness VALUES (1)")

    postgres.pause()
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(conn.fetchval("SELECT count(*) FROM harness"), 1.5)
        with pytest.raises((TimeoutError, OSError)):
            await asyncpg.connect(postgres.url, timeout=1.5)
    finally:
        postgres.resume()
    await conn.close()  # its cancelled query left it unusable
    conn = await asyncpg.connect(postgres.url)
    assert await conn.fetchval("SELECT count(*) FROM harness") == 1

    await asyncio.to_thread(postgres.stall, 1.0)
    assert await conn.fetchval("SELECT 1") == 1  # a stall delays; it does not break a connection

    old = postgres.pids()
    seconds = await asyncio.to_thread(postgres.restart)
    assert not [pid for pid in old if is_running(pid)]
    with pytest.raises((asyncpg.PostgresError, OSError, asyncpg.InterfaceError)):
        await conn.fetchval("SELECT 1")
    conn = await asyncpg.connect(postgres.url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM harness") == 1  # committed rows survive kill -9
    finally:
        await conn.close()
    starts = [round(s, 2) for s in postgres.start_times]
    print(f"private Postgres initdb {postgres.initdb_seconds:.1f}s, starts {starts}"
          f" (last after kill -9: {seconds:.2f}s)")


def test_instances_are_gone_after_their_fixtures_end() -> None:
    """The fixtures' own bodies, ended by a failing test: every PID, port and directory is gone."""
    recorded: dict[str, tuple[list[int], list[int], Path]] = {}
    with (
        pytest.raises(RuntimeError, match="the test failed"),
        private_rabbitmq() as rabbit,
        private_postgres() as postgres,
    ):
        postgres.pause()  # even a frozen server is cleaned up
        recorded = {"rabbit": (rabbit.pids(), rabbit.ports(), rabbit.base_dir),
                    "postgres": (postgres.pids(), postgres.ports(), postgres.base_dir)}
        assert all(pids for pids, _, _ in recorded.values())
        raise RuntimeError("the test failed")
    for name, (pids, ports, base_dir) in recorded.items():
        assert not [pid for pid in pids if is_running(pid)], name
        assert not [port for port in ports if port_accepts(port)], name
        assert not base_dir.exists(), name


def test_a_killed_test_process_leaves_nothing_running() -> None:
    """Even SIGKILL of the test process (no finalizer, no atexit) leaves no server behind: the watchdog."""
    script = textwrap.dedent("""
        import os, sys
        from tests.faults.infra import PrivatePostgres
        server = PrivatePostgres()
        server.start()
        server.pause()
        print(" ".join(map(str, server.pids())), server.port, server.base_dir, flush=True)
        os.kill(os.getpid(), 9)
    """)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == -9, proc.stderr[-2000:]
    *pids, port, base_dir = proc.stdout.split()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and ([p for p in pids if is_running(int(p))] or Path(base_dir).exists()):
        time.sleep(0.2)
    assert not [p for p in pids if is_running(int(p))]
    assert not port_accepts(int(port))
    assert not Path(base_dir).exists()


def test_shared_servers_untouched(shared_before: dict[int, set[int]]) -> None:
    """Runs last in this module: whatever listened on the shared ports still does, with the same PIDs."""
    assert {port: _listeners(port) for port in shared_before} == shared_before
