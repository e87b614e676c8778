"""The LangChain examples run offline, in-process, on the session's one default engine."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from langchain_core.messages import AIMessage, ToolMessage

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
pytestmark = pytest.mark.slow


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # LangGraph resolves the state's type hints through it
    spec.loader.exec_module(module)
    return module


def test_chain_streams_a_string(engine, capsys):
    text = _load("langchain_chain").main(max_tokens=8)
    assert isinstance(text, str) and text
    assert capsys.readouterr().out.strip() == text.strip()


def test_compare_answers_with_both_methods(engine, capsys):
    answers = _load("langchain_compare").main(max_tokens=8)
    assert set(answers) == {"plain", "acd"} and all(answers.values())
    out = capsys.readouterr().out
    assert "--- plain (alpha=0.0" in out and "--- acd (alpha=0.5" in out


def test_agent_calls_a_tool_then_answers(engine):
    pytest.importorskip("langgraph")
    messages = _load("langchain_agent").main(max_tokens=40)
    calls = [m for m in messages if isinstance(m, AIMessage) and m.tool_calls]
    results = [m for m in messages if isinstance(m, ToolMessage)]
    assert len(calls) == 1 and calls[0].tool_calls[0]["name"] in (
        "get_weather",
        "celsius_to_fahrenheit",
    )
    assert len(results) == 1 and results[0].tool_call_id == calls[0].tool_calls[0]["id"]
    assert isinstance(messages[-1], AIMessage) and messages[-1].text and not messages[-1].tool_calls
