"""Property: whatever a caller passes, the engine answers or says what is wrong.

Random decoding settings, message lists (any role, any type, any Unicode including lone
surrogates, control characters and control-token strings, long strings) and stop lists go
to the tiny random model through the engine and both adapters. Every call must end in a
typed error of this package (a ``ValueError`` subclass with a message) or a valid
``GenerationResult`` with finite scores: never another exception, a hang or NaN.

Requests valid by construction (any roles and Unicode text that fits, every setting inside
its range, edges included) have their own property: each one must decode. So the decoder is
reached on every one of those cases by the generator's definition, not by the luck of how
many random cases happened to pass validation.
"""

from __future__ import annotations

import math
import os
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from acd_engine import ACDError, DecodingConfig, GenerationResult
from acd_engine.config import METHODS

FUZZ = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
N = 600 if FUZZ else 60

CONTROL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "@@ACD_BRANCH_PROMPT@@", "\x00", "\r"]
text = st.one_of(
    st.text(max_size=40),  # any code point, surrogates included
    st.lists(st.sampled_from([*CONTROL, "system", "hi", "\n", " ", "é", "🎉"]), max_size=8).map(
        "".join
    ),
    st.just("word " * 600),  # longer than the tiny model's context
)
anything = st.one_of(st.none(), st.integers(), st.floats(), st.booleans(), text, st.lists(text))
roles = st.sampled_from(["system", "user", "assistant", "tool"])
message = st.fixed_dictionaries(
    {"role": st.one_of(roles, anything), "content": st.one_of(text, anything)}
)
plausible_message = st.fixed_dictionaries({"role": roles, "content": text})
# Text every part of the engine accepts: any code point but lone surrogates, and short
# enough for the tiny model's context with 3 new tokens (control-token strings included:
# they are data, never control tokens).
valid_text = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=40),
    st.lists(st.sampled_from([*CONTROL, "system", "hi", "\n", " ", "é", "🎉"]), max_size=8).map(
        "".join
    ),
)
valid_messages = st.one_of(
    valid_text,
    st.lists(st.fixed_dictionaries({"role": roles, "content": valid_text}), min_size=1, max_size=4),
)
messages = st.one_of(
    text,
    st.lists(plausible_message, min_size=1, max_size=4),
    st.lists(message, max_size=4),
    anything,
)

numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 0.0, 0.01, 0.5, 0.999, 1.0, 100.0, 1e-300, 2**63, 2**64 - 1]),
)
hostile_config = st.fixed_dictionaries(
    {},
    optional={
        "method": st.one_of(st.sampled_from(METHODS), text),
        "alpha": numbers,
        "temperature": numbers,
        "top_p": numbers,
        "top_k": numbers,
        "repetition_penalty": numbers,
        "presence_penalty": numbers,
        "frequency_penalty": numbers,
        "logit_bias": st.one_of(
            st.dictionaries(st.one_of(numbers, text), numbers, max_size=3),
            st.lists(st.lists(numbers, max_size=3), max_size=3),
            anything,
        ),
        "seed": st.one_of(st.none(), numbers),
        "plausibility": numbers,
        "contrast_tokens": st.one_of(st.none(), numbers),
        "stop": st.one_of(st.none(), text, st.lists(text, max_size=3), anything),
        "positive_prompt": st.one_of(st.none(), text),
        "negative_prompt": st.one_of(st.none(), text),
        "bogus_setting": anything,
    },
)


@st.composite
def valid_config(draw: st.DrawFn) -> dict[str, Any]:
    """Settings inside every range, edges included: these must decode."""
    method = draw(st.sampled_from(METHODS))
    cfg: dict[str, Any] = {
        "method": method,
        "alpha": draw(st.sampled_from([0.0, 0.5, 0.999])),
        "temperature": draw(st.sampled_from([0.0, 0.01, 1.0, 100.0])),
        "top_p": draw(st.sampled_from([1e-9, 0.5, 1.0])),
        "top_k": draw(st.sampled_from([0, 1, 2**31 - 1])),
        "repetition_penalty": draw(st.sampled_from([0.01, 1.0, 100.0])),
        "presence_penalty": draw(st.sampled_from([-2.0, 0.0, 2.0])),
        "frequency_penalty": draw(st.sampled_from([-2.0, 0.0, 0.5, 2.0])),
        "logit_bias": draw(  # token ids of the tiny model (the default tokenizer's 49152)
            st.dictionaries(
                st.integers(0, 49151), st.sampled_from([-100, -1.5, 0, 100]), max_size=3
            )
        ),
        "seed": draw(st.one_of(st.none(), st.integers(0, 2**64 - 1))),
        "plausibility": draw(st.sampled_from([0.0, 0.1, 0.999])),
        "contrast_tokens": draw(st.sampled_from([None, 0, 1, 2**31 - 1])),
        "stop": draw(st.lists(valid_text.filter(bool), max_size=2)),
    }
    if method == "custom":
        cfg["negative_prompt"] = draw(valid_text.filter(bool))
        cfg["positive_prompt"] = draw(st.one_of(st.none(), valid_text))
    return cfg


config = st.one_of(valid_config(), valid_config(), valid_config(), hostile_config)


def _check(result: Any) -> None:
    assert isinstance(result, GenerationResult)
    assert result.finish_reason in ("stop", "length")
    assert len(result.token_ids) <= 3
    result.text.encode("utf-8")  # valid text out


def _typed(exc: BaseException) -> None:
    assert isinstance(exc, ACDError) and isinstance(exc, ValueError), repr(exc)
    assert str(exc).strip(), "an error without a message"
    str(exc).encode("utf-8")  # the message itself can be printed anywhere


@settings(max_examples=N)
@given(msgs=messages, cfg=config)
def test_engine_answers_or_raises_a_typed_error(tiny_engine, msgs, cfg):
    try:
        result = tiny_engine.generate(msgs, max_new_tokens=3, **cfg)
    except Exception as exc:
        _typed(exc)
        event("typed error")
    else:
        _check(result)
        event("answer")


DECODED: dict[str, int] = {"cases": 0, "answers": 0}


@settings(max_examples=N // 2)
@given(msgs=valid_messages, cfg=valid_config())
def test_valid_requests_always_decode(tiny_engine, msgs, cfg):
    """Every valid request reaches the decoder and answers: a typed error fails here."""
    DECODED["cases"] += 1
    _check(tiny_engine.generate(msgs, max_new_tokens=3, **cfg))
    DECODED["answers"] += 1


def test_the_fuzz_reached_the_decoder():
    """Runs after the property above: every valid case it drew was decoded. A fuzz whose
    every case failed validation would test nothing of the decoder; here the share of
    decoded cases is 1 by construction, so the floor is the case count itself."""
    if DECODED["cases"] == 0:
        pytest.skip("run with the property test above")
    assert DECODED["answers"] == DECODED["cases"] >= min(N // 2, 20), DECODED


@settings(max_examples=N // 2)
@given(msgs=messages, cfg=config)
def test_stream_and_score_answer_or_raise_a_typed_error(tiny_engine, msgs, cfg):
    try:
        parts = list(tiny_engine.stream(msgs, max_new_tokens=3, **cfg))
    except Exception as exc:
        _typed(exc)
    else:
        "".join(parts).encode("utf-8")
    try:
        scores = tiny_engine.score_continuations(msgs, ["yes", "<|im_end|>"], **cfg)
    except Exception as exc:
        _typed(exc)
    else:
        assert all(math.isfinite(s) or s == -math.inf for s in scores)
        assert not any(math.isnan(s) for s in scores)


@settings(max_examples=N // 2)
@given(cfg=config)
def test_config_is_valid_or_a_typed_error(cfg):
    try:
        DecodingConfig(**cfg)
    except Exception as exc:
        _typed(exc)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir):
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    from acd_integrations.langchain import ChatACD
    from acd_integrations.llama_index import ACDLLM

    return ChatACD, ACDLLM, str(tiny_model_dir)


adapter_text = st.one_of(st.text(max_size=30), st.sampled_from(CONTROL))


@settings(max_examples=N // 2)
@given(prompt=adapter_text, cfg=config)
def test_adapters_answer_or_raise_a_typed_error(adapters, prompt, cfg):
    chat_acd, acdllm, model = adapters
    from llama_index.core.base.llms.types import ChatMessage

    calls = [
        lambda: chat_acd(model=model, max_tokens=3).invoke(prompt, **cfg),
        lambda: acdllm(model=model, max_tokens=3).chat(
            [ChatMessage(role="user", content=prompt)], **cfg
        ),
    ]
    for call in calls:
        try:
            call()
        except Exception as exc:
            _typed(exc)
