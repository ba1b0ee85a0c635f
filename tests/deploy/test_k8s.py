"""deploy/k8s, rendered (base and every overlay) by ``kubectl kustomize`` and validated offline: built-in
kinds against the Kubernetes JSON schemas bundled by kubernetes-validate (strict), the operators'
resources against the upstream CRDs in ../shared/k8s-crds (the subsets in deploy/k8s/crds when ../shared
is absent; they are checked to agree with upstream when it is present), and the properties the
deployment promises."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from kubernetes_validate.utils import SchemaNotFoundError
from provisioning_common.bus_permissions import USERS, password_variable
from provisioning_common.settings import Settings

from . import crds
from .manifests import K8S, ROOT, render

TREES = ["base", "overlays/dev", "overlays/production"]
#: The oldest Kubernetes release the manifests promise to work on, and the newest bundled schema.
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
GATEWAYS = {"http-gateway", "mqtt-gateway", "coap-gateway"}
#: Served by uvicorn, which drains for PROVISION_TIMEOUT_S + 5 s, behind a Service (preStop pause).
HTTP_SERVICES = {"http-gateway", "admin-api", "broker-auth"}
AUTOSCALED = GATEWAYS | {"provisioning-core", "credentials", "broker-auth"}
#: mqtt-bridge is a StatefulSet (its client id, hence its broker session, follows the pod name).
STATEFUL = {"mqtt-bridge"}
SERVICES = AUTOSCALED | {"admin-api"} | STATEFUL
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|KEY$|_KEY|DATABASE_URL", re.I)
#: Environment variables of the pods that are not settings (parts of RABBITMQ_URL).
HELPER_VARIABLES = {"RABBITMQ_USERNAME", "RABBITMQ_PASSWORD", "RABBITMQ_ADMIN_USERNAME", "RABBITMQ_ADMIN_PASSWORD",
                    # provisioning-core's init container bus-users (provisioning_common.bus_permissions)
                    *(password_variable(user.name) for user in USERS)}

Doc = dict[str, Any]


@pytest.fixture(scope="module", params=TREES)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    return request.param, render(K8S / request.param)


def by_kind(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_spec(deployment: Doc) -> Doc:
    return deployment["spec"]["template"]["spec"]


def containers(deployment: Doc, init: bool = True) -> list[Doc]:
    spec = pod_spec(deployment)
    return spec["containers"] + (spec.get("initContainers", []) if init else [])


def workloads(docs: list[Doc]) -> dict[str, Doc]:
    """Deployments and StatefulSets, by name."""
    return by_kind(docs, "Deployment") | by_kind(docs, "StatefulSet")


def config(docs: list[Doc]) -> dict[str, str]:
    return by_kind(docs, "ConfigMap")["provisioning-config"]["data"]


# --- schemas -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crd_validators() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> validator: the upstream CRDs when ../shared is present, else the subsets."""
    return crds.validators(crds.in_use()[1])


def test_crd_subsets_are_valid_crds_for_every_version() -> None:
    subsets = crds.subsets()
    assert set(subsets) == set(crds.UPSTREAM_FILES)
    for crd in subsets.values():
        for version in VERSIONS:
            kubernetes_validate.validate(crd, version, strict=True)


@pytest.mark.skipif(not crds.upstream_present(), reason=f"{crds.UPSTREAM} is absent: nothing to compare with")
def test_crd_subsets_agree_with_upstream() -> None:
    subsets, upstream = crds.subsets(), crds.upstream()
    for name, subset in subsets.items():
        found = list(crds.crd_disagreements(subset, upstream[name]))
        assert not found, f"{name}:\n" + "\n".join(found)


@pytest.mark.skipif(not crds.upstream_present(), reason=f"{crds.UPSTREAM} is absent: nothing to derive from")
def test_crd_subsets_are_their_derivation_from_upstream() -> None:
    for name in crds.UPSTREAM_FILES:
        assert crds.subset_path(name).read_text() == crds.render_subset(name), \
            f"{crds.subset_path(name)}: run `python -m tests.deploy.crds` (or add the field to KEEP there)"


@pytest.mark.skipif(not crds.upstream_present(), reason=f"{crds.UPSTREAM} is absent: nothing to compare with")
def test_the_agreement_check_finds_drift() -> None:
    subset, upstream = crds.subsets()["rabbitmqclusters.rabbitmq.com"], crds.upstream()["rabbitmqclusters.rabbitmq.com"]
    spec = subset["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    spec["rabbitmq"]["properties"]["additionalConfig"]["maxLength"] = 2000     # looser or stricter than upstream
    spec["override"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}  # open where typed
    del spec["persistence"]["properties"]["storage"]["pattern"]               # a constraint dropped
    found = "\n".join(crds.crd_disagreements(subset, upstream))
    assert "additionalConfig/maxLength: 2000 where upstream has 100000" in found
    assert "override/x-kubernetes-preserve-unknown-fields: True is not in upstream" in found
    assert "storage/pattern: missing" in found


def test_built_in_resources_match_the_kubernetes_schemas(
    rendered: tuple[str, list[Doc]], crd_validators: dict[tuple[str, str], Any]
) -> None:
    tree, docs = rendered
    validated = 0
    for doc in docs:
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except SchemaNotFoundError:
                assert (doc["apiVersion"], doc["kind"]) in crd_validators, f"{tree}: no schema for {doc['kind']}"
                continue
            validated += 1
    assert validated >= 20 * len(VERSIONS)


@pytest.mark.parametrize("source", ["upstream", "subset"])
def test_operator_resources_match_their_crds(rendered: tuple[str, list[Doc]], source: str) -> None:
    """Against upstream (what the API server checks), and against the subsets (the fallback without
    ../shared, which must accept what we ship)."""
    if source == "upstream" and not crds.upstream_present():
        pytest.skip(f"{crds.UPSTREAM} is absent")
    validators = crds.validators(crds.upstream() if source == "upstream" else crds.subsets())
    tree, docs = rendered
    custom = [d for d in docs if (d["apiVersion"], d["kind"]) in validators]
    assert {d["kind"] for d in custom} == {"RabbitmqCluster", "Cluster"}
    for doc in custom:
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in validators[(doc["apiVersion"], doc["kind"])].iter_errors(doc)]
        assert not errors, f"{tree}: {doc['kind']}/{doc['metadata']['name']}:\n" + "\n".join(errors)
        # A CRD leaves metadata to the API server's ObjectMeta: checked strictly, carried by a ConfigMap.
        for version in VERSIONS:
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]},
                                         version, strict=True)


def _mutated(kind: str, path: list[str], value: Any) -> Doc:
    doc = next(d for d in render(K8S / "base") if d["kind"] == kind)
    target = doc
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value
    return doc


@pytest.mark.parametrize("mutation", [
    ("RabbitmqCluster", ["spec", "replica"], 3, "'replica' was unexpected"),
    ("RabbitmqCluster", ["spec", "replicas"], "three", "is not of type 'integer'"),
    ("RabbitmqCluster", ["spec", "persistence", "storage"], "10 gigs", "does not match"),
    ("RabbitmqCluster", ["spec", "rabbitmq", "additionalConfig"], "x" * 100_001, "is too long"),
    ("RabbitmqCluster", ["spec", "override", "statefulSet", "spec", "replicaz"], 1, "'replicaz' was unexpected"),
    ("RabbitmqCluster", ["spec", "tolerations"], [{"key": "a"}, "b"], "is not of type 'object'"),
    ("RabbitmqCluster", ["spec", "override", "statefulSet", "spec", "template", "spec", "containers"],
     [{"name": "rabbitmq"}, {"name": "rabbitmq"}], "duplicate entry for list-map keys"),  # x-kubernetes-list-type: map
    ("Cluster", ["spec", "instances"], 0, "less than the minimum of 1"),
    ("Cluster", ["spec", "primaryUpdateStrategy"], "manual", "is not one of"),
    ("Cluster", ["spec", "bootstrap", "initdb", "databse"], "x", "'databse' was unexpected"),
    ("Cluster", ["spec", "imageCatalogRef"], {"apiGroup": "postgresql.cnpg.io", "kind": "ImageCatalog",
                                              "name": "pg", "major": 16},
     "imageName and imageCatalogRef are mutually exclusive"),  # a CEL rule
    ("Cluster", ["spec", "postgresql", "synchronous"], {"method": "any", "number": 0},
     "should be greater than zero"),  # a CEL rule
])
def test_the_crd_check_rejects_what_the_api_server_would(
    mutation: tuple[str, list[str], Any, str], crd_validators: dict[tuple[str, str], Any]
) -> None:
    kind, path, value, message = mutation
    doc = _mutated(kind, path, value)
    errors = [e.message for e in crd_validators[(doc["apiVersion"], kind)].iter_errors(doc)]
    assert errors
    if crds.upstream_present():  # the subsets reject fields they do not keep as unknown
        assert any(message in e for e in errors), errors


@pytest.mark.skipif(not crds.upstream_present(), reason=f"{crds.UPSTREAM} is absent")
@pytest.mark.parametrize("mutation", [
    ("RabbitmqCluster", ["spec", "rabbitmq", "additionalConfig"], "x" * 5000),  # the old subset said 2000
    ("RabbitmqCluster", ["spec", "override", "statefulSet", "spec", "replicas"], 1),
    ("Cluster", ["spec", "postgresql", "synchronous"], {"method": "any", "number": 1}),
])
def test_the_crd_check_accepts_what_upstream_accepts(mutation: tuple[str, list[str], Any]) -> None:
    doc = _mutated(*mutation)
    validator = crds.validators(crds.upstream())[(doc["apiVersion"], doc["kind"])]
    assert not [e.message for e in validator.iter_errors(doc)]


def test_the_crd_check_requires_what_upstream_requires(crd_validators: dict[tuple[str, str], Any]) -> None:
    doc = next(d for d in render(K8S / "base") if d["kind"] == "Cluster")
    del doc["spec"]["instances"]
    with pytest.raises(jsonschema.ValidationError, match="instances"):
        crd_validators[(doc["apiVersion"], "Cluster")].validate(doc)


def test_the_crd_check_evaluates_the_cel_rules() -> None:
    if not crds.upstream_present():
        pytest.skip(f"{crds.UPSTREAM} is absent (the subsets do not keep imageCatalogRef)")
    validator = crds.validators(crds.upstream())[("postgresql.cnpg.io/v1", "Cluster")]
    doc = _mutated("Cluster", ["spec", "imageCatalogRef"],
                   {"apiGroup": "postgresql.cnpg.io", "kind": "ImageCatalog", "name": "pg", "major": 16})
    assert [e.message for e in validator.iter_errors(doc)] == ["imageName and imageCatalogRef are mutually exclusive"]
    del doc["spec"]["imageName"]
    assert not list(validator.iter_errors(doc))
    doc["spec"]["imageCatalogRef"]["kind"] = "ConfigMap"
    assert "Only image catalogs are supported" in [e.message for e in validator.iter_errors(doc)]


def test_the_kubernetes_schema_check_rejects_an_unknown_field() -> None:
    doc = by_kind(render(K8S / "base"), "Deployment")["http-gateway"]
    pod_spec(doc)["containers"][0]["readinesProbe"] = pod_spec(doc)["containers"][0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.utils.ValidationError):
        kubernetes_validate.validate(doc, VERSIONS[0], strict=True)


# --- workloads ---------------------------------------------------------------------------------


def test_every_service_has_a_deployment_with_probes_on_its_health_endpoints(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    deployments = workloads(docs)
    assert set(deployments) == SERVICES
    assert set(by_kind(docs, "StatefulSet")) == STATEFUL
    settings = config(docs)
    listen = {"http-gateway": settings["HTTP_PORT"], "admin-api": settings["ADMIN_PORT"],
              "broker-auth": settings["BRIDGE_AUTH_PORT"]}
    for name, deployment in deployments.items():
        (container,) = containers(deployment, init=False)
        ports = {p["name"]: p for p in container["ports"]}
        for probe, path in (("readinessProbe", "/health"), ("livenessProbe", "/live")):
            get = container[probe]["httpGet"]
            assert get["path"] == path, f"{name} {probe}"
            port = ports[get["port"]]
            assert port["protocol"] == "TCP"
            # The port the service really serves /health and /live on (tests/e2e/test_health.py).
            assert str(port["containerPort"]) == listen.get(name, settings["HEALTH_PORT"]), name


def test_every_container_has_requests_and_limits(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    for name, deployment in workloads(docs).items():
        for container in containers(deployment):
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{name}/{container['name']}"


def test_pods_run_as_the_image_user_without_privileges(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    for name, deployment in workloads(docs).items():
        spec = pod_spec(deployment)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False
        assert spec["enableServiceLinks"] is False
        for container in containers(deployment):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
            assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], name


def test_graceful_shutdown_fits_in_the_termination_grace_period(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    timeout = float(config(docs)["PROVISION_TIMEOUT_S"])
    for name, deployment in workloads(docs).items():
        (container,) = containers(deployment, init=False)
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", ["sleep", "0"])
        assert pre_stop[0] == "sleep"
        # gateways: PROVISION_TIMEOUT_S + 5 s of drain (uvicorn); the bridge: leaving its share group
        # (<= 5 s), then PROVISION_TIMEOUT_S; bus consumers: 10 s of drain.
        drain = timeout + 5 if name in GATEWAYS | HTTP_SERVICES | STATEFUL else 10
        assert pod_spec(deployment)["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + drain + 5, name
        if name in GATEWAYS | HTTP_SERVICES:
            assert float(pre_stop[1]) > 0, f"{name}: endpoints must drop the pod before it stops accepting"


def test_migrations_run_in_the_cores_init_container(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    core = by_kind(docs, "Deployment")["provisioning-core"]
    init, bus_users = pod_spec(core)["initContainers"]
    assert init["args"] == ["provisioning_common.db", "migrate"]
    # The bus's users and permissions (provisioning_common.bus_permissions) before the services connect.
    assert bus_users["args"] == ["provisioning_common.bus_permissions", "apply", "http://rabbitmq:15672"]
    given = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in bus_users["env"]}
    assert given.pop("RABBITMQ_ADMIN_USERNAME") == {"name": "rabbitmq-default-user", "key": "username"}
    assert given.pop("RABBITMQ_ADMIN_PASSWORD") == {"name": "rabbitmq-default-user", "key": "password"}
    assert {name: ref["key"] for name, ref in given.items()} == {password_variable(u.name): u.name for u in USERS}
    assert init["image"] == pod_spec(core)["containers"][0]["image"]
    assert any(e["name"] == "DATABASE_URL" for e in init["env"])


def test_pod_disruption_budgets_and_autoscalers(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    deployments = workloads(docs)
    budgets = by_kind(docs, "PodDisruptionBudget")
    assert set(budgets) == SERVICES
    for name, budget in budgets.items():
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert budget["spec"].get("maxUnavailable") == 1  # never blocks a drain, even at one replica
    autoscalers = by_kind(docs, "HorizontalPodAutoscaler")
    assert set(autoscalers) == AUTOSCALED
    for name, hpa in autoscalers.items():
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
        assert "replicas" not in deployments[name]["spec"], f"{name}: the autoscaler owns replicas"
        assert all(c["resources"]["requests"].get("cpu") for c in containers(deployments[name], init=False))


# --- network -----------------------------------------------------------------------------------


def test_services_select_pods_and_name_their_ports(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    deployments = workloads(docs)
    for name, service in by_kind(docs, "Service").items():
        targets = [d for d in deployments.values()
                   if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(targets) == 1, name
        ports = {p["name"]: p for c in containers(targets[0], init=False) for p in c["ports"]}
        for port in service["spec"].get("ports", []):  # a StatefulSet's headless Service may have none
            assert ports[port["targetPort"]]["protocol"] == port["protocol"], f"{name}:{port['name']}"


def test_device_endpoints_are_exposed_as_documented(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    services = by_kind(docs, "Service")

    def ports(name: str) -> set[tuple[int, str]]:
        return {(p["port"], p["protocol"]) for p in services[name]["spec"]["ports"]}

    assert services["mqtt-gateway"]["spec"]["type"] == "LoadBalancer"
    assert ports("mqtt-gateway") == {(1883, "TCP"), (8883, "TCP")}
    assert services["coap-gateway"]["spec"]["type"] == "LoadBalancer"
    assert ports("coap-gateway") == {(5683, "UDP")}
    assert services["http-gateway"]["spec"]["type"] == services["admin-api"]["spec"]["type"] == "ClusterIP"
    (ingress,) = by_kind(docs, "Ingress").values()
    backends = {(p["backend"]["service"]["name"], p["backend"]["service"]["port"]["name"])
                for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]}
    assert backends == {("http-gateway", "http"), ("admin-api", "http")}
    assert ports("http-gateway") == {(8080, "TCP")} and ports("admin-api") == {(8081, "TCP")}


# --- configuration and secrets -----------------------------------------------------------------


def _env(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    for name, deployment in workloads(docs).items():
        for container in containers(deployment):
            for variable in container.get("env", []):
                yield name, variable


def test_settings_come_from_the_configmap_and_are_valid(
    rendered: tuple[str, list[Doc]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, docs = rendered
    data = config(docs)
    assert data["BUS_QUEUE_TYPE"] == "quorum"
    fields = {f.upper() for f in Settings.model_fields}
    assert set(data) <= fields, set(data) - fields
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    Settings()  # every value valid
    for name, deployment in workloads(docs).items():
        (container,) = containers(deployment, init=False)
        assert container["envFrom"] == [{"configMapRef": {"name": "provisioning-config"}}], name
    for name, variable in _env(docs):
        assert variable["name"] in fields | HELPER_VARIABLES, f"{name}: {variable['name']}"


def test_secrets_only_by_reference(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    assert not by_kind(docs, "Secret"), "Secrets are made outside the manifests (operators, kubectl, a vault)"
    assert not any(SECRET_NAME.search(k) for k in config(docs) if not k.endswith("_FILE")), "a secret in the ConfigMap"
    referenced = set()
    for name, variable in _env(docs):
        if SECRET_NAME.search(variable["name"]):
            assert "secretKeyRef" in variable.get("valueFrom", {}), f"{name}: {variable['name']} is not from a Secret"
        if "valueFrom" in variable:
            ref = variable["valueFrom"]["secretKeyRef"]
            referenced.add((ref["name"], ref["key"]))
        else:
            # Credentials in a URL only as $(VAR) references to Secret-backed variables (RABBITMQ_URL).
            userinfo = re.search(r"://([^/]*)@", variable["value"])
            assert not userinfo or re.fullmatch(r"\$\([A-Z_]+\):\$\([A-Z_]+\)", userinfo[1]), f"{name}: {variable}"
    assert referenced == {
        ("rabbitmq-default-user", "username"), ("rabbitmq-default-user", "password"),
        *(("rabbitmq-bus-users", user.name) for user in USERS),
        ("provisioning-db-app", "uri"), ("provisioning-secrets", "data-encryption-key"),
        ("provisioning-secrets", "admin-api-token"), ("provisioning-secrets", "mqtt-broker-url"),
        ("provisioning-secrets", "broker-auth-secret"),
    }
    for _name, variable in _env(docs):
        if variable["name"] == "RABBITMQ_URL":
            assert variable["value"] == "amqp://$(RABBITMQ_USERNAME):$(RABBITMQ_PASSWORD)@rabbitmq:5672/"
    # Each service on its own RabbitMQ user (README, "Bus permissions"), never the operator's administrator.
    for name, deployment in workloads(docs).items():
        if name == "postgres":
            continue
        (container,) = containers(deployment, init=False)
        env = {e["name"]: e for e in container.get("env", [])}
        if "RABBITMQ_URL" in env:
            user = name.replace("-", "_")
            assert env["RABBITMQ_USERNAME"] == {"name": "RABBITMQ_USERNAME", "value": user}, name
            assert env["RABBITMQ_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "rabbitmq-bus-users", "key": user}


def test_bridge_mode(rendered: tuple[str, list[Doc]]) -> None:
    tree, docs = rendered
    data = config(docs)
    bridge = by_kind(docs, "StatefulSet")["mqtt-bridge"]
    # Stable pod names -> stable client ids (MQTT_BRIDGE_CLIENT_ID-<hostname>) -> the broker sessions survive.
    headless = by_kind(docs, "Service")[bridge["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    replicas = bridge["spec"]["replicas"]
    assert replicas == (1 if tree == "overlays/dev" else 2)
    assert data["MQTT_BRIDGE_SHARE_GROUP"], "several bridges need the shared subscription"
    # Bridge mode is optional: without the broker URL in the Secret the pods start and idle.
    (url,) = [v for v in containers(bridge)[0]["env"] if v["name"] == "MQTT_BROKER_URL"]
    assert url["valueFrom"]["secretKeyRef"] == {"name": "provisioning-secrets", "key": "mqtt-broker-url",
                                                "optional": True}
    # broker-auth is where deploy/brokers/ call it: http://broker-auth:8090 (a ClusterIP Service).
    service = by_kind(docs, "Service")["broker-auth"]
    assert service["spec"]["type"] == "ClusterIP"
    assert {(p["port"], p["protocol"]) for p in service["spec"]["ports"]} == {(int(data["BRIDGE_AUTH_PORT"]), "TCP")}
    for conf in ("emqx/emqx.conf", "rabbitmq/rabbitmq.conf"):
        urls = re.findall(r"http://([^/\s\"]+)", (ROOT / "deploy/brokers" / conf).read_text())
        assert urls and set(urls) == {f"broker-auth:{data['BRIDGE_AUTH_PORT']}"}, conf


def test_mqtt_tls_certificate_is_a_mounted_secret(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    gateway = by_kind(docs, "Deployment")["mqtt-gateway"]
    volume = next(v for v in pod_spec(gateway)["volumes"] if v["name"] == "mqtt-tls")
    mount = next(m for m in containers(gateway)[0]["volumeMounts"] if m["name"] == "mqtt-tls")
    assert volume["secret"]["secretName"] == "mqtt-tls" and mount["readOnly"] is True
    data = config(docs)
    assert Path(data["MQTT_TLS_CERT_FILE"]).parent == Path(data["MQTT_TLS_KEY_FILE"]).parent == Path(mount["mountPath"])


# --- operators ---------------------------------------------------------------------------------


def test_rabbitmq_and_postgres_run_on_their_operators(rendered: tuple[str, list[Doc]]) -> None:
    tree, docs = rendered
    assert set(by_kind(docs, "StatefulSet")) == STATEFUL, "no home-made StatefulSets for RabbitMQ or Postgres"
    (rabbit,) = by_kind(docs, "RabbitmqCluster").values()
    (postgres,) = by_kind(docs, "Cluster").values()
    expected = 1 if tree == "overlays/dev" else 3
    assert rabbit["spec"]["replicas"] == expected and postgres["spec"]["instances"] == expected
    # The Secrets the pods reference are the ones these operators make.
    assert rabbit["metadata"]["name"] == "rabbitmq"  # -> Service rabbitmq, Secret rabbitmq-default-user
    assert postgres["metadata"]["name"] == "provisioning-db"  # -> Secret provisioning-db-app
    assert postgres["spec"]["bootstrap"]["initdb"] == {"database": "provisioning", "owner": "provisioning"}


def test_overlays_pin_the_image_and_set_a_namespace() -> None:
    for tree in TREES[1:]:
        docs = render(K8S / tree)
        (namespace,) = by_kind(docs, "Namespace")
        for doc in docs:
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == namespace, f"{tree}: {doc['kind']}/{doc['metadata']['name']}"
        for deployment in workloads(docs).values():
            for container in containers(deployment):
                image = container["image"]
                assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), f"{tree}: {image}"
