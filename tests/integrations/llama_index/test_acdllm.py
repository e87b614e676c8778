"""ACDLLM: paths agree, async does not block, usage is reported, kwargs are validated."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from pydantic import BaseModel

from acd_engine import ConfigError, DecodingConfig
from acd_integrations._params import PARAM_TO_FIELD, param_default
from acd_integrations.llama_index import ACDLLM

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
MSGS = [ChatMessage(role="user", content="Name one planet.")]


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir):
    return ACDLLM(model=str(tiny_model_dir), method="oid", max_tokens=12)


@pytest.fixture(scope="module")
def llm(engine):
    return ACDLLM(max_tokens=12)


def test_every_shared_param_is_a_field_with_the_engine_default():
    for name, field in PARAM_TO_FIELD.items():
        assert name in ACDLLM.model_fields, name
        assert ACDLLM.model_fields[name].default == param_default(name), name
        assert field in DecodingConfig.model_fields


def test_metadata_comes_from_the_model(llm, engine):
    meta = llm.metadata
    assert meta.context_window == engine.context_window == 8192
    assert meta.num_output == 12
    assert meta.is_chat_model and meta.is_function_calling_model
    assert meta.model_name == engine.model_name
    assert ACDLLM(max_tokens=5).engine is llm.engine  # one shared engine, no reload


def test_chat_complete_and_streams_give_identical_text(tiny_llm):
    chat = tiny_llm.chat(MSGS).message.content
    complete = tiny_llm.complete("Name one planet.").text
    stream_chat = "".join(r.delta or "" for r in tiny_llm.stream_chat(MSGS))
    stream_complete = "".join(r.delta or "" for r in tiny_llm.stream_complete("Name one planet."))
    assert chat and chat == complete == stream_chat == stream_complete


def test_async_paths_match_sync(tiny_llm):
    async def run() -> tuple[str, str, str, str]:
        a = (await tiny_llm.achat(MSGS)).message.content
        b = (await tiny_llm.acomplete("Name one planet.")).text
        c = "".join([r.delta or "" async for r in await tiny_llm.astream_chat(MSGS)])
        d = "".join(
            [r.delta or "" async for r in await tiny_llm.astream_complete("Name one planet.")]
        )
        return a, b, c, d

    assert set(asyncio.run(run())) == {tiny_llm.chat(MSGS).message.content}


def test_real_model_answer_and_usage(llm, engine):
    resp = llm.chat([ChatMessage(role="user", content="What is the capital of France?")])
    assert "Paris" in resp.message.content
    usage = resp.raw["usage"]
    expected = engine.generate("What is the capital of France?", max_new_tokens=12)
    assert usage["completion_tokens"] == expected.usage.completion_tokens
    assert usage["prompt_tokens"] == expected.usage.prompt_tokens
    assert resp.raw["method"] == "acd" and resp.raw["finish_reason"] in ("stop", "length")


def test_concurrent_achat_calls_share_forwards(llm, engine, group_sizes):
    """Concurrent async calls reach the engine from worker threads; they decode together."""
    questions = ["Name one planet.", "Name one colour.", "How do I pick a lock?"]
    alone = [llm.chat([ChatMessage(role="user", content=q)]).message.content for q in questions]

    async def run() -> list[str]:
        engine._lock.acquire()  # busy: the calls queue up and leave as one group
        try:
            tasks = [
                asyncio.ensure_future(llm.achat([ChatMessage(role="user", content=q)]))
                for q in questions
            ]
            for _ in range(3000):
                if engine._coalescer.waiting == len(questions):
                    break
                await asyncio.sleep(0.01)
        finally:
            engine._lock.release()
        return [r.message.content for r in await asyncio.gather(*tasks)]

    assert asyncio.run(run()) == alone
    assert group_sizes == [3]


def test_token_counting_handler_sees_the_counts(tiny_model_dir):
    counter = TokenCountingHandler()
    llm = ACDLLM(
        model=str(tiny_model_dir), max_tokens=6, callback_manager=CallbackManager([counter])
    )
    resp = llm.chat(MSGS)
    assert counter.prompt_llm_token_count == resp.raw["usage"]["prompt_tokens"] > 0
    assert counter.completion_llm_token_count == resp.raw["usage"]["completion_tokens"] > 0


def test_async_stream_lets_other_tasks_run(llm):
    async def run() -> tuple[int, str]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        task = asyncio.create_task(ticker())
        text = "".join([r.delta or "" async for r in await llm.astream_chat(MSGS)])
        task.cancel()
        return ticks, text

    ticks, text = asyncio.run(run())
    assert text
    assert ticks >= 5  # a blocking implementation gives 0: the ticker never gets the loop


def test_cancelling_an_async_stream_stops_the_engine(tiny_model_dir):
    llm = ACDLLM(model=str(tiny_model_dir), max_tokens=400, temperature=1.0, seed=0)

    async def run() -> int:
        n = 0
        async for _ in await llm.astream_chat(MSGS):
            n += 1
            if n == 3:
                break
        return n

    assert asyncio.run(run()) == 3
    # The engine lock is free again quickly: the worker stopped at the next token.
    assert llm.engine._lock.acquire(timeout=10)
    llm.engine._lock.release()


def test_bad_kwargs_give_the_shared_validation_errors(tiny_llm):
    with pytest.raises(ConfigError, match=r"alpha must be in \[0, 1\), got 1.3"):
        tiny_llm.chat(MSGS, alpha=1.3)
    with pytest.raises(ConfigError, match=r"max_tokens must be >= 1, got 0"):
        tiny_llm.chat(MSGS, max_tokens=0)
    with pytest.raises(ConfigError, match=r"did you mean 'alpha'"):
        tiny_llm.chat(MSGS, alpah=0.3)
    with pytest.raises(ConfigError, match=r"alpha must be in \[0, 1\), got 2"):
        ACDLLM(alpha=2)


def test_per_call_override_changes_the_method(tiny_llm, tiny_engine):
    out = tiny_llm.chat(MSGS, method="base", max_tokens=5)
    assert out.raw["method"] == "base" and out.raw["alpha"] == 0.0
    assert (
        out.message.content
        == tiny_engine.generate("Name one planet.", method="base", max_new_tokens=5).text
    )


class Pet(BaseModel):
    name: str
    species: str
    age: int


def test_structured_predict_returns_a_valid_object(engine):
    from llama_index.core.prompts import PromptTemplate

    llm = ACDLLM(max_tokens=48)
    pet = llm.structured_predict(Pet, PromptTemplate("Invent a pet called {name}."), name="Rex")
    assert isinstance(pet, Pet) and isinstance(pet.age, int)


def test_function_agent_calls_the_tool_and_uses_its_result(engine):
    sys.path.insert(0, str(EXAMPLES))
    import llamaindex_agent as example

    calls: list[str] = []

    def get_weather(city: str) -> str:
        """Get today's weather report for a city."""
        calls.append(city)
        return f"The weather in {city} is sunny and 21 degrees Celsius."

    from llama_index.core.tools import FunctionTool

    engine.set_pack(None)  # the shipped pack, whatever earlier tests swapped in
    saved = example.TOOLS
    example.TOOLS = [FunctionTool.from_defaults(fn=get_weather)]
    try:
        answer = asyncio.run(
            example.run_function_agent("What is the weather in Lisbon?", max_tokens=40)
        )
    finally:
        example.TOOLS = saved
    assert calls and "lisbon" in calls[0].lower()
    assert "sunny" in answer.lower() or "21" in answer


def test_rag_example_answers_from_the_documents(engine):
    sys.path.insert(0, str(EXAMPLES))
    import llamaindex_rag as example

    qe = example.build_query_engine(max_tokens=32)
    resp = qe.query("What is the Copper Kettle tea brewed with, and for how long?")
    answer = "".join(resp.response_gen)
    sources = " ".join(n.node.get_content() for n in resp.source_nodes)
    assert "cardamom" in sources  # retrieval found the document that holds the fact
    assert "four minutes" in answer or "cardamom" in answer or "pear" in answer
