"""Quantized weights (torchao int8 / int4): the oracles hold on the quantized model too.

The tiny random model stands in for the real one: what is checked is that the engine's
paths agree with each other and with Hugging Face ``generate`` on the *same* quantized
weights, which does not depend on the model's size.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao", reason="quantization needs the [quant] extra (torchao)")

from acd_engine import Engine
from acd_engine.config import DecodingConfig, ModelConfig
from acd_engine.errors import ConfigError
from acd_engine.loading.quantize import is_quantized, quantize_model, quantized_bytes

PROMPT = "Name three things to pack for a day hike."
N = 8
SCHEMES = ["int8", "int4"]


@pytest.fixture(scope="module", params=SCHEMES)
def q_engine(request, tiny_model_dir):
    return Engine(tiny_model_dir, quantize=request.param)


def test_every_linear_is_quantized_and_the_embedding_is_not(q_engine, tiny_engine):
    linears = [m for m in q_engine.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(is_quantized(m.weight) for m in linears)
    assert not is_quantized(q_engine.model.get_input_embeddings().weight)
    assert q_engine.model is not tiny_engine.model  # its own cache entry, not the float one
    for m in linears:  # int8: a byte per weight plus a scale per row; int4: under half that
        assert quantized_bytes(m) < m.in_features * m.out_features * 4 / 3


def test_plain_equals_hf_generate_on_the_same_quantized_weights(q_engine, hf_greedy):
    msgs = [{"role": "user", "content": PROMPT}]
    text = q_engine.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = q_engine.tokenizer.encode(text, add_special_tokens=False)
    ours = q_engine.generate(msgs, method="plain", max_new_tokens=N).token_ids
    assert ours == hf_greedy(q_engine, ids, N)


def test_acd_alpha_zero_equals_hf_generate_behind_the_soft_prompt(q_engine):
    cfg = DecodingConfig(method="acd", alpha=0.0, max_new_tokens=N, gate=False)
    embeds, mask, _ = q_engine.branch_inputs(PROMPT, cfg)
    n = int(mask[0].sum())
    with torch.inference_mode():
        out = q_engine.model.generate(
            inputs_embeds=embeds[:1, -n:],
            attention_mask=torch.ones(1, n, dtype=torch.long),
            max_new_tokens=N,
            do_sample=False,
        )
    hf = [t for t in out[0].tolist() if t not in q_engine.eos_token_ids]
    assert q_engine.generate(PROMPT, cfg).token_ids == hf


@pytest.mark.parametrize(("method", "plausibility"), [("acd", 0.0), ("acd", 0.1), ("oid", 0.1)])
def test_fast_path_equals_reference_path_when_quantized(q_engine, method, plausibility):
    """The plausibility filter too (acd eval's setting), which gathers head rows."""
    cfg = DecodingConfig(
        method=method, alpha=0.5, max_new_tokens=N, gate=False, plausibility=plausibility
    )
    fast = q_engine.generate(PROMPT, cfg).token_ids
    q_engine.set_options(fast_path=False)
    try:
        reference = q_engine.generate(PROMPT, cfg).token_ids
    finally:
        q_engine.set_options(fast_path=True)
    assert fast == reference


def test_kernel_modes_stand_aside_for_quantized_weights(q_engine):
    assert q_engine.kernels.step_context() is None  # skinny/prepacked need float weights


def test_unknown_scheme_is_refused_in_house_style():
    with pytest.raises(ConfigError, match=r"quantize must be one of .*'int8'.*got 'int3'"):
        ModelConfig(quantize="int3")  # type: ignore[arg-type]


def test_int4_off_the_cpu_is_refused_before_touching_the_model():
    layer = torch.nn.Linear(64, 64)
    before = layer.weight.detach().clone()
    with pytest.raises(ConfigError, match="int4 runs on the CPU only"):
        quantize_model(layer, "int4", torch.device("cuda"))
    assert torch.equal(layer.weight, before) and not is_quantized(layer.weight)


def test_a_width_int4_cannot_group_stays_in_floats():
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Linear(48, 16))
    assert quantize_model(model, "int4", torch.device("cpu")) == 1
    assert is_quantized(model[0].weight) and not is_quantized(model[1].weight)
