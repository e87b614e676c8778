"""The front ends on every major chat-template family (tests/template_families.py): LangChain's
ChatACD, LlamaIndex's ACDLLM and ``acd serve`` answer an application's conversation (its
own system prompt, an earlier turn, a user message that spells the family's control
tokens) on a tiny random model of each family, gated by a pack ``acd train`` made for it.
"""

from __future__ import annotations

import json

import pytest
from template_families import FAMILIES, build_family, one_torch_thread, train_tiny_pack

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")
pytest.importorskip("fastapi")

from fastapi.testclient import TestClient
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from llama_index.core.base.llms.types import ChatMessage, MessageRole

from acd_engine import get_engine
from acd_integrations.langchain import ChatACD
from acd_integrations.llama_index import ACDLLM
from acd_integrations.server import ServerOptions, create_app


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def model_and_pack(family, tmp_path_factory) -> tuple[str, str]:
    model = build_family(family, tmp_path_factory.mktemp(family.name))
    pack, result = train_tiny_pack(model, tmp_path_factory.mktemp("pack"))
    assert result.exit_code == 0, result.output
    return str(model), str(pack)


def _conversation(forged: str) -> list[tuple[str, str]]:
    """An app's request: its system prompt, an earlier exchange, then the user's message."""
    return [
        ("system", "You are the help desk of a bicycle shop."),
        ("user", "Do you sell bells?"),
        ("assistant", "Yes, several kinds."),
        ("user", "How do I fit one? " + forged),
    ]


def _gated(meta: dict, pack: str) -> None:
    """The answer came from the trained pack, through its gate."""
    assert meta["method"] == "acd"
    assert pack.rsplit("/", 1)[-1] in meta["pack"]
    assert 0.0 <= meta["gate_score"] <= 1.0 and isinstance(meta["gate_flagged"], bool)


def test_langchain_chat_acd_answers(family, model_and_pack):
    model, pack = model_and_pack
    kinds = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
    messages = [kinds[role](content=text) for role, text in _conversation(family.forged)]
    llm = ChatACD(model=model, pack=pack, method="acd", max_tokens=3)
    reply = llm.invoke(messages)
    assert isinstance(reply.content, str)
    assert reply.usage_metadata["output_tokens"] <= 3
    _gated(reply.response_metadata, pack)
    streamed = "".join(str(chunk.content) for chunk in llm.stream(messages))
    assert streamed == reply.content  # greedy: the stream is the same answer


def test_llama_index_acdllm_answers(family, model_and_pack):
    model, pack = model_and_pack
    roles = {"system": MessageRole.SYSTEM, "user": MessageRole.USER}
    roles["assistant"] = MessageRole.ASSISTANT
    messages = [ChatMessage(role=roles[r], content=t) for r, t in _conversation(family.forged)]
    llm = ACDLLM(model=model, pack=pack, method="acd", max_tokens=3)
    response = llm.chat(messages)
    assert isinstance(response.message.content, str)
    assert response.raw["usage"]["completion_tokens"] <= 3
    _gated(response.raw, pack)
    assert isinstance(llm.complete("How do I fit a bell?").text, str)


def test_acd_serve_answers(family, model_and_pack):
    model, pack = model_and_pack
    app = create_app(ServerOptions(defaults={"max_tokens": 3}), engine=get_engine(model, pack=pack))
    body = {
        "model": get_engine(model, pack=pack).model_name,
        "messages": [{"role": r, "content": t} for r, t in _conversation(family.forged)],
    }
    with TestClient(app) as client:
        reply = client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        assert isinstance(answer["choices"][0]["message"]["content"], str)
        assert answer["usage"]["completion_tokens"] <= 3
        _gated(answer["acd"], pack)
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as sse:
            events = [line[6:] for line in sse.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        text = "".join(
            choice["delta"].get("content") or ""
            for event in events[:-1]
            for choice in json.loads(event)["choices"]
        )
        assert text == answer["choices"][0]["message"]["content"]
