"""`make up` (python -m devstack up): starts everything, keeps its secrets, stops cleanly, clear port errors."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.ports import free_port, free_udp_port

from .conftest import Env, _drop_database


def _start(cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "devstack", "up"], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(proc: subprocess.Popen[str], marker: str, timeout: float = 60) -> str:
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"{marker!r} not printed:\n{''.join(seen)[-3000:]}")


@pytest.fixture
def up_env(env: Env) -> dict[str, str]:
    variables = {k: v for k, v in os.environ.items() if k not in ("ADMIN_API_TOKEN", "DATA_ENCRYPTION_KEY")}
    variables.update({
        "RABBITMQ_URL": env.infra.rabbitmq_url,
        # A database that does not exist yet: `make up` creates it.
        "DATABASE_URL": env.database_url + "_up",
        "BUS_NAMESPACE": f"e2e-up-{uuid.uuid4().hex[:6]}.",
        "BIND_HOST": "127.0.0.1",
        "HTTP_PORT": str(free_port()), "ADMIN_PORT": str(free_port()),
        "MQTT_PORT": str(free_port()), "MQTTS_PORT": str(free_port()), "COAP_PORT": str(free_udp_port()),
    })
    yield variables
    _drop_database(Env(env.infra, database=env.database + "_up", namespace=variables["BUS_NAMESPACE"]))


def test_up_starts_everything_and_stops_on_sigterm(tmp_path: Path, up_env: dict[str, str]) -> None:
    proc = _start(tmp_path, up_env)
    try:
        banner = _wait_for(proc, "Ctrl-C stops everything")
        secrets_file = tmp_path / ".local" / "stack.env"
        assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
        token = next(line.split("=", 1)[1] for line in secrets_file.read_text().splitlines()
                     if line.startswith("ADMIN_API_TOKEN="))
        assert token in banner and "mqttserver.pub.pem" in banner
        assert f"coap://127.0.0.1:{up_env['COAP_PORT']}/api/v1/provision" in banner
        assert (tmp_path / ".local" / "mqtt-tls" / "mqttserver.pub.pem").exists()
        admin = f"http://127.0.0.1:{up_env['ADMIN_PORT']}"
        profile = httpx.post(f"{admin}/api/device-profiles", headers={"Authorization": f"Bearer {token}"},
                             json={"name": "up-test", "provisionStrategy": "ALLOW_CREATE_NEW_DEVICES"}).json()
        answer = httpx.post(f"http://127.0.0.1:{up_env['HTTP_PORT']}/api/v1/provision", json={
            "deviceName": "first", "provisionDeviceKey": profile["provisionDeviceKey"],
            "provisionDeviceSecret": profile["provisionDeviceSecret"]}).json()
        assert answer["status"] == "SUCCESS"
        children = [int(p) for p in subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True,
                                                   text=True).stdout.split()]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    # Every service it started has exited too.
    time.sleep(0.5)
    alive = [pid for pid in children if pid != proc.pid and Path(f"/proc/{pid}").exists()]
    assert alive == [], alive


def test_second_up_reuses_its_secrets(tmp_path: Path, up_env: dict[str, str]) -> None:
    tokens = []
    for _ in range(2):
        proc = _start(tmp_path, up_env)
        try:
            banner = _wait_for(proc, "Ctrl-C stops everything")
            tokens.append(next(line.split()[2] for line in banner.splitlines() if "Admin token" in line))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    assert tokens[0] == tokens[1]


def test_port_in_use_is_a_one_line_error(tmp_path: Path, up_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _start(tmp_path, {**up_env, "HTTP_PORT": str(port)})
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert f"error: port {port} is already in use; set HTTP_PORT to a free port" in output


def test_udp_port_in_use_for_coap_is_a_one_line_error(tmp_path: Path, up_env: dict[str, str]) -> None:
    with socket.socket(type=socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        proc = _start(tmp_path, {**up_env, "COAP_PORT": str(port)})
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert f"error: port {port} is already in use; set COAP_PORT to a free port" in output


def test_services_report_ready_with_a_quiet_log_level(env: Env) -> None:
    """LOG_LEVEL=WARNING hides INFO lines, but not the ready line devstack (and `make up`) waits for."""
    from devstack import Stack

    quiet = Stack(env.variables(LOG_LEVEL="WARNING", MQTTS_PORT="0"),
                  ["credentials", "provisioning_core", "mqtt_gateway", "coap_gateway"])
    quiet.start(timeout=30)
    try:
        assert all(any(f"{name} ready" in line for line in p.lines) for name, p in quiet.processes.items())
        assert " INFO " not in "\n".join(line for p in quiet.processes.values() for line in p.lines
                                         if " ready" not in line)
    finally:
        quiet.stop()


def test_http_services_exit_0_on_sigterm(env: Env) -> None:
    """uvicorn re-raises SIGTERM after its graceful stop; runtime.serve_http turns that into exit 0."""
    from devstack import Stack

    services = Stack(env.variables(BRIDGE_AUTH_PORT=str(free_port())), ["admin_api", "http_gateway", "broker_auth"])
    services.start(timeout=30)
    codes = {name: process.stop() for name, process in services.processes.items()}
    assert codes == {"admin_api": 0, "http_gateway": 0, "broker_auth": 0}
