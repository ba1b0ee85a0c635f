"""deploy/k8s rendered by ``kubectl kustomize`` (the kustomize built into kubectl), as ``kubectl apply -k``
would send it. Without kubectl on the PATH the tests that need a rendering skip, saying so."""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy/k8s"
KUBECTL = shutil.which("kubectl")
NO_KUBECTL = "kubectl is not on the PATH: deploy/k8s is rendered with `kubectl kustomize` (install kubectl to check it)"

Doc = dict[str, Any]


@functools.cache
def _render(directory: Path) -> tuple[Doc, ...]:
    result = subprocess.run([KUBECTL or "kubectl", "kustomize", str(directory)],
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(directory: Path) -> list[Doc]:
    """The resources of the kustomization in ``directory`` (a fresh copy each call: tests may change them)."""
    if KUBECTL is None:
        pytest.skip(NO_KUBECTL)
    return copy.deepcopy(list(_render(directory.resolve())))
