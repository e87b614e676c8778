"""The process-wide model cache: in-memory models registered for engines to find."""

from __future__ import annotations

import shutil

import pytest

from acd_engine.config import ModelConfig
from acd_engine.loading import LoadedModel, load_model, register_model


def test_a_registered_in_memory_model_is_what_load_model_returns(tiny_model_dir, tmp_path):
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder / "config.json")
    real = load_model(ModelConfig(model=str(tiny_model_dir)))
    registered = LoadedModel(
        real.model, real.tokenizer, "in-memory", str(folder), real.device, real.dtype
    )
    register_model(registered)
    assert load_model(ModelConfig(model=str(folder), device="cpu")) is registered


def test_device_map_auto_loads_on_cpu_and_engines_use_it(tiny_model_dir, tiny_engine, tmp_path):
    """`--device-map auto` on a machine without a GPU: everything maps to the CPU, and an
    engine built afterwards for the same model runs on that very model, with the same
    greedy tokens as a plainly loaded copy."""
    import torch

    from acd_engine import Engine

    copy = tmp_path / "mapped"
    shutil.copytree(tiny_model_dir, copy)
    mapped = load_model(ModelConfig(model=str(copy), device="cpu"), device_map="auto")
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only mapping; this machine has a GPU")
    assert {p.device.type for p in mapped.model.parameters()} == {"cpu"}
    assert mapped.device == torch.device("cpu")
    engine = Engine(copy, device="cpu")
    assert engine.model is mapped.model
    out = engine.generate("Hi", method="plain", max_new_tokens=6)
    assert out.token_ids == tiny_engine.generate("Hi", method="plain", max_new_tokens=6).token_ids
