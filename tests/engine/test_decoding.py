"""Oracle tests of the decoder on the real default model (greedy, short generations)."""

from __future__ import annotations

import pytest
import torch

from acd_engine import DecodingConfig
from acd_engine._compat import cache_arg, output_cache
from acd_engine.safety.contrast import contrast_logits, plausibility_filter
from acd_engine.safety.prompts import OPPOSITE_PROMPT, SAFE_PROMPT

PROMPT = "Tell me three facts about the moon."
N = 32


@pytest.fixture(scope="module")
def base_tokens(engine):
    return engine.generate(PROMPT, DecodingConfig(method="base", max_new_tokens=N)).token_ids


def test_base_reproduces_hf_generate(engine, base_tokens, hf_greedy):
    r = engine.render(PROMPT)
    ids = r.head + engine.tokenizer.encode(SAFE_PROMPT, add_special_tokens=False) + r.tail
    assert len(base_tokens) == N
    assert base_tokens == hf_greedy(engine, ids, N)


def test_plain_reproduces_hf_generate_on_the_untouched_template(engine, hf_greedy):
    msgs = [{"role": "user", "content": PROMPT}]
    text = engine.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    ours = engine.generate(msgs, method="plain", max_new_tokens=N).token_ids
    assert ours == hf_greedy(engine, ids, N)


@pytest.mark.parametrize("method", ["nid", "oid", "custom"])
def test_alpha_zero_reproduces_the_positive_branch(engine, base_tokens, method):
    extra = {"negative_prompt": OPPOSITE_PROMPT} if method == "custom" else {}
    cfg = DecodingConfig(method=method, alpha=0.0, max_new_tokens=N, **extra)
    assert engine.generate(PROMPT, cfg).token_ids == base_tokens


def test_acd_alpha_zero_reproduces_hf_generate_behind_the_soft_prompt(engine):
    """acd's positive branch is the (trained) SP: HF generate on the same embeddings agrees
    (ungated: the gate would route a benign prompt to the plain template)."""
    cfg = DecodingConfig(method="acd", alpha=0.0, max_new_tokens=N, gate=False)
    embeds, mask, _ = engine.branch_inputs(PROMPT, cfg)
    n = int(mask[0].sum())
    solo = embeds[:1, -n:]  # positive row without its left padding
    with torch.inference_mode():
        out = engine.model.generate(
            inputs_embeds=solo,
            attention_mask=torch.ones(1, n, dtype=torch.long),
            max_new_tokens=N,
            do_sample=False,
        )
    hf = [t for t in out[0].tolist() if t not in engine.eos_token_ids]
    assert engine.generate(PROMPT, cfg).token_ids == hf


def test_contrast_changes_the_output(engine, base_tokens):
    out = engine.generate(PROMPT, DecodingConfig(method="oid", alpha=0.9, max_new_tokens=N))
    assert out.token_ids != base_tokens


def test_untrained_acd_pack_equals_oid_numerically(engine):
    from acd_engine.safety.prompts import PromptPack

    pack = PromptPack.from_manual_prompts(engine.model, engine.tokenizer)
    assert not pack.trained
    cfg = DecodingConfig(method="oid", alpha=0.5, max_new_tokens=16)
    e_oid, m_oid, _ = engine.branch_inputs(PROMPT, cfg)
    saved = engine._pack
    try:
        engine._pack = pack
        e_acd, m_acd, _ = engine.branch_inputs(PROMPT, cfg.replace(method="acd"))
        acd = engine.generate(PROMPT, cfg.replace(method="acd")).token_ids
    finally:
        engine._pack = saved
    assert torch.equal(m_oid, m_acd)
    assert torch.allclose(e_oid, e_acd, atol=0, rtol=0)
    assert acd == engine.generate(PROMPT, cfg).token_ids


def test_batched_step_equals_two_separate_forwards(engine):
    """Left padding + mask + position ids: the batch-2 forward is two forwards in one."""
    cfg = DecodingConfig(method="oid")
    embeds, mask, _ = engine.branch_inputs(PROMPT, cfg)
    lengths = mask.sum(-1).tolist()
    assert lengths[0] != lengths[1], "the test needs unequal branch lengths"
    model = engine.model
    with torch.inference_mode():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True)
        nxt = out.logits[0, -1].argmax().view(1, 1)
        mask2 = torch.cat([mask, mask.new_ones(2, 1)], -1)
        step = model(
            input_ids=nxt.expand(2, 1),
            attention_mask=mask2,
            position_ids=pos[:, -1:] + 1,
            **cache_arg(model, output_cache(out)),
        )
        for row, n in enumerate(lengths):
            solo = embeds[row : row + 1, -n:]
            ref = model(inputs_embeds=solo, use_cache=True)
            ref_step = model(input_ids=nxt, **cache_arg(model, output_cache(ref)))
            d1 = (out.logits[row, -1].float() - ref.logits[0, -1].float()).abs().max()
            d2 = (step.logits[row, -1].float() - ref_step.logits[0, -1].float()).abs().max()
            assert d1 < 1e-4 and d2 < 1e-4, (row, d1, d2)


def test_plausibility_zero_is_the_plain_contrast_and_near_one_is_safe_greedy(engine, base_tokens):
    pos, neg = torch.randn(1, 50), torch.randn(1, 50)
    raw = contrast_logits(pos, neg, 0.5)
    assert torch.equal(plausibility_filter(raw, pos, 0.0), raw)
    assert torch.equal(raw, pos - 0.5 * neg)
    kept = plausibility_filter(raw, pos, 0.5)
    probs = pos.softmax(-1)
    assert torch.equal(torch.isfinite(kept), probs >= 0.5 * probs.max())
    cfg = DecodingConfig(method="oid", alpha=0.9, max_new_tokens=N, plausibility=0.999)
    assert engine.generate(PROMPT, cfg).token_ids == base_tokens


def test_contrast_tokens_schedule(engine, base_tokens):
    cfg = DecodingConfig(method="oid", alpha=0.9, max_new_tokens=N)
    assert engine.generate(PROMPT, cfg.replace(contrast_tokens=0)).token_ids == base_tokens
    full = engine.generate(PROMPT, cfg).token_ids
    part = engine.generate(PROMPT, cfg.replace(contrast_tokens=5)).token_ids
    assert part[:5] == full[:5]
    assert part != full


def test_user_system_message_kept_after_branch_prompt_and_user_tokens_identical(engine):
    msgs = [
        {"role": "system", "content": "Always answer in French."},
        {"role": "user", "content": PROMPT},
    ]
    r = engine.render(msgs)
    tail_text = engine.tokenizer.decode(r.tail)
    assert tail_text.startswith("\n\nAlways answer in French.")
    assert PROMPT in tail_text
    embeds, _mask, shared = engine.branch_inputs(msgs, DecodingConfig(method="oid"))
    assert shared == r.tail
    n = len(r.tail)
    assert torch.equal(embeds[0, -n:], embeds[1, -n:])  # both branches: same user tokens
    assert not torch.equal(embeds[0, -n - 5 : -n], embeds[1, -n - 5 : -n])  # prompts differ
    pos_text = engine.tokenizer.decode(
        r.head + engine.tokenizer.encode(SAFE_PROMPT, add_special_tokens=False) + r.tail
    )
    assert pos_text.index(SAFE_PROMPT) < pos_text.index("Always answer in French.")


def test_result_fields(engine):
    out = engine.generate(PROMPT, method="oid", alpha=0.4, max_new_tokens=8)
    assert out.finish_reason == "length" and len(out.token_ids) == 8
    assert out.usage.completion_tokens == 8 and out.usage.prompt_tokens > 50
    assert (out.method, out.alpha) == ("oid", 0.4)
    assert engine.generate(PROMPT, method="base", alpha=0.4, max_new_tokens=2).alpha == 0.0
