"""The packages' imports point one way: no module imports, however indirectly, a module that
imports it.

Every import counts: at the top of a module, inside a function (the CLI's lazy imports) and
under ``if TYPE_CHECKING:``. A type-only back edge is still a cycle in the design: the part
that takes the whole ``Engine`` to read three of its attributes can reach everything the
engine reaches, and a newcomer cannot tell which way the arrows go. A part takes the narrow
thing it needs instead (``calls.CallEngine``, ``scoring.ScoringEngine``: Protocols the
engine satisfies).

One edge is not an import of anything: a submodule reading a name its own package's
``__init__`` defines itself (``from acd_engine import __version__``). Python runs that
``__init__`` before any of its submodules, and the name pulls nothing else in.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("acd_engine", "acd_integrations")


def modules_of(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """``{dotted name: file}`` for every module of ``packages`` under ``root``."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def own_names(tree: ast.Module) -> set[str]:
    """Names a module defines itself at its top level (not the ones it imports)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
    return names


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """``{module: modules of the packages it imports}``, every import statement counted."""
    modules = modules_of(root, packages)
    trees = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in modules.items()}

    def deepest(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, tree in trees.items():
        is_package = modules[name].name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [deepest(alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package, level - 1 up
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join([*package, base] if base else package)
                names = [alias.name for alias in node.names]
                if (
                    base in modules
                    and name.startswith(base + ".")
                    and modules[base].name == "__init__.py"
                    and set(names) <= own_names(trees[base])
                ):
                    continue  # a name the package's __init__ defines itself: no edge
                targets = [deepest(f"{base}.{n}") for n in names] or [deepest(base)]
            else:
                continue
            graph[name] |= {t for t in targets if t is not None and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None when it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_a_type_checking_or_lazy_back_edge_is_a_cycle(tmp_path):
    body = "from pkg.parts import run\n"
    for i, back in enumerate(
        [
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.engine import Engine\n",
            "def f():\n    from .engine import Engine\n",
            "import pkg.engine\n",
        ]
    ):
        root = _package(
            tmp_path / str(i),
            {"pkg/__init__.py": "", "pkg/engine.py": body, "pkg/parts.py": back},
        )
        cycle = find_cycle(import_graph(root, ("pkg",)))
        assert cycle is not None and set(cycle) == {"pkg.engine", "pkg.parts"}


def test_a_package_constant_is_no_edge_but_a_re_export_is(tmp_path):
    root = _package(
        tmp_path,
        {
            "pkg/__init__.py": '__version__ = "1"\nfrom pkg.engine import Engine\n',
            "pkg/engine.py": "from pkg.parts import run\nclass Engine: ...\n",
            "pkg/parts.py": "def run():\n    from pkg import __version__\n",
        },
    )
    assert find_cycle(import_graph(root, ("pkg",))) is None
    (root / "pkg/parts.py").write_text("def run():\n    from pkg import Engine\n")
    assert find_cycle(import_graph(root, ("pkg",))) == ["pkg", "pkg.engine", "pkg.parts", "pkg"]


def test_the_packages_have_no_import_cycle():
    graph = import_graph(REPO, PACKAGES)
    assert graph["acd_engine.runtime.engine"] >= {
        "acd_engine.runtime.calls",
        "acd_engine.runtime.scoring",
    }
    cycle = find_cycle(graph)
    assert cycle is None, (
        f"imports must not form a cycle, got {' -> '.join(cycle or [])}; let the lower "
        "module take a Protocol or the narrow thing it needs instead of importing back"
    )
