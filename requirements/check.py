"""Run by the Makefile after installing requirements/test.txt: fails, naming what is missing, when
pyproject.toml asks for a dependency (runtime or the test extra) that the lock does not satisfy, i.e.
when someone changed the dependencies and did not run `make lock`. Standard library and packaging
(which the lock always carries, through pytest) only."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution, version

from packaging.requirements import Requirement

PROJECT = "iot-provisioning"


def unmet() -> list[str]:
    problems = []
    for line in distribution(PROJECT).requires or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": "test"}):
            continue
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            problems.append(f"{requirement}: not in the lock")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            problems.append(f"{requirement}: the lock has {installed}")
    return problems


if __name__ == "__main__":
    if problems := unmet():
        print("requirements/test.txt does not satisfy pyproject.toml; run `make lock`:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        sys.exit(1)
