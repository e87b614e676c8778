"""Fixtures shared by the integration tests (adapters, the request core, the server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture()
def fresh_tiny_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny random model under a path of its own (links to its files): front ends that
    share engines through ``get_engine`` get a new engine for it, so a test can watch what
    an engine does once (its no-pack warning) whatever ran before."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    for item in tiny_model_dir.iterdir():
        (folder / item.name).symlink_to(item)
    return folder


@pytest.fixture()
def weather_tool() -> dict[str, Any]:
    """An OpenAI-style function tool with one required string argument.

    A fresh dict per test, so a test that edits its copy cannot change another's.
    """
    return {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather at a location.",
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string"}},
                "required": ["location"],
            },
        },
    }
