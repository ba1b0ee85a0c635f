"""The operators' CRDs as validators for the custom resources of deploy/k8s, and the check that the
subsets kept in deploy/k8s/crds agree with upstream.

Upstream: ``../shared/k8s-crds/`` beside the checkout holds the CRDs verbatim at the versions we target
(its README gives their provenance). When it is absent, the subsets in ``deploy/k8s/crds/`` stand in.

A CRD's ``openAPIV3Schema`` is validated with ``jsonschema`` (draft 7) as the API server validates a
custom resource under kubectl's default ``--validate=strict``:

- objects are closed (an unknown field is an error) unless ``x-kubernetes-preserve-unknown-fields``
  or ``additionalProperties`` say otherwise; the root ``metadata`` stays open (the API server checks
  ObjectMeta itself), and so do ``apiVersion``/``kind``/``metadata`` of an
  ``x-kubernetes-embedded-resource``;
- ``x-kubernetes-int-or-string`` accepts an integer or a string; ``nullable`` accepts null;
- ``x-kubernetes-list-type: set`` items are unique, ``map`` items are unique by their
  ``x-kubernetes-list-map-keys``;
- ``x-kubernetes-validations`` (CEL) rules are evaluated with the ``cel`` package (PyPI
  common-expression-language), except transition rules (``oldSelf``), which only apply to updates;
- ``x-kubernetes-map-type`` and ``x-kubernetes-list-type: atomic`` only say how apply merges: ignored;
- ``default`` is not applied and ``format`` is not checked (the API server checks only a few formats);
  ``metadata`` is left to the tests, which check it as ObjectMeta with kubernetes-validate.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cel
import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
SUBSETS = ROOT / "deploy/k8s/crds"
UPSTREAM = ROOT.parent / "shared" / "k8s-crds"
#: CRD name -> the upstream file of the version deploy/k8s targets (deploy/k8s/crds/README.md).
UPSTREAM_FILES = {
    "rabbitmqclusters.rabbitmq.com": "rabbitmq.com_rabbitmqclusters.v2.11.0.yaml",
    "clusters.postgresql.cnpg.io": "postgresql.cnpg.io_clusters.v1.24.1.yaml",
}

Doc = dict[str, Any]


#: libyaml's loader where PyYAML has it: the upstream CRDs are 5,000-6,000 lines each.
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_documents(path: Path) -> list[Doc]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=Loader) if doc]  # a safe loader


def subsets() -> dict[str, Doc]:
    """CRD name -> the subset kept in deploy/k8s/crds."""
    found = {}
    for path in sorted(SUBSETS.glob("*.yaml")):
        (crd,) = load_documents(path)
        found[crd["metadata"]["name"]] = crd
    return found


def upstream_present() -> bool:
    return all((UPSTREAM / name).is_file() for name in UPSTREAM_FILES.values())


@functools.cache
def _upstream(name: str) -> Doc:
    (crd,) = load_documents(UPSTREAM / UPSTREAM_FILES[name])
    return crd


def upstream() -> dict[str, Doc]:
    """CRD name -> the upstream CRD (``../shared/k8s-crds``, which must be present)."""
    return {name: _upstream(name) for name in UPSTREAM_FILES}


def in_use() -> tuple[str, dict[str, Doc]]:
    """('upstream' or 'subset', CRD name -> CRD): upstream when ../shared is present, else the subsets."""
    return ("upstream", upstream()) if upstream_present() else ("subset", subsets())


# --- schema -> validator -----------------------------------------------------------------------


def structural(schema: Any, root: bool = True) -> Any:
    """A CRD's openAPIV3Schema made into the JSON schema the API server effectively applies."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: structural(sub, root=False) if not (root and name == "metadata") else sub
                        for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = structural(value, root=False)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [structural(sub, root=False) for sub in value]
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in schema:
        out["type"] = [schema["type"], "null"]
    if schema.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if schema.get("x-kubernetes-embedded-resource"):
        out["properties"] = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                             "metadata": {"type": "object"}} | out.get("properties", {})
    is_object = schema.get("type") == "object" or "properties" in schema
    if is_object and "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _list_map_keys(
    validator: Any, keys: list[str], instance: Any, schema: Doc
) -> Iterator[jsonschema.ValidationError]:
    if not validator.is_type(instance, "array"):
        return
    seen = set()
    for item in instance:
        if isinstance(item, dict):
            key = tuple(repr(item.get(k)) for k in keys)
            if key in seen:
                duplicate = dict(zip(keys, key, strict=True))
                yield jsonschema.ValidationError(f"duplicate entry for list-map keys {duplicate}")
            seen.add(key)


def _cel_validations(
    validator: Any, rules: list[Doc], instance: Any, schema: Doc
) -> Iterator[jsonschema.ValidationError]:
    for rule in rules:
        if "oldSelf" in rule["rule"]:
            continue  # a transition rule: only evaluated on updates
        try:
            passed = cel.evaluate(rule["rule"], {"self": instance})
        except Exception as error:  # a rule that cannot be evaluated fails the check rather than pass it
            yield jsonschema.ValidationError(f"CEL rule {rule['rule']!r} could not be evaluated: {error}")
            continue
        if passed is not True:
            yield jsonschema.ValidationError(rule.get("message") or f"failed CEL rule {rule['rule']!r}")


Validator = jsonschema.validators.extend(jsonschema.Draft7Validator, {
    "x-kubernetes-list-map-keys": _list_map_keys,
    "x-kubernetes-validations": _cel_validations,
})


def validators(crds: dict[str, Doc]) -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> validator of every served version of these CRDs."""
    found = {}
    for crd in crds.values():
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                api_version = f"{crd['spec']['group']}/{version['name']}"
                schema = structural(version["schema"]["openAPIV3Schema"])
                Validator.check_schema(schema)
                found[(api_version, crd["spec"]["names"]["kind"])] = Validator(schema)
    return found


# --- subset agreement --------------------------------------------------------------------------

#: What a subset may leave out of a schema node that upstream has: documentation, and properties.
MAY_OMIT = {"description", "properties"}


def disagreements(subset: Any, upstream: Any, path: str = "") -> Iterator[str]:
    """Where a subset schema node is not upstream's node pruned of properties and descriptions: every
    keyword it declares (type, enum, pattern, maxLength, required, x-kubernetes-*, ...) must be
    upstream's at the same path, and every keyword upstream declares must be there (but
    ``description`` and ``properties``), so that a subset is never looser or stricter than upstream
    on what it keeps."""
    if not isinstance(subset, dict) or not isinstance(upstream, dict):
        if subset != upstream:
            yield f"{path or '/'}: {subset!r} where upstream has {upstream!r}"
        return
    for key in upstream.keys() - subset.keys() - MAY_OMIT:
        yield f"{path}/{key}: missing; upstream has {upstream[key]!r:.200}"
    for key, value in subset.items():
        here = f"{path}/{key}"
        if key == "description":
            continue
        if key not in upstream:
            yield f"{here}: {value!r:.200} is not in upstream"
        elif key == "properties":
            for name, sub in value.items():
                if name not in upstream[key]:
                    yield f"{here}/{name}: no such property upstream"
                else:
                    yield from disagreements(sub, upstream[key][name], f"{here}/{name}")
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            yield from disagreements(value, upstream[key], here)
        elif key in ("anyOf", "allOf", "oneOf") and isinstance(value, list):
            if len(value) != len(upstream[key]):
                yield f"{here}: {len(value)} branches where upstream has {len(upstream[key])}"
            else:
                for n, (mine, theirs) in enumerate(zip(value, upstream[key], strict=True)):
                    yield from disagreements(mine, theirs, f"{here}/{n}")
        elif value != upstream[key]:
            yield f"{here}: {value!r:.200} where upstream has {upstream[key]!r:.200}"
    for name in subset.get("required", []):
        if name not in subset.get("properties", {}):
            yield f"{path}/required: {name} is required upstream but the subset drops it"


def crd_disagreements(subset: Doc, upstream: Doc) -> Iterator[str]:
    """Where a subset CRD does not agree with the upstream CRD: its identity (group, names, scope,
    versions, subresources) and every version's schema."""
    for key in ("group", "scope"):
        if subset["spec"][key] != upstream["spec"][key]:
            yield f"spec.{key}: {subset['spec'][key]!r} where upstream has {upstream['spec'][key]!r}"
    for key, value in subset["spec"]["names"].items():
        if upstream["spec"]["names"].get(key) != value:
            yield f"spec.names.{key}: {value!r} where upstream has {upstream['spec']['names'].get(key)!r}"
    theirs = {v["name"]: v for v in upstream["spec"]["versions"]}
    for version in subset["spec"]["versions"]:
        if version["name"] not in theirs:
            yield f"version {version['name']}: not upstream"
            continue
        for key in ("served", "storage", "subresources"):
            if version.get(key) != theirs[version["name"]].get(key):
                yield f"version {version['name']}: {key} {version.get(key)!r} where upstream has " \
                      f"{theirs[version['name']].get(key)!r}"
        yield from disagreements(version["schema"]["openAPIV3Schema"],
                                 theirs[version["name"]]["schema"]["openAPIV3Schema"], version["name"])


# --- the subsets' derivation -------------------------------------------------------------------

#: The properties each subset keeps (dotted paths from the root of openAPIV3Schema; a kept property
#: keeps its whole subtree): what deploy/k8s uses and a few close neighbours. When a manifest needs
#: another field, add its path here and regenerate (``python -m tests.deploy.crds``).
KEEP = {
    "rabbitmqclusters.rabbitmq.com": [
        "apiVersion", "kind", "metadata",
        "spec.replicas", "spec.image", "spec.imagePullSecrets", "spec.service", "spec.persistence",
        "spec.resources", "spec.affinity", "spec.tolerations", "spec.rabbitmq", "spec.tls",
        "spec.terminationGracePeriodSeconds", "spec.skipPostDeploySteps", "spec.delayStartSeconds",
    ],
    "clusters.postgresql.cnpg.io": [
        "apiVersion", "kind", "metadata",
        "spec.description", "spec.instances", "spec.imageName", "spec.primaryUpdateStrategy",
        "spec.primaryUpdateMethod", "spec.enableSuperuserAccess", "spec.minSyncReplicas",
        "spec.maxSyncReplicas", "spec.startDelay", "spec.stopDelay", "spec.smartShutdownTimeout",
        "spec.switchoverDelay", "spec.bootstrap.initdb", "spec.postgresql.parameters",
        "spec.postgresql.pg_hba", "spec.postgresql.shared_preload_libraries", "spec.storage",
        "spec.walStorage", "spec.resources", "spec.affinity", "spec.monitoring",
    ],
}

HEADER = """\
# SUBSET of the {kind} CRD ({group}/{version}) of {project} {tag}: upstream's CRD
# ({file} in shared/k8s-crds/ beside the checkout) pruned to the properties listed in
# tests/deploy/crds.py (KEEP), without descriptions; every other keyword is upstream's. Generated by
# `python -m tests.deploy.crds`: do not edit by hand. Not for installing (the operator installs the real
# CRD). tests/deploy validates with it only when ../shared is absent, and checks that it agrees with
# upstream when ../shared is present.
"""
PROJECTS = {"rabbitmqclusters.rabbitmq.com": "RabbitMQ Cluster Operator",
            "clusters.postgresql.cnpg.io": "CloudNativePG"}


def _strip_descriptions(schema: Any) -> Any:
    """A schema node without its ``description`` keywords (a property named description stays)."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "description":
            continue
        if key == "properties":
            out[key] = {name: _strip_descriptions(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _strip_descriptions(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [_strip_descriptions(sub) for sub in value]
        else:
            out[key] = value
    return out


def prune(schema: Doc, paths: list[str]) -> Doc:
    """``schema`` with only the properties on ``paths`` (and their ancestors), without descriptions."""
    kept = _strip_descriptions({k: v for k, v in schema.items() if k != "properties"})
    children: dict[str, list[str]] = {}
    for path in paths:
        head, _, rest = path.partition(".")
        children.setdefault(head, [])
        if rest:
            children[head].append(rest)
    missing = set(schema.get("required", [])) - set(children)
    if missing:
        raise ValueError(f"upstream requires {sorted(missing)}: keep them")
    if children:
        kept["properties"] = {}
        for name, rest in children.items():
            sub = schema["properties"][name]  # KeyError: no such property upstream
            kept["properties"][name] = prune(sub, rest) if rest else _strip_descriptions(sub)
    return kept


def derive(upstream_crd: Doc, paths: list[str]) -> Doc:
    crd = copy.deepcopy(upstream_crd)
    crd["metadata"] = {"name": upstream_crd["metadata"]["name"],
                       "annotations": {"upstream-file": UPSTREAM_FILES[upstream_crd["metadata"]["name"]]}}
    for version in crd["spec"]["versions"]:
        version["schema"]["openAPIV3Schema"] = prune(version["schema"]["openAPIV3Schema"], paths)
        version.pop("additionalPrinterColumns", None)
    crd.pop("status", None)
    return crd


def render_subset(name: str) -> str:
    crd = derive(_upstream(name), KEEP[name])
    version = crd["spec"]["versions"][0]["name"]
    tag = UPSTREAM_FILES[name].rsplit(".v", 1)[1].removesuffix(".yaml")
    header = HEADER.format(kind=crd["spec"]["names"]["kind"], group=crd["spec"]["group"], version=version,
                           project=PROJECTS[name], tag=f"v{tag}", file=UPSTREAM_FILES[name])
    return header + yaml.safe_dump(crd, sort_keys=False, width=120)


def subset_path(name: str) -> Path:
    return SUBSETS / f"{UPSTREAM_FILES[name].rsplit('.v', 1)[0]}.yaml"


if __name__ == "__main__":
    if not upstream_present():
        raise SystemExit(f"{UPSTREAM} is not there: the subsets are derived from it")
    for crd_name in UPSTREAM_FILES:
        subset_path(crd_name).write_text(render_subset(crd_name))
        print(subset_path(crd_name))
