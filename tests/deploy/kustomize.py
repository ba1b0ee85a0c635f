"""A small kustomize for the tests: renders deploy/k8s without the kustomize binary.

Supports exactly what deploy/k8s uses, and refuses anything else (so an overlay using a new
feature fails here instead of rendering wrongly): ``resources`` (files and directories),
``namespace``, ``images``, ``replicas``, and ``patches`` (strategic-merge documents, from a file or
inline, targeted by their own kind and name or by ``target``; or JSON 6902 operations with a
``target``). When ``kubectl`` is installed, the tests also compare this rendering with
``kubectl kustomize``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "replicas", "patches"}
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
                  "PersistentVolume", "StorageClass", "PriorityClass", "IngressClass"}
REPLICATED = {"Deployment", "StatefulSet", "ReplicaSet", "ReplicationController"}

Doc = dict[str, Any]


class KustomizeError(ValueError):
    pass


def load_documents(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render(directory: Path) -> list[Doc]:
    """The resources of the kustomization in ``directory``, transformed as kustomize would."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{directory}: unsupported kustomization fields {sorted(unknown)}")
    docs: list[Doc] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        docs += render(path) if path.is_dir() else load_documents(path)
    for patch in spec.get("patches", []):
        _apply_patch(docs, patch, directory)
    if "namespace" in spec:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = spec["namespace"]
    for image in spec.get("images", []):
        for container in _containers(docs):
            _set_image(container, image)
    for replicas in spec.get("replicas", []):
        matched = [d for d in docs if d["kind"] in REPLICATED and d["metadata"]["name"] == replicas["name"]]
        if not matched:
            raise KustomizeError(f"replicas: no workload named {replicas['name']}")
        for doc in matched:
            doc["spec"]["replicas"] = replicas["count"]
    return docs


def _containers(docs: list[Doc]) -> list[Doc]:
    found = []
    for doc in docs:
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        found += pod.get("containers", []) + pod.get("initContainers", [])
    return found


def _set_image(container: Doc, image: Doc) -> None:
    current = container.get("image", "")
    name = current.split("@")[0]
    if ":" in name.rsplit("/", 1)[-1]:
        name = name.rsplit(":", 1)[0]
    if name != image["name"]:
        return
    new = image.get("newName", name)
    if "digest" in image:
        container["image"] = f"{new}@{image['digest']}"
    elif "newTag" in image:
        container["image"] = f"{new}:{image['newTag']}"
    else:
        container["image"] = new + current[len(name):]


def _matches(doc: Doc, target: Doc) -> bool:
    unknown = set(target) - {"kind", "name", "group", "version"}
    if unknown:
        raise KustomizeError(f"unsupported patch target selectors {sorted(unknown)}")
    group, _, version = doc["apiVersion"].rpartition("/")
    return (target.get("kind", doc["kind"]) == doc["kind"]
            and target.get("name", doc["metadata"]["name"]) == doc["metadata"]["name"]
            and target.get("group", group) == group
            and target.get("version", version) == version)


def _apply_patch(docs: list[Doc], patch: Doc, directory: Path) -> None:
    if set(patch) - {"path", "patch", "target"}:
        raise KustomizeError(f"unsupported patch fields {sorted(set(patch) - {'path', 'patch', 'target'})}")
    text = (directory / patch["path"]).read_text() if "path" in patch else patch["patch"]
    body = yaml.safe_load(text)
    if isinstance(body, list):  # JSON 6902 operations
        if "target" not in patch:
            raise KustomizeError("a JSON 6902 patch needs a target")
        targets = [d for d in docs if _matches(d, patch["target"])]
        for doc in targets:
            for op in body:
                _json6902(doc, op)
    else:  # strategic merge
        target = patch.get("target") or {"kind": body["kind"], "name": body["metadata"]["name"]}
        targets = [d for d in docs if _matches(d, target)]
        for doc in targets:
            merged = strategic_merge(doc, {k: v for k, v in body.items() if k not in ("apiVersion", "kind")}
                                     | {"metadata": {**body.get("metadata", {}), "name": doc["metadata"]["name"]}})
            doc.clear()
            doc.update(merged)
    if not targets:
        raise KustomizeError(f"patch {patch.get('path', '(inline)')} matches no resource")


def strategic_merge(base: Any, patch: Any) -> Any:
    """Maps merge key by key (``null`` deletes); lists of named objects merge by ``name``; other lists replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = strategic_merge(base.get(key), value) if key in base else copy.deepcopy(value)
        return merged
    if (isinstance(base, list) and isinstance(patch, list) and base and patch
            and all(isinstance(i, dict) and "name" in i for i in base + patch)):
        merged_list = copy.deepcopy(base)
        index = {item["name"]: n for n, item in enumerate(merged_list)}
        for item in patch:
            if item["name"] in index:
                merged_list[index[item["name"]]] = strategic_merge(merged_list[index[item["name"]]], item)
            else:
                merged_list.append(copy.deepcopy(item))
        return merged_list
    return copy.deepcopy(patch)


def _json6902(doc: Doc, op: Doc) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    parent: Any = doc
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    kind = op["op"]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if kind == "add":
            parent.insert(index, copy.deepcopy(op["value"]))
        elif kind == "replace":
            parent[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[index]
        else:
            raise KustomizeError(f"unsupported JSON 6902 op {kind}")
        return
    if kind in ("replace", "remove") and last not in parent:
        raise KustomizeError(f"JSON 6902 {kind}: {op['path']} does not exist")
    if kind in ("add", "replace"):
        parent[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del parent[last]
    else:
        raise KustomizeError(f"unsupported JSON 6902 op {kind}")
