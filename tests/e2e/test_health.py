"""The health endpoints the compose health checks and Kubernetes probes use, on real processes:
``/health`` (readiness: broker, and Postgres where the service uses it) and ``/live`` (liveness)."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from devstack import ServiceProcess

from tests.ports import free_port

from .conftest import Env

#: Services without an HTTP port of their own answer on HEALTH_PORT (mqtt_bridge here without
#: MQTT_BROKER_URL, idle; with a broker: tests/e2e/test_mqtt_bridge.py).
HEALTH_PORT_SERVICES = ("credentials", "provisioning_core", "mqtt_gateway", "coap_gateway", "mqtt_bridge")


def get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def services(env: Env) -> Iterator[dict[str, tuple[ServiceProcess, int]]]:
    """Each service with its own health port (one environment per process)."""
    started: dict[str, tuple[ServiceProcess, int]] = {}
    try:
        for name in HEALTH_PORT_SERVICES:
            port = free_port()
            process = ServiceProcess(name, {**os.environ, **env.variables(HEALTH_PORT=str(port))})
            process.start()
            started[name] = (process, port)
        for name, port in (("http_gateway", env.http_port), ("admin_api", env.admin_port)):
            process = ServiceProcess(name, {**os.environ, **env.variables()})
            process.start()
            started[name] = (process, port)
        # broker_auth answers on its own port, BRIDGE_AUTH_PORT, and never opens HEALTH_PORT.
        auth_port = free_port()
        process = ServiceProcess("broker_auth", {**os.environ, **env.variables(BRIDGE_AUTH_PORT=str(auth_port))})
        process.start()
        started["broker_auth"] = (process, auth_port)
        for process, _ in started.values():
            process.wait_ready(60)
        yield started
    finally:
        for process, _ in started.values():
            process.stop()


def test_health_and_live_answer_on_every_service(services: dict[str, tuple[ServiceProcess, int]]) -> None:
    for name, (_, port) in services.items():
        deadline = time.monotonic() + 10
        while (status := get(port, "/health"))[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)  # the listener starts right after the service reports ready
        assert status == (200, {"status": "UP"}), name
        assert get(port, "/live") == (200, {"status": "UP"}), name


def test_unknown_paths_are_404(services: dict[str, tuple[ServiceProcess, int]]) -> None:
    for name in HEALTH_PORT_SERVICES:  # (/metrics is served there too: tests/e2e/test_observability.py)
        assert get(services[name][1], "/healthz")[0] == 404


def test_the_health_listener_closes_when_the_service_stops(services: dict[str, tuple[ServiceProcess, int]]) -> None:
    process, port = services["credentials"]
    process.signal(signal.SIGTERM)
    assert process.proc is not None and process.proc.wait(20) == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
