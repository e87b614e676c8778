"""Shared fixtures: ONE real default engine per test session, and a tiny random model.

Loading the default model is the slow part of the suite, so every real-model test in every
package (engine, training, eval, integrations) shares the session-scoped ``engine``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def engine():
    from acd_engine import get_engine

    return get_engine()


@pytest.fixture(scope="session")
def llamacpp_engine():
    """The default model on the llama.cpp backend (its GGUF, the embedding table alone in
    torch), shared like ``engine``; skips where the ``[llamacpp]`` extra is missing."""
    pytest.importorskip("llama_cpp", reason="the llama.cpp backend needs the [llamacpp] extra")
    from acd_engine import get_engine

    return get_engine(backend="llamacpp")


def save_tiny_llama(engine, path: Path, max_positions: int = 512) -> Path:
    """Save a 2-layer random Llama with the default tokenizer to ``path`` (seeded, so every
    caller gets the same weights); ``max_positions`` is its context length."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(engine.tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(path)
    engine.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, engine):
    """``save_tiny_llama`` as a fixture: call it with a context length, get a model dir."""
    return lambda max_positions=512: save_tiny_llama(
        engine, tmp_path_factory.mktemp(f"tiny-llama-{max_positions}"), max_positions
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_llama) -> Path:
    """A 2-layer random Llama with the default tokenizer: fast, and emits arbitrary bytes."""
    return tiny_llama(512)


@pytest.fixture(scope="session")
def hf_greedy():
    """HF ``generate``'s greedy new tokens (EOS dropped): the oracle the engine must equal."""

    def run(engine, ids: list[int], n: int) -> list[int]:
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = engine.model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False
            )
        return [t for t in out[0, len(ids) :].tolist() if t not in engine.eos_token_ids]

    return run


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    from acd_engine import Engine

    return Engine(tiny_model_dir)


@pytest.fixture()
def group_sizes(engine, monkeypatch) -> list[int]:
    """Sizes of the batched decodes the session engine runs during the test (a spy)."""
    sizes: list[int] = []
    real = engine.calls.decode_group

    def spy(convs, *args, **kwargs):
        sizes.append(len(convs))
        return real(convs, *args, **kwargs)

    monkeypatch.setattr(engine.calls, "decode_group", spy)
    return sizes
