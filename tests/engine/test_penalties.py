"""OpenAI's logit_bias, presence_penalty and frequency_penalty: applied as OpenAI defines
them (on the answer so far, never the prompt), on every decode path, never past the grammar.

The oracle is a hand-written greedy loop over the tiny random model's full forward:
``score[j] += bias[j] - frequency * count[j] - presence * (count[j] > 0)`` on the plain
template, which the engine's fast and reference paths must both reproduce token for token.
"""

from __future__ import annotations

import math

import pytest
import torch

from acd_engine import ConfigError, DecodingConfig
from acd_engine.backends.step import AnswerPenalties, build_processors

N = 12
PROMPT = [{"role": "user", "content": "Count: one two three one two three"}]


def _prompt_ids(engine) -> list[int]:
    text = engine.tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    return engine.tokenizer.encode(text, add_special_tokens=False)


def _oracle(engine, presence=0.0, frequency=0.0, bias=None, n=N) -> list[int]:
    """Greedy tokens with OpenAI's adjustments, from scratch (a full forward per token)."""
    ids = _prompt_ids(engine)
    out: list[int] = []
    for _ in range(n):
        with torch.inference_mode():
            logits = engine.model(torch.tensor([ids + out])).logits[0, -1].float()
        counts = torch.zeros_like(logits)
        for t in out:
            counts[t] += 1
        logits = logits - frequency * counts - presence * (counts > 0).float()
        for token, value in (bias or {}).items():
            logits[token] += value
        token = int(logits.argmax())
        if token in engine.eos_token_ids:
            break
        out.append(token)
    return out


def _both_paths(engine, **kwargs) -> tuple[list[int], list[int]]:
    cfg = DecodingConfig(method="plain", max_new_tokens=N, **kwargs)
    fast = engine.generate(PROMPT, cfg).token_ids
    saved = engine.fast_path
    engine.fast_path = False
    try:
        ref = engine.generate(PROMPT, cfg).token_ids
    finally:
        engine.fast_path = saved
    return fast, ref


def _strip_eos(engine, ids: list[int]) -> list[int]:
    return [t for t in ids if t not in engine.eos_token_ids]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
        {"frequency_penalty": 0.5, "presence_penalty": 1.5},
    ],
)
def test_penalties_follow_openai_s_formula_on_both_paths(tiny_engine, kwargs):
    plain_tokens = _oracle(tiny_engine)
    expected = _oracle(
        tiny_engine,
        presence=kwargs.get("presence_penalty", 0.0),
        frequency=kwargs.get("frequency_penalty", 0.0),
    )
    assert expected != plain_tokens, "the oracle's penalty must change this answer"
    fast, ref = _both_paths(tiny_engine, **kwargs)
    assert _strip_eos(tiny_engine, fast) == expected
    assert _strip_eos(tiny_engine, ref) == expected


def test_logit_bias_bans_and_forces_tokens(tiny_engine):
    greedy = _oracle(tiny_engine)
    first = greedy[0]
    fast, ref = _both_paths(tiny_engine, logit_bias={str(first): -100})
    assert fast == ref and fast[0] != first and first not in fast
    assert _strip_eos(tiny_engine, fast) == _oracle(tiny_engine, bias={first: -100})
    forced = 1234
    fast, ref = _both_paths(tiny_engine, logit_bias={forced: 100})
    assert fast == ref == [forced] * N


def test_the_prompt_is_not_counted(tiny_engine):
    """A token the prompt holds many times, and the answer never, is not penalised."""
    proc = AnswerPenalties(DecodingConfig(frequency_penalty=2.0, presence_penalty=1.0))
    scores = torch.zeros(1, 10)
    prompt = torch.tensor([[3, 3, 3, 3]])
    assert torch.equal(proc(prompt, scores), scores)  # the first call: the prompt alone
    after = proc(torch.tensor([[3, 3, 3, 3, 5, 5, 7]]), scores)
    expected = torch.zeros(1, 10)
    expected[0, 5] = -2.0 * 2 - 1.0
    expected[0, 7] = -2.0 * 1 - 1.0
    assert torch.equal(after, expected)  # token 3 (prompt only) untouched
    assert torch.equal(scores, torch.zeros(1, 10))  # the input is not modified


def test_a_removed_token_stays_removed():
    """The grammar and the plausibility filter set -inf; no bias or penalty revives it."""
    proc = AnswerPenalties(DecodingConfig(logit_bias={2: 100.0}, frequency_penalty=-2.0))
    scores = torch.tensor([[0.0, 1.0, -math.inf, 0.5]])
    proc(torch.tensor([[0]]), scores)
    out = proc(torch.tensor([[0, 2, 2]]), scores)
    assert out[0, 2] == -math.inf and out[0, 1] == 1.0


def test_a_bias_outside_the_vocabulary_is_a_config_error(tiny_engine):
    vocab = tiny_engine.model.config.vocab_size
    with pytest.raises(ConfigError, match=f"vocabulary size {vocab}, got {vocab + 5}"):
        tiny_engine.generate(PROMPT, method="plain", max_new_tokens=2, logit_bias={vocab + 5: 1})


def test_off_by_default_and_built_per_request():
    assert not any(isinstance(p, AnswerPenalties) for p in build_processors(DecodingConfig()))
    cfg = DecodingConfig(presence_penalty=0.5)
    a, b = build_processors(cfg)[0], build_processors(cfg)[0]
    assert isinstance(a, AnswerPenalties) and a is not b  # each remembers its own prompt


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty must be <= 2.0, got 2.5"),
        ({"frequency_penalty": -3}, "frequency_penalty must be >= -2.0, got -3"),
        ({"frequency_penalty": math.inf}, "frequency_penalty must be a finite number, got inf"),
        ({"logit_bias": {"x": 1}}, "logit_bias must map token ids (integers >= 0) to biases"),
        ({"logit_bias": {"5": 101}}, "got 101 for token 5"),
        ({"logit_bias": {"5": math.nan}}, "got nan for token 5"),
        ({"logit_bias": {-1: 1}}, "got key -1"),
    ],
)
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ConfigError) as info:
        DecodingConfig(**kwargs)
    assert message in str(info.value)


def test_a_bias_mapping_is_kept_as_sorted_pairs():
    cfg = DecodingConfig(logit_bias={"12": -100, 3: 5})
    assert cfg.logit_bias == ((3, 5.0), (12, -100.0))
    assert hash(cfg) == hash(DecodingConfig(logit_bias=[(12, -100), (3, 5)]))
    assert cfg.replace(alpha=0.1).logit_bias == cfg.logit_bias


def test_a_batch_counts_each_answer_alone(tiny_engine):
    """Batched requests of different prompt lengths: each penalises its own answer."""
    convs = [PROMPT, "Hi", [{"role": "user", "content": "a b c " * 20}]]
    cfg = DecodingConfig(method="plain", max_new_tokens=N, frequency_penalty=1.5)
    batched = tiny_engine.generate_batch(convs, cfg)
    alone = [tiny_engine.generate(c, cfg) for c in convs]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
