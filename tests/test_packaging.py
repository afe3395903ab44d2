"""Packaging: what the package imports is declared, it runs on its declared Python floor, `import fastgen` stays
light, the distribution name is the one the docs install, and no dependency carries an exact upper pin."""

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ("fastgen", "pipelines", "train", "eval", "cli")
DISTRIBUTION = "fastgen-diffusion"
# Standard-library modules newer than the Python floor (3.10), and the backport each must fall back to.
NEWER_STDLIB = {"tomllib": "tomli"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)).lower()


def _sources():
    for folder in PACKAGE_DIRS:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _imports(tree: ast.AST):
    """``(top-level module, node)`` of every absolute import in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name.split(".")[0], node) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0], node


def test_every_third_party_import_is_a_declared_dependency():
    """Module-level imports need a dependency; imports inside a function (an optional feature, e.g. the wandb
    tracker) a dependency or an extra."""
    project = _project()
    declared = {_name(r) for r in project["dependencies"]}
    extras = {_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    to_dist = importlib.metadata.packages_distributions()
    missing = {}
    for path in _sources():
        for module, node in _imports(ast.parse(path.read_text())):
            if module in sys.stdlib_module_names or module in NEWER_STDLIB or module == "fastgen":
                continue
            dists = {_name(d) for d in to_dist.get(module, [module])}  # not installed here: the module's name
            if not dists & (declared if node.col_offset == 0 else declared | extras):
                missing.setdefault(module, str(path.relative_to(ROOT)))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_sources_run_on_the_python_floor():
    """Grammar of the floor, and stdlib modules newer than it only inside ``try`` with a declared backport."""
    floor = tuple(int(x) for x in re.search(r"(\d+)\.(\d+)", _project()["requires-python"]).groups())
    assert floor == (3, 10)
    declared = {_name(r): r for r in _project()["dependencies"]}
    for path in _sources():
        tree = ast.parse(path.read_text(), feature_version=floor)
        guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for s in t.body for n in ast.walk(s)}
        for module, node in _imports(tree):
            if module in NEWER_STDLIB:
                assert id(node) in guarded, f"{path}: `import {module}` fails on Python 3.10; guard it"
                backport = declared.get(NEWER_STDLIB[module], "")
                assert "python_version < '3.11'" in backport, f"{NEWER_STDLIB[module]} is not declared for 3.10"


def test_no_exact_upper_pins_and_the_distribution_name():
    project = _project()
    assert project["name"] == DISTRIBUTION
    for requirement in project["dependencies"]:
        assert "<=" not in requirement and "==" not in requirement, requirement
    assert importlib.metadata.version(DISTRIBUTION) == __import__("fastgen").__version__
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *_sources()]
    wrong = [str(p.relative_to(ROOT)) for p in docs
             if re.search(r"pip install (-U )?fastgen(\[|\s|$|`)|pypi\.org/project/fastgen/", p.read_text())]
    assert not wrong, f"these name the unrelated 'fastgen' distribution: {wrong}"


def test_import_fastgen_is_light_and_the_command_has_a_version():
    code = "import fastgen, sys; print(sorted(m for m in ('torch', 'diffusers', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
    out = subprocess.run([sys.executable, "-m", "fastgen.cli", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"fastgen {__import__('fastgen').__version__}", out
