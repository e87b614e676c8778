"""LangChain ``ChatOpenAI`` and LlamaIndex ``OpenAILike`` pointed at ``acd serve``.

The point: an application that already speaks OpenAI gets ACD by changing its base URL.
Oracles as in the SDK tests: greedy streams equal the plain answer, forced calls parse.
"""

from __future__ import annotations

import pytest

pytest.importorskip("openai")

# On torch and on llama.cpp (``acd serve --backend llamacpp``; skipped without the extra):
# ``server_engine`` is the engine of the backend, see conftest.py.
pytestmark = pytest.mark.server_backends("torch", "llamacpp")


def get_weather(location: str) -> str:
    """Get the weather at a location."""
    return f"It is sunny in {location}."


def test_langchain_chat_openai_invoke_stream_and_tool_call(server_url, model_id):
    lc_openai = pytest.importorskip("langchain_openai")
    llm = lc_openai.ChatOpenAI(
        model=model_id,
        base_url=server_url + "/v1",
        api_key="unused",
        max_tokens=16,
        temperature=0,
        max_retries=0,
        extra_body={"method": "plain"},
    )
    reply = llm.invoke("Name three colours.")
    assert reply.text and reply.usage_metadata["output_tokens"] > 0
    assert "".join(c.text for c in llm.stream("Name three colours.")) == reply.text
    called = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(
        "What is the weather in Oslo?", max_tokens=40
    )
    assert called.tool_calls and called.tool_calls[0]["name"] == "get_weather"
    assert set(called.tool_calls[0]["args"]) == {"location"}


def test_llamaindex_openai_like_chat_stream_and_tool_call(server_url, model_id, server_engine):
    openai_like = pytest.importorskip("llama_index.llms.openai_like")
    from llama_index.core.base.llms.types import ChatMessage
    from llama_index.core.tools import FunctionTool

    llm = openai_like.OpenAILike(
        model=model_id,
        api_base=server_url + "/v1",
        api_key="unused",
        is_chat_model=True,
        is_function_calling_model=True,
        context_window=server_engine.context_window,
        max_tokens=40,  # room for a whole tool call
        temperature=0.0,
        max_retries=0,
        additional_kwargs={"extra_body": {"method": "plain"}},
    )
    msgs = [ChatMessage(role="user", content="Name three colours.")]
    text = llm.chat(msgs).message.content
    assert text
    assert "".join(r.delta or "" for r in llm.stream_chat(msgs)) == text
    tool = FunctionTool.from_defaults(fn=get_weather)
    resp = llm.chat_with_tools([tool], user_msg="What is the weather in Oslo?", tool_required=True)
    calls = llm.get_tool_calls_from_response(resp)
    assert calls[0].tool_name == "get_weather" and set(calls[0].tool_kwargs) == {"location"}
