"""What the package imports is what pyproject.toml declares: a module that only arrives as another
package's dependency (PyYAML through omegaconf) breaks the day that package drops it."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions

import pytest

from tests.conftest import ROOT

tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")


def _name(requirement: str) -> str:
    """The distribution's normalised name (PEP 503) from a requirement such as `torch-fidelity>=0.4`."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()


def _imported_top_level_modules() -> set[str]:
    found = set()
    for path in (ROOT / "src" / "act_lightning").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"act_lightning"}


def test_every_module_the_package_imports_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    providers = packages_distributions()
    missing = {}
    for module in sorted(_imported_top_level_modules()):
        names = {_name(d) for d in providers.get(module, [])}
        assert names, f"{module} is imported by the package but installed by no distribution here"
        if not names & declared:
            missing[module] = sorted(names)
    assert not missing, f"imported but not in pyproject.toml's dependencies: {missing}"
    assert "yaml" in _imported_top_level_modules()  # act-report's reading of the .hydra records


def test_what_only_the_tests_use_is_a_dev_dependency_not_the_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "scipy" not in {_name(r) for r in project["dependencies"]}
    assert "scipy" in {_name(r) for r in project["optional-dependencies"]["dev"]}
    assert "scipy" not in _imported_top_level_modules()
