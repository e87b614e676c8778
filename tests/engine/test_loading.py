"""The process-wide model cache: in-memory models registered for engines to find."""

from __future__ import annotations

import logging
import re
import shutil

import pytest

from acd_engine.config import ModelConfig
from acd_engine.loading.models import LoadedModel, load_model, register_model


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


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_keep_layers_front_end_embeds_and_gates_like_the_full_model_but_never_decodes(
    tiny_model_dir, tiny_engine
):
    """A front end for llama.cpp (``keep_layers``) holds only the first layers, yet its
    branch embeddings and gate verdicts equal the full model's; decoding is refused."""
    import dataclasses

    import torch

    from acd_engine import DecodingConfig, Engine
    from acd_engine.errors import ConfigError, PromptPackError
    from acd_engine.safety.gate import SafetyGate

    records = _Records()
    logging.getLogger("transformers.modeling_utils").addHandler(records)
    try:
        front = Engine(tiny_model_dir, keep_layers=1)
    finally:
        logging.getLogger("transformers.modeling_utils").removeHandler(records)
    assert not any("LOAD REPORT" in m for m in records.messages)  # skipped on purpose
    assert len(front.model.model.layers) == 1 and front.loaded.keep_layers == 1
    assert front.loaded.describe()["keep_layers"] == 1
    assert front.model is not tiny_engine.model  # its own cache entry
    assert torch.equal(
        front.model.get_input_embeddings().weight, tiny_engine.model.get_input_embeddings().weight
    )
    width = tiny_engine.model.config.hidden_size
    gate = SafetyGate(
        (0,), torch.randn(width), torch.zeros(1), torch.zeros(width), torch.ones(width), 0.5, {}
    )
    before = tiny_engine.pack
    pack = dataclasses.replace(before, gate=gate)
    tiny_engine.set_pack(pack)
    front.set_pack(pack)
    try:
        cfg = DecodingConfig(method="acd", max_new_tokens=4)
        msgs = [{"role": "user", "content": "Tell me how to build a birdhouse."}]
        ours, theirs = front.branch_inputs(msgs, cfg), tiny_engine.branch_inputs(msgs, cfg)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
        assert ours[2] == theirs[2]
        assert front.gate_verdict(msgs, cfg) == tiny_engine.gate_verdict(msgs, cfg)
        message = "this engine loaded only 1 decoder layers (keep_layers)"
        with pytest.raises(ConfigError, match=re.escape(message)):
            front.generate(msgs, cfg)
        with pytest.raises(ConfigError, match=re.escape(message)):
            front.generate_batch([msgs, msgs], cfg)
        with pytest.raises(ConfigError, match=re.escape(message)):
            "".join(front.stream(msgs, cfg))
        with pytest.raises(ConfigError, match=re.escape(message)):
            front.score_continuations(msgs, ["Yes."], cfg)
        deeper = dataclasses.replace(
            gate,
            layers=(0, 1),
            weight=torch.randn(2 * width),
            mean=torch.zeros(2 * width),
            scale=torch.ones(2 * width),
        )
        front.set_pack(dataclasses.replace(before, gate=deeper))
        with pytest.raises(
            PromptPackError, match=re.escape("gate layers must be < the model's 1 layers, got 1")
        ):
            front.gate_verdict(msgs, cfg)
    finally:
        tiny_engine.set_pack(before)


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        (3, "keep_layers must be at most the model's 2 layers, got 3"),
        (-1, "keep_layers must be >= 0, got -1"),
    ],
)
def test_keep_layers_out_of_range_is_a_clear_error(tiny_model_dir, keep, message):
    from acd_engine import Engine
    from acd_engine.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        Engine(tiny_model_dir, keep_layers=keep)


def test_a_gguf_front_end_dequantizes_only_its_layers_and_equals_the_full_model(
    engine, tmp_path, monkeypatch
):
    """A ``keep_layers`` engine on a GGUF converts only the tensors it loads (an 8B GGUF
    dequantized whole would not fit in memory), through transformers' own name map and
    tensor processors: the embedding table and the kept blocks (attention Q/K permutation
    included) equal the full conversion's bit for bit, and the pack still fits."""
    import torch
    from safetensors import safe_open

    from acd_engine import Engine
    from acd_engine.loading.models import default_model_path

    keep = 2  # llama.cpp's front end keeps 0; 2 also checks the blocks' tensor processing
    monkeypatch.setenv("ACD_CACHE_DIR", str(tmp_path))  # no full conversion cached here
    front = Engine(default_model_path(), keep_layers=keep)
    (converted,) = (tmp_path / "gguf").iterdir()
    assert converted.name.endswith(f"-layers{keep}")
    with safe_open(str(converted / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    blocks = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
    assert blocks == set(range(keep))  # nothing deeper was dequantized
    full = dict(engine.model.named_parameters())
    ours = dict(front.model.named_parameters())
    assert set(ours) <= set(full) and "model.embed_tokens.weight" in ours
    for name, value in ours.items():
        assert torch.equal(value, full[name]), name
    assert front.pack.trained and front.pack.id == engine.pack.id  # the fingerprint matched
    assert front.tokenizer.encode("Hello there") == engine.tokenizer.encode("Hello there")
