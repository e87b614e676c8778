"""OpenAI's presence_penalty, frequency_penalty and logit_bias through the shared table:
both adapters take them as fields and per call, with the engine's own validation."""

from __future__ import annotations

import pytest

from acd_engine import ConfigError
from acd_integrations._params import build_config

FORCED = 1234


def test_the_table_maps_them_with_the_engine_s_messages():
    cfg = build_config(
        {"presence_penalty": 0.5, "frequency_penalty": -1, "logit_bias": {"7": -100, 3: 2}}
    )
    assert (cfg.presence_penalty, cfg.frequency_penalty) == (0.5, -1.0)
    assert cfg.logit_bias == ((3, 2.0), (7, -100.0))
    assert build_config({"logit_bias": None}).logit_bias == ()  # None: unset
    with pytest.raises(ConfigError, match=r"presence_penalty must be <= 2\.0, got 3"):
        build_config({"presence_penalty": 3}, owner="ChatACD")


@pytest.fixture(scope="module")
def forced_text(tiny_engine) -> str:
    result = tiny_engine.generate(
        "Hi", method="plain", max_new_tokens=3, logit_bias={FORCED: 100.0}
    )
    assert result.token_ids == [FORCED] * 3
    return result.text


def test_chat_acd_applies_them(tiny_model_dir, forced_text):
    pytest.importorskip("langchain_core")
    from acd_integrations.langchain import ChatACD

    field = ChatACD(
        model=str(tiny_model_dir), method="plain", max_tokens=3, logit_bias={FORCED: 100}
    )
    assert field.invoke("Hi").content == forced_text
    per_call = ChatACD(model=str(tiny_model_dir), method="plain", max_tokens=3)
    assert per_call.invoke("Hi", logit_bias={str(FORCED): 100}).content == forced_text
    assert per_call.invoke("Hi").content != forced_text
    with pytest.raises(ConfigError, match=r"frequency_penalty must be >= -2\.0"):
        per_call.invoke("Hi", frequency_penalty=-5)


def test_acdllm_applies_them(tiny_model_dir, forced_text):
    pytest.importorskip("llama_index.core")
    from llama_index.core.base.llms.types import ChatMessage

    from acd_integrations.llama_index import ACDLLM

    msgs = [ChatMessage(role="user", content="Hi")]
    field = ACDLLM(
        model=str(tiny_model_dir), method="plain", max_tokens=3, logit_bias={FORCED: 100}
    )
    assert field.chat(msgs).message.content == forced_text
    per_call = ACDLLM(model=str(tiny_model_dir), method="plain", max_tokens=3)
    assert per_call.chat(msgs, logit_bias={FORCED: 100}).message.content == forced_text
    with pytest.raises(ConfigError, match=r"presence_penalty must be <= 2\.0"):
        per_call.chat(msgs, presence_penalty=9)
