"""What pyproject.toml declares is what the code needs, what the README says and what `make test-floor` installs."""

from __future__ import annotations

import ast
import importlib
import re
import tomllib
from importlib.metadata import version

from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
COMPAT = "airflow.providers.common.compat"


def floors() -> dict[str, Version]:
    """``{distribution: lowest version}`` from the ``>=`` bound of every runtime dependency."""
    found = {}
    for line in PROJECT["dependencies"]:
        req = Requirement(line)
        [bound] = [spec.version for spec in req.specifier if spec.operator == ">="]
        found[req.name] = Version(bound)
    return found


def compat_imports() -> set[tuple[str, str]]:
    """Every ``(module, name)`` the package imports from common-compat, type-checking-only imports too."""
    found = set()
    for path in (ROOT / "airflow_provider_speedpix").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(COMPAT):
                found.update((node.module, alias.name) for alias in node.names)
    return found


def test_every_common_compat_name_exists_in_the_installed_release():
    imports = compat_imports()
    assert ("airflow.providers.common.compat.sdk", "mask_secret") in imports  # the scan sees the package
    missing = sorted(
        f"{module}.{name}" for module, name in imports if not hasattr(importlib.import_module(module), name)
    )
    installed = version("apache-airflow-providers-common-compat")
    assert missing == [], f"common-compat {installed} lacks {missing}: raise its floor in pyproject.toml"


def test_installed_versions_satisfy_the_declared_floors():
    too_old = {name: version(name) for name, floor in floors().items() if Version(version(name)) < floor}
    assert too_old == {}, f"installed below the declared floor: {too_old}"
    assert {"apache-airflow", "apache-airflow-providers-common-compat"} <= floors().keys()


def test_readme_states_the_declared_python_and_airflow_floors():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    python = re.fullmatch(r">=(\d+\.\d+)", PROJECT["requires-python"]).group(1)
    airflow = floors()["apache-airflow"]
    install = next(line for line in readme.splitlines() if line.startswith("pip install airflow-provider"))
    assert f"apache-airflow>={airflow.major}.{airflow.minor}" in install, install
    assert f"Python {python}+" in install, install
    assert f"Python {python}+" in readme.split("## Install")[0], "the Quickstart names another Python"


def test_make_test_floor_installs_exactly_the_declared_floors():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    pins = re.search(r"^FLOOR_PINS :=((?:.*\\\n)*.*)$", makefile, re.M).group(1)
    pinned = dict(re.findall(r"([A-Za-z0-9_.-]+)==(\S+)", pins))
    assert {name: Version(v) for name, v in pinned.items()} == floors()
    python = PROJECT["requires-python"].removeprefix(">=")
    assert re.search(rf"^FLOOR_PYTHON \?= python{re.escape(python)}$", makefile, re.M)
