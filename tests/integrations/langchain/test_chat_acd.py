"""ChatACD behaviour beyond the standard suites: validation, overrides, stop, async, tools.

Real-model tests use the session ``engine`` (ChatACD() resolves to the same object) with a
handful of tokens; cancellation and timeout tests use the tiny random model, which is fast
and never stops on its own.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any, Literal

import pytest
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from acd_engine import ConfigError, DecodingConfig, Engine
from acd_integrations._tools import TOOL_CALL_OPEN
from acd_integrations.langchain import ChatACD


@tool
def get_weather(location: str) -> str:
    """Get the weather at a location."""
    return "It's sunny and 21 degrees."


class Verdict(BaseModel):
    """Whether the statement is true."""

    answer: Literal["yes", "no"]
    confidence: int = Field(ge=0, le=10, description="0 = guess, 10 = certain")


class VerdictDict(TypedDict):
    """Whether the statement is true."""

    answer: Literal["yes", "no"]
    confidence: int


class _Spy:
    """Wraps an engine method to record what ChatACD sends and what came back."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, engine: Engine, name: str) -> None:
        self.calls: list[dict[str, Any]] = []
        self.results: list[Any] = []
        original = getattr(engine, name)

        def wrapped(messages: Any, config: Any = None, **kwargs: Any) -> Any:
            self.calls.append({"messages": messages, "config": config, **kwargs})
            out = original(messages, config, **kwargs)
            if name == "stream_chunks":
                return self._record_stream(out)
            self.results.append(out)
            return out

        monkeypatch.setattr(engine, name, wrapped)

    def _record_stream(self, chunks: Any) -> Any:
        """Count generated tokens; record the count when the stream ends or is closed."""
        tokens = 0
        try:
            for chunk in chunks:
                if chunk.finish_reason is None:
                    tokens += len(chunk.token_ids)
                yield chunk
        finally:
            self.results.append(tokens)


# ------------------------------------------------------------------ construction
def test_unknown_setting_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match="unknown ChatACD setting 'alpah'; did you mean 'alpha'"):
        ChatACD(alpah=0.3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\), got 1.5"),
        ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
        ({"method": "custom"}, "negative_prompt is required when method='custom'"),
        ({"temperature": "hot"}, "temperature must be a valid number"),
        ({"timeout": 0}, r"timeout must be > 0.0, got 0"),
        ({"backend": "gpu"}, "backend must be one of 'auto', 'torch' or 'llamacpp', got 'gpu'"),
        ({"backend": "llamacpp", "model": "m"}, "backend 'llamacpp' needs a .gguf model file"),
    ],
)
def test_bad_settings_fail_at_construction_in_house_style(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ChatACD(**kwargs)


def test_many_instances_share_one_engine_without_reloading(engine):
    start = time.perf_counter()
    llms = [ChatACD(alpha=0.1 * (i % 9), max_tokens=4) for i in range(50)]
    assert time.perf_counter() - start < 2.0  # no model load per instance
    assert all(llm.engine is engine for llm in llms)


def test_identity_and_tracing_params():
    llm = ChatACD(method="oid", alpha=0.3, max_tokens=9, stop=["END"])
    assert llm._llm_type == "acd"
    assert llm._identifying_params["method"] == "oid"
    assert llm._identifying_params["model"] == "SmolLM2-135M-Instruct"
    ls = llm._get_ls_params()
    assert (ls["ls_provider"], ls["ls_model_name"], ls["ls_max_tokens"]) == (
        "acd",
        "SmolLM2-135M-Instruct",
        9,
    )
    assert ls["ls_stop"] == ["END"]
    assert llm._get_ls_params(model="my.gguf")["ls_model_name"] == "my.gguf"


def test_serialisation_round_trip():
    from langchain_core.load import dumpd, load

    llm = ChatACD(method="oid", alpha=0.3, max_tokens=7, stop=["x"])
    data = dumpd(llm)
    assert data["id"] == ["acd_integrations", "langchain", "ChatACD"]
    again = load(data, valid_namespaces=["acd_integrations"], allowed_objects=[ChatACD])
    assert isinstance(again, ChatACD) and again.model_dump() == llm.model_dump()


# ------------------------------------------------------------------ messages
def test_message_conversion_merges_roles_and_renders_tool_turns(engine):
    llm = ChatACD()
    messages = [
        SystemMessage("Be brief."),
        SystemMessage("Use metric units."),
        HumanMessage("Weather in Oslo?"),
        HumanMessage("And tomorrow?", name="bob"),
        AIMessage(
            "", tool_calls=[{"name": "get_weather", "args": {"location": "Oslo"}, "id": "c1"}]
        ),
        ToolMessage("Rain.", tool_call_id="c1"),
        ToolMessage("Timeout.", tool_call_id="c1", status="error"),
    ]
    req = llm._prepare(messages, None, {"tools": [get_weather]}).call
    roles = [m["role"] for m in req.messages]
    assert roles == ["system", "user", "assistant", "user"]
    assert req.messages[0]["content"].startswith(
        "Be brief.\n\nUse metric units.\n\nYou have access"
    )
    assert req.messages[1]["content"] == "Weather in Oslo?\n\nAnd tomorrow?"
    assert TOOL_CALL_OPEN in req.messages[2]["content"]
    assert req.messages[3]["content"] == (
        "Tool result for get_weather (c1):\nRain.\n\nTool error for get_weather (c1):\nTimeout."
    )
    assert req.mode == "auto" and req.grammar is not None
    engine.render(req.messages)  # the template accepts the result


# ------------------------------------------------------------------ invoke, stream, overrides
def test_invoke_reports_usage_and_metadata_from_the_engine(engine, monkeypatch):
    spy = _Spy(monkeypatch, engine, "generate")
    reply = ChatACD(max_tokens=5).invoke("Hi")
    result = spy.results[0]
    assert reply.content == result.text
    assert reply.usage_metadata == {
        "input_tokens": result.usage.prompt_tokens,
        "output_tokens": result.usage.completion_tokens,
        "total_tokens": result.usage.prompt_tokens + result.usage.completion_tokens,
    }
    meta = reply.response_metadata
    assert (meta["finish_reason"], meta["model_name"], meta["method"], meta["alpha"]) == (
        result.finish_reason,
        "SmolLM2-135M-Instruct",
        "acd",
        result.alpha,  # 0.5 when the safety gate flagged "Hi", else 0 (routed to plain)
    )
    assert (meta["gate_score"], meta["gate_flagged"]) == (result.gate_score, result.gate_flagged)
    assert meta["alpha"] == (0.5 if result.gate_flagged else 0.0)
    ungated = ChatACD(max_tokens=2, gate=False).invoke("Hi").response_metadata
    assert ungated["alpha"] == 0.5 and "gate_score" not in ungated


def test_per_call_and_bound_overrides_reach_the_engine(engine, monkeypatch):
    spy = _Spy(monkeypatch, engine, "generate")
    llm = ChatACD(max_tokens=3, gate=False)  # alpha is reported 0 for a gate-passed request
    reply = llm.invoke("Hi", alpha=0.3)
    assert reply.response_metadata["alpha"] == 0.3 and spy.calls[-1]["config"].alpha == 0.3
    based = llm.bind(method="base", max_tokens=2).invoke("Hi")
    assert based.response_metadata["method"] == "base" and based.response_metadata["alpha"] == 0.0
    assert spy.calls[-1]["config"].max_new_tokens == 2
    with pytest.raises(ConfigError, match="max_tokens must be >= 1, got 0"):
        llm.invoke("Hi", max_tokens=0)
    with pytest.raises(ConfigError, match="unknown ChatACD call argument 'temprature'"):
        llm.invoke("Hi", temprature=0.5)


def test_stop_is_honoured_on_invoke_and_stream():
    llm = ChatACD(method="plain", max_tokens=12)
    full = llm.invoke("Count from one to ten in words.").text
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]  # the engine stops at its first occurrence, even inside a word
    cut = full[: full.index(stop)]
    by_call = llm.invoke("Count from one to ten in words.", stop=[stop])
    assert by_call.text == cut and by_call.response_metadata["finish_reason"] == "stop"
    by_field = ChatACD(method="plain", max_tokens=12, stop=[stop])
    streamed = "".join(c.text for c in by_field.stream("Count from one to ten in words."))
    assert streamed == cut


def test_stream_matches_invoke_and_ends_with_usage():
    llm = ChatACD(max_tokens=6)
    chunks = list(llm.stream("Name a colour."))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert [c.chunk_position for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    last = chunks[-1]
    assert last.chunk_position == "last" and last.usage_metadata is not None
    assert (
        last.usage_metadata["output_tokens"] == 6
        or last.response_metadata["finish_reason"] == "stop"
    )
    assert sum(1 for c in chunks if c.usage_metadata) == 1  # input tokens counted once
    assert "".join(c.text for c in chunks) == llm.invoke("Name a colour.").text


def test_batch_shares_forwards_and_equals_a_loop(engine, group_sizes):
    """``batch`` runs invokes in threads; the engine decodes them as one group."""
    llm = ChatACD(method="acd", max_tokens=6)
    prompts = ["Say yes.", "Say no.", "How do I pick a lock?"]
    looped = [llm.invoke(p) for p in prompts]
    out: list[Any] = []
    with engine._lock:  # busy: the three calls queue up and leave as one group
        worker = threading.Thread(target=lambda: out.extend(llm.batch(prompts)))
        worker.start()
        deadline = time.monotonic() + 30
        while engine._coalescer.waiting < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    worker.join()
    assert group_sizes == [3]
    assert [m.text for m in out] == [m.text for m in looped]
    assert [m.usage_metadata for m in out] == [m.usage_metadata for m in looped]


# ------------------------------------------------------------------ async
async def test_concurrent_ainvoke_matches_serial_and_keeps_the_loop_free():
    llm = ChatACD(method="base", max_tokens=5)
    prompts = [
        f"Give me a word that rhymes with {w}."
        for w in ("cat", "dog", "sun", "tree", "car", "moon", "hat", "bee")
    ]
    serial = [llm.invoke(p).text for p in prompts]
    gaps: list[float] = []
    done = asyncio.Event()

    async def heartbeat() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    beat = asyncio.create_task(heartbeat())
    replies = await asyncio.gather(*(llm.ainvoke(p) for p in prompts))
    done.set()
    await beat
    assert [r.text for r in replies] == serial
    assert len(gaps) > 10 and max(gaps) < 1.0  # the loop kept running while the engine worked


async def test_astream_yields_the_same_text_as_stream():
    llm = ChatACD(max_tokens=6)
    chunks = [c async for c in llm.astream("Name a fruit.")]
    assert chunks[-1].chunk_position == "last" and chunks[-1].usage_metadata
    assert "".join(c.text for c in chunks) == "".join(c.text for c in llm.stream("Name a fruit."))


async def test_breaking_off_an_async_stream_stops_the_engine(tiny_model_dir, monkeypatch):
    llm = ChatACD(model=str(tiny_model_dir), method="base", max_tokens=2000)
    spy = _Spy(monkeypatch, llm.engine, "stream_chunks")
    stream = llm.astream("go")
    async for _ in stream:
        break  # consumer loses interest after the first chunk
    await stream.aclose()
    for _ in range(200):  # the worker notices the cancel event before its next token
        if spy.results:
            break
        await asyncio.sleep(0.02)
    assert spy.results, "the engine stream was never closed after the consumer left"
    assert spy.calls[0]["cancel"].is_set()
    _, mask, _ = llm.engine.branch_inputs("go", DecodingConfig(method="base"))
    room = llm.engine.context_window - int(mask[0].sum())  # where it would have stopped
    assert spy.results[0] < room


async def test_cancelling_ainvoke_stops_the_engine(tiny_model_dir, monkeypatch):
    llm = ChatACD(model=str(tiny_model_dir), method="base", max_tokens=2000)
    spy = _Spy(monkeypatch, llm.engine, "generate")
    task = asyncio.create_task(llm.ainvoke("go"))
    while not spy.calls:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):
        if spy.results:
            break
        await asyncio.sleep(0.02)
    assert spy.calls[0]["cancel"].is_set()
    usage = spy.results[0].usage
    assert usage.prompt_tokens + usage.completion_tokens < llm.engine.context_window


def test_timeout_stops_generation_and_raises(tiny_model_dir):
    llm = ChatACD(model=str(tiny_model_dir), method="base", max_tokens=2000, timeout=0.05)
    with pytest.raises(TimeoutError, match=r"must finish within timeout=0.05s"):
        llm.invoke("go")


# ------------------------------------------------------------------ tools
def test_tool_call_round_trip(engine, monkeypatch):
    spy = _Spy(monkeypatch, engine, "generate")
    llm = ChatACD(max_tokens=40)
    question = HumanMessage("What is the weather in Paris?")
    call_msg = llm.bind_tools([get_weather], tool_choice="any").invoke([question])
    assert isinstance(call_msg, AIMessage) and len(call_msg.tool_calls) == 1
    call = call_msg.tool_calls[0]
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    assert isinstance(call["args"]["location"], str) and set(call["args"]) == {"location"}
    assert call_msg.response_metadata["finish_reason"] == "tool_calls"
    tool_msg = get_weather.invoke(call)
    assert isinstance(tool_msg, ToolMessage) and tool_msg.tool_call_id == call["id"]
    final = llm.bind_tools([get_weather], tool_choice="none").invoke([question, call_msg, tool_msg])
    assert isinstance(final, AIMessage) and final.text and not final.tool_calls
    sent = json.dumps(spy.calls[-1]["messages"])
    assert "It's sunny and 21 degrees." in sent and call["id"] in sent


def test_streamed_tool_call_arrives_whole_on_the_last_chunk():
    llm = ChatACD(max_tokens=40).bind_tools([get_weather], tool_choice="get_weather")
    chunks = list(llm.stream("Weather in Rome?"))
    assert all(not c.tool_call_chunks for c in chunks[:-1])
    assert "".join(c.text for c in chunks) == ""  # the call's JSON never leaks into content
    full = chunks[0]
    for c in chunks[1:]:
        full += c
    assert len(full.tool_calls) == 1 and full.tool_calls[0]["name"] == "get_weather"


def test_bad_tool_choice_fails_at_bind_time():
    with pytest.raises(ConfigError, match="unknown tool_choice 'get_wether'"):
        ChatACD().bind_tools([get_weather], tool_choice="get_wether")


# ------------------------------------------------------------------ structured output
@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
@pytest.mark.parametrize(
    "question", ["Is the sky blue?", "Is two bigger than three?", "Do fish fly?"]
)
def test_structured_output_always_validates(method, question):
    llm = ChatACD(max_tokens=40)  # a whole <tool_call> block needs ~30 tokens
    out = llm.with_structured_output(Verdict, method=method).invoke(question)
    assert isinstance(out, Verdict)


@pytest.mark.parametrize(
    "schema", [VerdictDict, Verdict.model_json_schema()], ids=["typeddict", "json"]
)
def test_structured_output_dict_schemas_validate(schema):
    # the grammar enforces the JSON shape, not the number's bound: oid's answer stays in it
    out = ChatACD(max_tokens=24, method="oid").with_structured_output(schema).invoke("Is ice cold?")
    Verdict.model_validate(out)
    assert set(out) == {"answer", "confidence"}


def test_structured_output_include_raw():
    out = (
        ChatACD(max_tokens=24)
        .with_structured_output(Verdict, include_raw=True)
        .invoke("Is ice cold?")
    )
    assert set(out) == {"raw", "parsed", "parsing_error"}
    assert isinstance(out["raw"], AIMessage) and isinstance(out["parsed"], Verdict)
    assert out["parsing_error"] is None
    assert Verdict.model_validate_json(out["raw"].text) == out["parsed"]
    cut = (
        ChatACD(max_tokens=3)
        .with_structured_output(Verdict, include_raw=True)
        .invoke("Is ice cold?")
    )
    assert cut["parsed"] is None and cut["parsing_error"] is not None  # truncated, reported


def test_structured_output_streams_one_complete_object():
    chunks = list(ChatACD(max_tokens=24).with_structured_output(Verdict).stream("Is fire hot?"))
    assert len(chunks) == 1 and isinstance(chunks[0], Verdict)


def test_unknown_structured_output_method():
    with pytest.raises(
        ConfigError, match="unknown method 'json_shema'; did you mean 'json_schema'"
    ):
        ChatACD().with_structured_output(Verdict, method="json_shema")  # type: ignore[arg-type]


def test_response_format_grammars():
    from acd_integrations._calls import response_format_grammar
    from acd_integrations._constrained import json_object_grammar, json_schema_grammar

    schema = Verdict.model_json_schema()
    hint, grammar = response_format_grammar({"type": "json_object"})
    assert grammar == json_object_grammar() and "JSON object" in hint
    hint, grammar = response_format_grammar({"type": "json_object", "schema": schema})
    assert grammar == json_schema_grammar(schema) and "- confidence (integer)" in hint
    _, grammar = response_format_grammar({"type": "json_schema", "json_schema": {"schema": schema}})
    assert grammar == json_schema_grammar(schema)
    with pytest.raises(ConfigError, match="response_format must be"):
        response_format_grammar({"type": "xml"})
