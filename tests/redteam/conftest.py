"""Load the recipe's modules by path: ``redteam/`` is not an installed package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REDTEAM = Path(__file__).resolve().parents[2] / "redteam"


def load_redteam_module(name: str) -> ModuleType:
    """Import ``redteam/<name>.py`` as ``redteam_<name>`` (once per session)."""
    key = f"redteam_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, REDTEAM / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def summarise() -> ModuleType:
    return load_redteam_module("summarise")


@pytest.fixture(scope="session")
def garak_config() -> ModuleType:
    return load_redteam_module("garak_config")


@pytest.fixture(scope="session")
def control() -> ModuleType:
    return load_redteam_module("control")
