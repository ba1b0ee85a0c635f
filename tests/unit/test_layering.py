"""Layering: every service imports only itself and the libraries; the libraries and bench/ import no service.

Read from the source (``ast``), so an import inside a function or behind a ``try`` counts as much as one at
the top. What a service shares with another belongs in ``libs/common`` (provisioning_common); ``devstack``
runs services as processes (``python -m <service>``), it never imports them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = sorted(p.parent.name for p in (ROOT / "services").glob("*/__init__.py"))
LIBRARIES = {
    "provisioning_common": ROOT / "libs/common/provisioning_common",
    "devstack": ROOT / "libs/devstack/devstack",
}


def _modules(package_dir: Path) -> Iterator[Path]:
    yield from sorted(p for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts)


def imported_packages(path: Path, package: str | None) -> set[str]:
    """The top-level packages ``path`` imports (relative imports resolve to ``package`` itself)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from ..y import z: inside the importing package
                if package is not None:
                    found.add(package)
            elif node.module:
                found.add(node.module.split(".")[0])
    return found


def _violations(package_dir: Path, package: str | None, forbidden: set[str], root: Path = ROOT) -> list[str]:
    return [
        f"{path.relative_to(root)} imports {name}"
        for path in _modules(package_dir)
        for name in sorted(imported_packages(path, package) & forbidden)
    ]


def test_the_packages_are_found() -> None:
    assert {"admin_api", "broker_auth", "mqtt_bridge", "mqtt_gateway", "provisioning_core"} <= set(SERVICES)
    assert all(directory.is_dir() for directory in LIBRARIES.values())


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_imports_no_other_service(service: str) -> None:
    assert _violations(ROOT / "services" / service, service, set(SERVICES) - {service}) == []


@pytest.mark.parametrize("library", sorted(LIBRARIES))
def test_libraries_import_no_service(library: str) -> None:
    assert _violations(LIBRARIES[library], library, set(SERVICES)) == []


def test_bench_imports_no_service_and_leaves_sys_path_alone() -> None:
    """bench/ uses the installed libraries (pip install -e .), never a service's code or a path edit."""
    assert _violations(ROOT / "bench", None, set(SERVICES)) == []
    for path in _modules(ROOT / "bench"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name):
                assert node.value.id != "sys", f"{path.relative_to(ROOT)}:{node.lineno} touches sys.path"


# --- the checker itself -------------------------------------------------------------------------------------


def test_the_checker_sees_every_kind_of_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "import os.path\n"
        "from mqtt_bridge.topics import route\n"
        "from . import sibling\n"
        "def f():\n"
        "    import broker_auth\n"
        "try:\n"
        "    from admin_api import app\n"
        "except ImportError:\n"
        "    pass\n"
    )
    assert imported_packages(module, "mqtt_gateway") == {"os", "mqtt_bridge", "mqtt_gateway", "broker_auth",
                                                          "admin_api"}
    assert imported_packages(module, None) == {"os", "mqtt_bridge", "broker_auth", "admin_api"}
    assert _violations(tmp_path, "mqtt_gateway", {"mqtt_bridge", "broker_auth", "mqtt_gateway"}, tmp_path) == [
        "m.py imports broker_auth", "m.py imports mqtt_bridge", "m.py imports mqtt_gateway",
    ]
