"""The packages stay typed: at most a handful of ``# type: ignore``, and mypy says when one
is no longer needed.

An ignore hides every error on its line, the ones that come later too, so each is a place
where the type checker stopped helping. The few left are where a library's own typing is
wrong for a documented use (pydantic's ``@computed_field`` over ``@property``); everything
else is typed with a cast that says why, a Protocol or a ``Literal`` check.
"""

from __future__ import annotations

import io
import re
import tokenize
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("acd_engine", "acd_integrations")
MAX_IGNORES = 5
IGNORE = re.compile(r"#\s*type:\s*ignore\b")


def type_ignores(source: str) -> list[int]:
    """Lines of ``source`` whose comments hold a ``type: ignore`` (strings don't count)."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return [t.start[0] for t in tokens if t.type == tokenize.COMMENT and IGNORE.search(t.string)]


def test_the_counter_sees_comments_and_only_comments():
    source = 'x = f()  # type: ignore[arg-type]\ny = "# type: ignore"\nz = 1  #type:ignore\n'
    assert type_ignores(source) == [1, 3]


def test_the_packages_hold_at_most_a_few_type_ignores():
    found = [
        f"{path.relative_to(REPO)}:{line}"
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        for line in type_ignores(path.read_text(encoding="utf-8"))
    ]
    assert len(found) <= MAX_IGNORES, (
        f"the packages must hold at most {MAX_IGNORES} '# type: ignore', got {len(found)}: "
        f"{', '.join(found)}; type the code instead (a cast that says why, a Protocol, a "
        "Literal check)"
    )


def test_mypy_warns_about_unused_ignores():
    mypy = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mypy"]
    assert mypy.get("warn_unused_ignores") is True
