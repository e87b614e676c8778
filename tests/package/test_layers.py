"""The folders of ``acd_engine`` are layers, and imports point down them.

A newcomer reads the architecture from the folder names: the top-level modules are the
vocabulary every part shares (options, errors, the method registry, chat rendering); then
model loading, safety (contrast, packs, the gate), the backends that run the forwards, the
runtime (the engine and its one request path), evaluation and training, and the command
line at the top. A module may import its own layer and the layers below it, never one above,
so each folder can be read, tested and changed knowing only what is under it.
``acd_engine/__init__.py`` is the public façade and re-exports from every layer.
"""

from __future__ import annotations

from pathlib import Path

from test_import_cycles import _package, import_graph

REPO = Path(__file__).resolve().parents[2]

# Bottom to top; "top" is the modules directly in the package folder.
LAYERS = ("top", "loading", "safety", "backends", "runtime", "eval", "training", "cli")


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name; None for the package's façade ``__init__``."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    return parts[1] if parts[1] in LAYERS else "top"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every ``a -> b`` where ``b`` sits in a higher layer than ``a``."""
    found = []
    for module, targets in sorted(graph.items()):
        here = layer_of(module)
        if here is None:
            continue
        for target in sorted(targets):
            there = layer_of(target)
            if there is not None and LAYERS.index(there) > LAYERS.index(here):
                found.append(f"{module} ({here}) -> {target} ({there})")
    return found


def test_a_lower_layer_importing_a_higher_one_is_caught(tmp_path):
    root = _package(
        tmp_path,
        {
            "acd_engine/__init__.py": "from acd_engine.runtime.engine import Engine\n",
            "acd_engine/config.py": "",
            "acd_engine/safety/__init__.py": "",
            "acd_engine/safety/gate.py": "from acd_engine.config import X\n",
            "acd_engine/runtime/__init__.py": "",
            "acd_engine/runtime/engine.py": "from acd_engine.safety.gate import G\n",
        },
    )
    assert upward_imports(import_graph(root, ("acd_engine",))) == []  # the façade may
    (root / "acd_engine/safety/gate.py").write_text(
        "def f():\n    from acd_engine.runtime.engine import Engine\n"
    )
    assert upward_imports(import_graph(root, ("acd_engine",))) == [
        "acd_engine.safety.gate (safety) -> acd_engine.runtime.engine (runtime)"
    ]


def test_every_folder_is_a_layer_and_the_layers_are_all_used():
    folders = {p.name for p in (REPO / "acd_engine").iterdir() if (p / "__init__.py").is_file()}
    assert folders == set(LAYERS) - {"top"}, "a new folder needs its place in LAYERS"


def test_imports_point_down_the_layers():
    upward = upward_imports(import_graph(REPO, ("acd_engine",)))
    assert upward == [], (
        "a module imports a higher layer (docs/architecture.md, 'The layers'): " + "; ".join(upward)
    )
