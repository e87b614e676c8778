"""The process-wide model cache: in-memory models registered for engines to find."""

from __future__ import annotations

import shutil

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
