"""The Python versions pyproject.toml claims are the ones the code runs on.

``requires-python`` is what pip reads; ruff's ``target-version`` and mypy's ``python_version``
decide which syntax and which standard-library names the linters accept (mypy checks the
stdlib against typeshed's stubs for that version). The three must agree, every module must
parse at the oldest claimed version, and no module may use a standard-library name newer than
it: ``typing.Self`` and ``typing.assert_never`` are why the floor is 3.11.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SOURCES = ("acd_engine", "acd_integrations", "examples", "scripts", "tests")

# Standard-library names newer than 3.10, by the version that added them: enough to say which
# Python a module needs (mypy, at the claimed version, catches the rest in the packages).
NEW_NAMES: dict[tuple[str, str], tuple[int, int]] = {
    **{
        ("typing", name): (3, 11)
        for name in (
            "Self",
            "assert_never",
            "assert_type",
            "LiteralString",
            "Never",
            "NotRequired",
            "Required",
            "reveal_type",
            "dataclass_transform",
            "TypeVarTuple",
            "Unpack",
            "clear_overloads",
            "get_overloads",
        )
    },
    ("datetime", "UTC"): (3, 11),
    ("enum", "StrEnum"): (3, 11),
    ("asyncio", "TaskGroup"): (3, 11),
    ("asyncio", "timeout"): (3, 11),
    ("tomllib", ""): (3, 11),
    ("wsgiref.types", ""): (3, 11),
    ("typing", "override"): (3, 12),
    ("typing", "TypeAliasType"): (3, 12),
    ("itertools", "batched"): (3, 12),
    ("typing", "ReadOnly"): (3, 13),
    ("typing", "TypeIs"): (3, 13),
    ("warnings", "deprecated"): (3, 13),
}


def claimed_minimum() -> tuple[int, int]:
    """The oldest Python ``requires-python`` admits (it must be a plain ``>=X.Y``)."""
    spec = SpecifierSet(PYPROJECT["project"]["requires-python"])
    floors = [Version(s.version) for s in spec if s.operator == ">="]
    assert len(floors) == 1, f"requires-python must have one >= floor, got '{spec}'"
    return floors[0].major, floors[0].minor


def python_files() -> list[Path]:
    files = [p for src in SOURCES for p in (REPO / src).rglob("*.py")]
    return sorted(p for p in files if "__pycache__" not in p.parts)


def needed_python(tree: ast.AST) -> tuple[tuple[int, int], str]:
    """The newest Python a module's standard-library names need, and the name that needs it."""
    need: tuple[tuple[int, int], str] = ((3, 0), "")
    for node in ast.walk(tree):
        found: list[tuple[str, str]] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.module, alias.name) for alias in node.names]
            found.append((node.module, ""))
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            found.append((node.value.id, node.attr))  # typing.Self, datetime.UTC, ...
        for key in found:
            version = NEW_NAMES.get(key)
            if version and version > need[0]:
                need = (version, ".".join(filter(None, key)))
    return need


def test_requires_python_ruff_and_mypy_make_one_claim():
    major, minor = claimed_minimum()
    assert PYPROJECT["tool"]["ruff"]["target-version"] == f"py{major}{minor}"
    assert PYPROJECT["tool"]["mypy"]["python_version"] == f"{major}.{minor}"


def test_this_interpreter_is_one_the_claim_admits():
    assert sys.version_info[:2] >= claimed_minimum()
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(
        f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    )


def test_every_module_parses_at_the_oldest_claimed_version():
    minimum = claimed_minimum()
    files = python_files()
    assert len(files) > 50
    for path in files:
        ast.parse(path.read_text(), filename=str(path), feature_version=minimum)


def test_no_module_uses_a_standard_library_name_newer_than_the_claim():
    minimum = claimed_minimum()
    too_new = {}
    for path in python_files():
        (version, name) = needed_python(ast.parse(path.read_text()))
        if version > minimum:
            too_new[str(path.relative_to(REPO))] = f"{name} needs {version}"
    assert not too_new, f"claimed {minimum}, but: {too_new}"


@pytest.mark.parametrize(
    ("source", "version", "name"),
    [
        ("from typing import Self", (3, 11), "typing.Self"),
        ("import typing\ndef f(x: int) -> typing.Never: typing.assert_never(x)", (3, 11), ""),
        ("import tomllib", (3, 11), "tomllib"),
        ("from itertools import batched", (3, 12), "itertools.batched"),
        ("from typing import Any, Sequence", (3, 0), ""),
    ],
)
def test_the_scan_reads_what_a_module_needs(source, version, name):
    need, found = needed_python(ast.parse(source))
    assert need == version
    assert found == name or not name


def test_the_parse_check_rejects_syntax_newer_than_it_is_asked_for():
    source = "try:\n    pass\nexcept* ValueError:\n    pass\n"  # 3.11's exception groups
    ast.parse(source, feature_version=(3, 11))
    with pytest.raises(SyntaxError, match=r"only supported in Python 3\.11"):
        ast.parse(source, feature_version=(3, 10))
