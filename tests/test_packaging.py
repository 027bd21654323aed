"""The tested environment: constraints.txt pins every dependency at a version pyproject.toml allows."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, ver = line.partition("==")
            assert ver, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = Version(ver)
    return pins


def test_constraints_pin_every_dependency_within_its_bounds():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in meta["dependencies"]]
    reqs += [Requirement(r) for extra in meta["optional-dependencies"].values() for r in extra]
    pins = _pins()
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} has no exact version in constraints.txt"
        assert req.specifier.contains(pins[name]), f"constraints.txt pins {req.name}=={pins[name]}, outside {req}"
        for extra in req.extras:  # e.g. dask[distributed]
            assert canonicalize_name(extra) in pins, f"{req.name}[{extra}] is not pinned"


def test_ci_and_readme_install_the_tested_versions():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -c constraints.txt '.[test]'" in ci
    quick = (ROOT / "README.md").read_text().split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [c for c in quick.strip().splitlines() if c.strip()]
    assert len(commands) == 2 and all(c.startswith("pip install -c constraints.txt ") for c in commands), commands
    assert commands[1].split("&&", 1)[1].strip() in ci  # .ci/run runs the README's test command
