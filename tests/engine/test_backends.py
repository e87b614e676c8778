"""Choosing a backend (acd_engine.backends.base): the choice is validated before any model loads,
``auto`` is torch, and every result says which backend ran. These run without the
[llamacpp] extra; the llama.cpp backend itself is tests/engine/test_llamacpp.py."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from acd_engine import Engine, get_engine
from acd_engine.backends.base import LlamaCppOptions, resolve_backend
from acd_engine.cli.main import app
from acd_engine.errors import ConfigError

BAD = "backend must be one of 'auto', 'torch' or 'llamacpp', got 'gpu'"


@pytest.mark.parametrize("make", [Engine, get_engine])
def test_an_unknown_backend_is_refused_before_loading(make, monkeypatch):
    import acd_engine.runtime.engine as engine_module

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(engine_module, "load_model", no_loading)
    with pytest.raises(ConfigError, match=BAD):
        make(backend="gpu")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"model": "models/llama"},
            "backend 'llamacpp' needs a .gguf model file, got 'models/llama'",
        ),
        ({"device": "cuda"}, "device must be 'auto' or 'cpu' with backend 'llamacpp'"),
        ({"quantize": "int8"}, "quantize must be 'none' with backend 'llamacpp'"),
    ],
)
def test_llamacpp_refuses_what_it_cannot_run(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Engine(backend="llamacpp", **kwargs)


def test_auto_is_torch_and_results_say_so(tiny_engine):
    assert resolve_backend("auto", None, "auto") == "torch"
    assert resolve_backend("auto", "model.gguf", "cpu") == "torch"
    assert tiny_engine.backend_name == "torch" and tiny_engine.describe()["backend"] == "torch"
    out = tiny_engine.generate("Hi", method="plain", max_new_tokens=2)
    assert out.backend == "torch"
    assert [c for c in tiny_engine.stream_chunks("Hi", method="plain", max_new_tokens=2)]
    assert tiny_engine.pack_report(tiny_engine.defaults)["backend"] == "torch"


def test_llamacpp_options_are_validated():
    with pytest.raises(ConfigError, match="gate_on must be one of 'llamacpp' or 'engine'"):
        LlamaCppOptions(gate_on="gpu")
    with pytest.raises(ConfigError, match="threads must be >= 1, got 0"):
        LlamaCppOptions(threads=0)
    with pytest.raises(ConfigError, match="prefix_tokens must be >= 0, got -1"):
        LlamaCppOptions(prefix_tokens=-1)


def test_a_missing_extra_names_the_install_command(monkeypatch):
    """Without llama-cpp-python the engine says how to get it, in one line."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    with pytest.raises(ConfigError, match=r"backend 'llamacpp' needs llama-cpp-python: pip "):
        Engine(backend="llamacpp")


def test_the_cli_refuses_a_bad_backend_in_one_line():
    runner = CliRunner()
    for command in (["generate", "Hi"], ["compare", "Hi"], ["eval", "--methods", "plain"]):
        res = runner.invoke(app, [*command, "--backend", "gpu"])
        assert res.exit_code == 2, (command, res.output)
        assert res.stderr.strip() == f"error: {BAD}"
