"""The shared adapter core: one policy for unknown keywords and tool_choice="none" in every
front end, and a stream that never hands out tool-call text as answer text."""

from __future__ import annotations

import pytest
from langchain_core.messages import HumanMessage
from llama_index.core.base.llms.types import ChatMessage

from acd_engine import ConfigError
from acd_integrations._calls import CallDelta, CallOutcome, check_call_kwargs, prepare_call
from acd_integrations._constrained import PROSE_GRAMMAR
from acd_integrations._tools import TOOL_CALL_OPEN, format_tool_call
from acd_integrations.langchain import ChatACD
from acd_integrations.llama_index import ACDLLM


@pytest.fixture(scope="module")
def chat_acd(tiny_model_dir):
    return ChatACD(model=str(tiny_model_dir), method="plain", max_tokens=8)


@pytest.fixture(scope="module")
def acd_llm(tiny_model_dir):
    return ACDLLM(model=str(tiny_model_dir), method="plain", max_tokens=8)


def test_unknown_keyword_is_an_error_with_a_suggestion_in_both_adapters(chat_acd, acd_llm):
    with pytest.raises(ConfigError, match="unknown ChatACD call argument 'temprature'; did you"):
        chat_acd.invoke("Hi", temprature=0.5)
    with pytest.raises(ConfigError, match="unknown ACDLLM call argument 'temprature'; did you"):
        acd_llm.chat([ChatMessage(role="user", content="Hi")], temprature=0.5)
    # Not only near misses: a keyword nothing understands is refused too, not dropped.
    with pytest.raises(ConfigError, match="unknown ACDLLM call argument 'frobnicate'"):
        acd_llm.chat([ChatMessage(role="user", content="Hi")], frobnicate=True)
    with pytest.raises(ConfigError, match="unknown ChatACD call argument 'frobnicate'"):
        chat_acd.invoke("Hi", frobnicate=True)


def test_check_call_kwargs_splits_decoding_from_accepted_keywords():
    decoding, rest = check_call_kwargs({"alpha": 0.2, "tools": []}, ("tools",), "Server")
    assert decoding == {"alpha": 0.2} and rest == {"tools": []}
    with pytest.raises(ConfigError, match="did you mean 'tools'"):
        check_call_kwargs({"tols": []}, ("tools",), "Server")


def test_tool_choice_none_is_the_same_call_in_both_adapters(chat_acd, acd_llm, weather_tool):
    lc = chat_acd._prepare(
        [HumanMessage("Weather in Oslo?")], None, {"tools": [weather_tool], "tool_choice": "none"}
    ).call
    li = acd_llm._request(
        [ChatMessage(role="user", content="Weather in Oslo?")],
        {"tools": [weather_tool], "tool_choice": "none"},
    )
    for call in (lc, li):
        assert call.mode == "none" and call.names == ()
        assert call.grammar == PROSE_GRAMMAR  # prose that can never open a call
        assert call.native_tools is None
    assert lc.messages == li.messages
    # Text that looks like a call is not a call when tools may not be called.
    out = li.outcome(format_tool_call("get_weather", {"location": "Oslo"}), "stop", _usage())
    assert out.tool_calls == [] and out.finish_reason == "stop"


def test_tool_choice_none_answers_in_prose_end_to_end(chat_acd, acd_llm, weather_tool):
    reply = chat_acd.bind_tools([weather_tool], tool_choice="none").invoke("Weather in Oslo?")
    assert not reply.tool_calls and TOOL_CALL_OPEN not in reply.text
    resp = acd_llm.chat(
        [ChatMessage(role="user", content="Weather in Oslo?")],
        tools=[weather_tool],
        tool_choice="none",
    )
    assert not resp.message.additional_kwargs.get("tool_calls")
    assert TOOL_CALL_OPEN not in (resp.message.content or "")


def test_a_forced_call_streams_no_call_text_and_arrives_parsed(tiny_engine, weather_tool):
    call = prepare_call(
        tiny_engine,
        [{"role": "user", "content": "Weather in Oslo?"}],
        base=None,
        decoding={"method": "plain", "max_tokens": 120},
        owner="test",
        tools=[weather_tool],
        tool_choice="required",
    )
    events = list(call.stream())
    deltas = [e.text for e in events if isinstance(e, CallDelta)]
    outcome = events[-1]
    assert isinstance(outcome, CallOutcome)
    assert all(TOOL_CALL_OPEN not in d for d in deltas)
    assert outcome.raw_text.startswith(TOOL_CALL_OPEN)
    if outcome.finish_reason == "tool_calls":  # the random model may run out of tokens
        assert outcome.tool_calls[0].name == "get_weather"
        assert set(outcome.tool_calls[0].arguments) == {"location"}
    else:
        assert outcome.invalid_tool_calls


def test_tools_and_response_format_are_refused_together(tiny_engine, weather_tool):
    with pytest.raises(ConfigError, match="tools and response_format must not be combined"):
        prepare_call(
            tiny_engine,
            [{"role": "user", "content": "Hi"}],
            base=None,
            decoding={},
            owner="test",
            tools=[weather_tool],
            response_format={"type": "json_object"},
        )


def _usage():
    from acd_engine import Usage

    return Usage(prompt_tokens=3, completion_tokens=4)
