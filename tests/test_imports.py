"""Every import is declared in pyproject.toml, and every module and script imports.

A package installed by hand (or pulled in by another package) would hide a missing declaration
on the developer's machine: the first test reads the declared requirements, not what happens to
be installed, so it fails wherever an undeclared import is added.
"""

import ast
import importlib
import importlib.metadata
import importlib.util
import pkgutil
import re
import sys
from pathlib import Path

import pytest

import diffusion_policy

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["diffusion_policy", "scripts", "tests", "train.py"]
# Our own top-level names: the package, the tests, and the scripts importing each other.
LOCAL = {"diffusion_policy", "tests"} | {p.stem for p in (REPO / "scripts").glob("*.py")}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_distributions(extras: tuple[str, ...] = ("dev",)) -> set[str]:
    """Distributions the package requires with ``extras`` (``diffusion_policy[x]`` followed)."""
    requirements = importlib.metadata.requires("diffusion_policy") or []
    active, declared, grew = set(extras), set(), True
    while grew:
        grew = False
        for req in requirements:
            name = _normalize(re.match(r"[A-Za-z0-9._-]+", req).group(0))
            extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", req)
            if extra and extra.group(1) not in active:
                continue
            nested = re.search(r"\[([^\]]+)\]", req)
            if name == "diffusion-policy" and nested:
                new = {e.strip() for e in nested.group(1).split(",")} - active
                active |= new
                grew |= bool(new)
            else:
                declared.add(name)
    return declared


def imported_top_level_names() -> dict[str, set[str]]:
    """``{top-level module: files importing it}`` over all sources, lazy imports included."""
    found: dict[str, set[str]] = {}
    files = [REPO / s for s in SOURCES if (REPO / s).is_file()]
    files += [p for s in SOURCES if (REPO / s).is_dir() for p in (REPO / s).rglob("*.py")]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


def test_every_third_party_import_is_declared():
    declared = declared_distributions()
    providers = importlib.metadata.packages_distributions()
    undeclared = {}
    for module, files in sorted(imported_top_level_names().items()):
        if module in LOCAL or module in sys.stdlib_module_names:
            continue
        dists = {_normalize(d) for d in providers.get(module, [])}
        if not dists & declared:
            undeclared[module] = (sorted(dists) or ["not installed"], sorted(files)[:3])
    assert not undeclared, (
        "imports not declared in pyproject.toml (core or the dev extra): "
        + "; ".join(f"{m} (from {d}) in {f}" for m, (d, f) in undeclared.items())
    )


def test_declared_reader_follows_extras():
    declared = declared_distributions()
    assert {"torch", "hydra-core", "pytest", "hydra-submitit-launcher"} <= declared
    assert "sqlalchemy" not in declared  # only in the sweep-db extra, which dev does not pull


PACKAGE_MODULES = sorted(
    m.name for m in pkgutil.walk_packages(diffusion_policy.__path__, prefix="diffusion_policy.")
)
SCRIPTS = sorted(p for p in (REPO / "scripts").glob("*.py"))


@pytest.mark.parametrize("module", PACKAGE_MODULES)
def test_package_module_imports(module):
    importlib.import_module(module)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_imports(script):
    spec = importlib.util.spec_from_file_location(f"_script_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the scripts run only under `if __name__ == "__main__"`
    assert hasattr(module, "main")
