"""The RabbitMQ definitions of the deployments (users per service, permissions, the bus's queues and
exchanges) are the ones ``provisioning_common.bus_permissions`` models, which tests/faults/test_bus_permissions.py
checks against a real broker."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import yaml
from provisioning_common.bus_permissions import USERS, compose_template, definitions, password_variable
from provisioning_common.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "deploy/rabbitmq/definitions.template.json"
ENTRYPOINT = ROOT / "deploy/rabbitmq/compose-entrypoint.sh"


def test_the_template_is_the_models_rendering() -> None:
    assert TEMPLATE.read_text() == compose_template(), \
        "run: python -m provisioning_common.bus_permissions template > deploy/rabbitmq/definitions.template.json"


def _render(tmp_path: Path, queue_type: str) -> dict:
    passwords = {user.name: f"pw-{user.name}.~_" for user in USERS}
    out = tmp_path / "definitions.json"
    env = {"PATH": os.environ["PATH"], "RENDER_ONLY": "1", "DEFINITIONS_TEMPLATE": str(TEMPLATE),
           "DEFINITIONS_FILE": str(out), "BUS_QUEUE_TYPE": queue_type, "RABBITMQ_USER": "admin",
           "RABBITMQ_PASSWORD": "admin-pw", **{password_variable(u): p for u, p in passwords.items()}}
    subprocess.run(["sh", str(ENTRYPOINT)], env=env, check=True, timeout=30)
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    rendered = json.loads(out.read_text())
    assert rendered == definitions(Settings(bus_queue_type=queue_type), passwords, admin=("admin", "admin-pw"))
    return rendered


def test_the_compose_entrypoint_renders_the_definitions(tmp_path: Path) -> None:
    classic = _render(tmp_path, "classic")
    assert {q["arguments"]["x-queue-type"] for q in classic["queues"]} == {"classic"}
    quorum = _render(tmp_path, "quorum")
    assert {q["arguments"]["x-delivery-limit"] for q in quorum["queues"]} == {5}


def test_the_compose_entrypoint_refuses_a_missing_or_unsafe_password(tmp_path: Path) -> None:
    base = {"PATH": os.environ["PATH"], "RENDER_ONLY": "1", "DEFINITIONS_TEMPLATE": str(TEMPLATE),
            "DEFINITIONS_FILE": str(tmp_path / "d.json"), "RABBITMQ_USER": "admin", "RABBITMQ_PASSWORD": "pw",
            **{password_variable(u.name): "pw" for u in USERS}}
    for broken in ({password_variable("http_gateway"): ""}, {password_variable("http_gateway"): "a/b"}):
        done = subprocess.run(["sh", str(ENTRYPOINT)], env={**base, **broken}, capture_output=True, text=True)
        assert done.returncode != 0 and "RABBITMQ_HTTP_GATEWAY_PASSWORD" in done.stderr


def test_compose_loads_the_definitions_and_no_service_uses_the_administrator() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    rabbitmq = compose["services"]["rabbitmq"]
    assert rabbitmq["entrypoint"] == ["/etc/rabbitmq/provisioning/compose-entrypoint.sh"]
    assert "./deploy/rabbitmq:/etc/rabbitmq/provisioning:ro" in rabbitmq["volumes"]
    conf = (ROOT / "deploy/rabbitmq/compose.conf").read_text()
    assert "load_definitions = /tmp/provisioning-definitions.json" in conf
    for user in USERS:
        if user.name != "backend":
            assert password_variable(user.name) in rabbitmq["environment"]
    assert os.access(ENTRYPOINT, os.X_OK)
