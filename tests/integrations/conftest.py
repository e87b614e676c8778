"""Fixtures shared by the integration tests (adapters, the request core, the server)."""

from __future__ import annotations

from typing import Any

import pytest


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
