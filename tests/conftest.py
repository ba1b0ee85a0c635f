"""Test infrastructure shared by unit and e2e tests: where RabbitMQ and Postgres are.

Order: ``TEST_RABBITMQ_URL`` / ``TEST_DATABASE_URL`` (or ``RABBITMQ_URL`` / ``DATABASE_URL``),
else testcontainers when a Docker engine answers, else the local servers' defaults.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

LOCAL_RABBITMQ = "amqp://guest:guest@127.0.0.1:5672/"
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass(frozen=True)
class Infra:
    rabbitmq_url: str
    #: A URL of the server's maintenance database; tests create their own databases beside it.
    postgres_url: str


def _docker_available() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    rabbit = os.environ.get("TEST_RABBITMQ_URL") or os.environ.get("RABBITMQ_URL")
    postgres = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
    containers = []
    if (not rabbit or not postgres) and _docker_available():
        if not postgres:
            from testcontainers.postgres import PostgresContainer

            pg = PostgresContainer("postgres:16-alpine", driver=None).start()
            containers.append(pg)
            postgres = pg.get_connection_url()
        if not rabbit:
            from testcontainers.rabbitmq import RabbitMqContainer

            rc = RabbitMqContainer("rabbitmq:3.13-alpine").start()
            containers.append(rc)
            rabbit = f"amqp://guest:guest@{rc.get_container_host_ip()}:{rc.get_exposed_port(5672)}/"
    try:
        yield Infra(rabbit or LOCAL_RABBITMQ, postgres or LOCAL_POSTGRES)
    finally:
        for container in containers:
            container.stop()
