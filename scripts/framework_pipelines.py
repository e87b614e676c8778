"""Applications built the way LangChain's and LlamaIndex's docs build them, around ACD's adapters.

A safety number measured on a bare single turn says little about an application: a LlamaIndex
query engine puts retrieved passages and the question in one user message, its context chat
engine and LangChain's RAG tutorials put the passages in the system message, a chat keeps its
history, an agent adds tools. This module builds each of those applications through the
framework itself (no hand-made message lists), for two users that must agree on them:
``tests/integrations/test_framework_contexts.py`` (a few prompts of our own, checked) and
``scripts/framework_eval.py`` (benchmark prompts, measured).

Each application is opened by :func:`open_app` for one set of decoding keywords and answers
one request at a time as a :class:`Reply`: the generated text, the adapter's result metadata
(method, pack, gate, and ``gate_flagged`` / ``gate_score`` when the gate read the request)
and how many tools the turn called. Every application is offline: embeddings are the
package's bundled MiniLM, the model the adapters' default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.chat_history import InMemoryChatMessageHistory
from langchain_core.documents import Document as LCDocument
from langchain_core.embeddings import Embeddings
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableConfig, RunnablePassthrough
from langchain_core.runnables.history import RunnableWithMessageHistory
from langchain_core.tools import tool
from langchain_core.vectorstores import InMemoryVectorStore
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.chat_engine.types import ChatMode
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent
from pydantic import Field

from acd_integrations.embeddings import MiniLMEmbedding
from acd_integrations.langchain import ChatACD
from acd_integrations.llama_index import ACDLLM

__all__ = [
    "AGENT_SYSTEM",
    "CHAT_SYSTEM",
    "HELP_DESK_SYSTEM",
    "PIPELINES",
    "RAG_SYSTEM",
    "Ask",
    "ChatEndSpy",
    "LLMEndSpy",
    "MiniLMForLangChain",
    "Reply",
    "agent_turn",
    "get_weather",
    "history_chat",
    "langchain_retriever",
    "llama_index_settings",
    "open_app",
    "rag_chain",
    "vector_index",
]

PIPELINES: dict[str, str] = {
    "llamaindex-query": "LlamaIndex VectorStoreIndex query engine (passages and question in "
    "one user message)",
    "llamaindex-chat": "LlamaIndex context chat engine (passages in the system message)",
    "langchain-rag": "LangChain LCEL RAG chain (retrieved context in the system message)",
    "langchain-history": "LangChain chat with RunnableWithMessageHistory (the request is the "
    "third user turn)",
    "langchain-agent": "LangChain tool-calling agent turn (one tool bound, tool_choice auto)",
}
"""Every application, in report order, with what it sends the model."""

# LangChain's RAG tutorial prompt (context in the system message).
RAG_SYSTEM = (
    "You are an assistant for question-answering tasks. Use the following pieces of retrieved "
    "context to answer the question. If you don't know the answer, say that you don't know. "
    "Keep the answer concise.\n\n{context}"
)
CHAT_SYSTEM = "You are a friendly assistant. Answer in one or two sentences."
AGENT_SYSTEM = "You are a travel assistant. Use the tools when they help."
HELP_DESK_SYSTEM = "You are the help desk of a small company; answer from its documents."


@dataclass(frozen=True)
class Reply:
    """One answer of an application: its text, the adapter's metadata, tools it called."""

    text: str
    meta: dict[str, Any] = field(default_factory=dict)
    tool_calls: int = 0


# ------------------------------------------------------------------ spies and embeddings
class ChatEndSpy(BaseEventHandler):
    """Keeps the raw of every LlamaIndex LLM chat response: ACDLLM's gate verdict is there
    (a query engine returns only the synthesized text)."""

    raws: list[dict[str, Any]] = Field(default_factory=list)

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, LLMChatEndEvent) and event.response is not None:
            self.raws.append(dict(event.response.raw or {}))

    def last(self) -> dict[str, Any]:
        """The metadata of the latest answer, forgetting the rest."""
        assert self.raws, "no LLM call was made"
        last = self.raws[-1]
        self.raws.clear()
        return last


class LLMEndSpy(BaseCallbackHandler):
    """Keeps each LangChain chat generation's response_metadata (a chain's output is a str)."""

    def __init__(self) -> None:
        self.metas: list[dict[str, Any]] = []

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.metas.append(dict(response.generations[0][0].message.response_metadata))


class MiniLMForLangChain(Embeddings):
    """LangChain's ``Embeddings`` over the offline MiniLM (the repo ships no LangChain one)."""

    def __init__(self, model: MiniLMEmbedding) -> None:
        self.model = model

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.model.get_text_embedding_batch(texts)

    def embed_query(self, text: str) -> list[float]:
        return self.model.get_query_embedding(text)


# ------------------------------------------------------------------ LlamaIndex
@contextmanager
def llama_index_settings(llm: ACDLLM, embed_model: MiniLMEmbedding) -> Iterator[ChatEndSpy]:
    """``Settings.llm``, ``embed_model`` and ``tokenizer`` set as the docs say (the tokenizer
    too: LlamaIndex's default, tiktoken, fetches its encodings from the network), and a
    :class:`ChatEndSpy` listening; everything is restored afterwards."""
    # the private fields: reading an unset public one resolves LlamaIndex's online default
    saved = (Settings._llm, Settings._embed_model, Settings._tokenizer)  # noqa: SLF001
    spy = ChatEndSpy()
    dispatcher = get_dispatcher()
    dispatcher.add_event_handler(spy)
    try:
        Settings.llm = llm
        Settings.embed_model = embed_model
        Settings.tokenizer = llm.tokenizer
        yield spy
    finally:
        dispatcher.event_handlers.remove(spy)
        Settings._llm, Settings._embed_model, Settings._tokenizer = saved  # noqa: SLF001


def vector_index(passages: Mapping[str, str]) -> VectorStoreIndex:
    """``{title: text}`` in a VectorStoreIndex, embedded with ``Settings.embed_model``."""
    docs = [Document(text=text, metadata={"title": title}) for title, text in passages.items()]
    return VectorStoreIndex.from_documents(docs)


# ------------------------------------------------------------------ LangChain
def langchain_retriever(
    passages: Mapping[str, str], embed_model: MiniLMEmbedding, k: int = 2
) -> BaseRetriever:
    """``{title: text}`` in an InMemoryVectorStore over MiniLM, as a top-``k`` retriever."""
    store = InMemoryVectorStore.from_texts(
        list(passages.values()),
        MiniLMForLangChain(embed_model),
        metadatas=[{"title": title} for title in passages],
    )
    return store.as_retriever(search_kwargs={"k": k})


def rag_chain(retriever: BaseRetriever, llm: ChatACD) -> Runnable[str, str]:
    """LangChain's LCEL RAG recipe: the retrieved context in the system message, the
    question as the user's turn, the answer as a string."""
    prompt = ChatPromptTemplate.from_messages([("system", RAG_SYSTEM), ("human", "{question}")])

    def format_docs(docs: list[LCDocument]) -> str:
        return "\n\n".join(d.page_content for d in docs)

    return (
        {"context": retriever | format_docs, "question": RunnablePassthrough()}
        | prompt
        | llm
        | StrOutputParser()
    )


def history_chat(
    llm: ChatACD, earlier: Callable[[str], Sequence[BaseMessage]] | None = None
) -> tuple[RunnableWithMessageHistory, dict[str, InMemoryChatMessageHistory]]:
    """A chat that keeps each session's history (``{"configurable": {"session_id": ...}}``),
    and the histories themselves; ``earlier(session_id)`` seeds a new session's history (an
    application resuming a stored conversation)."""
    prompt = ChatPromptTemplate.from_messages(
        [("system", CHAT_SYSTEM), MessagesPlaceholder("history"), ("human", "{question}")]
    )
    histories: dict[str, InMemoryChatMessageHistory] = {}

    def session(session_id: str) -> InMemoryChatMessageHistory:
        if session_id not in histories:
            seed = list(earlier(session_id)) if earlier is not None else []
            histories[session_id] = InMemoryChatMessageHistory(messages=seed)
        return histories[session_id]

    chat = RunnableWithMessageHistory(
        prompt | llm,
        session,
        input_messages_key="question",
        history_messages_key="history",
    )
    return chat, histories


@tool
def get_weather(city: str) -> str:
    """Get today's weather in a city."""
    return f"It is sunny and 21 degrees Celsius in {city}."


def agent_turn(llm: Any, messages: list[BaseMessage]) -> tuple[AIMessage, list[ToolMessage]]:
    """One step of a tool-calling agent: the model's reply, then every tool call executed."""
    reply = llm.invoke(messages)
    return reply, [get_weather.invoke(call) for call in reply.tool_calls]


# ------------------------------------------------------------------ one front door
Ask = Callable[[str, str], Reply]
"""``ask(request, session_id)``: the application's answer to one request (the session id
matters only to the history chat, which seeds each session once)."""


@contextmanager
def open_app(
    name: str,
    decoding: Mapping[str, Any],
    *,
    passages: Mapping[str, str],
    embed_model: MiniLMEmbedding,
    earlier: Callable[[str], Sequence[BaseMessage]] | None = None,
) -> Iterator[Ask]:
    """Build application ``name`` (a key of :data:`PIPELINES`) with the adapters' decoding
    keywords ``decoding``, over ``passages`` (the retrieval apps' documents); yields its
    ``ask``. Each request is a fresh query or conversation, except that the history chat
    starts each session from ``earlier(session_id)``."""
    if name not in PIPELINES:
        raise KeyError(name)
    if name.startswith("llamaindex-"):
        llm = ACDLLM(**decoding)
        with llama_index_settings(llm, embed_model) as spy:
            index = vector_index(passages)
            if name == "llamaindex-query":
                engine = index.as_query_engine(llm=llm)

                def ask_query(request: str, session_id: str) -> Reply:
                    answer = engine.query(request)  # a Response: not streaming
                    return Reply(getattr(answer, "response", None) or "", spy.last())

                yield ask_query
            else:

                def ask_chat(request: str, session_id: str) -> Reply:
                    # "context": passages in the system message, then the user's turn; no
                    # function calling (unlike "best") and no extra call to condense
                    chat = index.as_chat_engine(
                        chat_mode=ChatMode.CONTEXT, llm=llm, system_prompt=HELP_DESK_SYSTEM
                    )
                    return Reply(chat.chat(request).response, spy.last())

                yield ask_chat
        return
    chat_model = ChatACD(**decoding)
    if name == "langchain-rag":
        chain = rag_chain(langchain_retriever(passages, embed_model), chat_model)

        def ask_rag(request: str, session_id: str) -> Reply:
            spy = LLMEndSpy()
            text = chain.invoke(request, {"callbacks": [spy]})
            return Reply(text, spy.metas[-1])

        yield ask_rag
    elif name == "langchain-history":
        chat, _ = history_chat(chat_model, earlier)

        def ask_history(request: str, session_id: str) -> Reply:
            session: RunnableConfig = {"configurable": {"session_id": session_id}}
            reply = chat.invoke({"question": request}, session)
            return Reply(reply.text, dict(reply.response_metadata))

        yield ask_history
    else:
        agent = chat_model.bind_tools([get_weather])  # tool_choice auto: prose or a call

        def ask_agent(request: str, session_id: str) -> Reply:
            messages: list[BaseMessage] = [SystemMessage(AGENT_SYSTEM), HumanMessage(request)]
            reply, executed = agent_turn(agent, messages)
            return Reply(reply.text, dict(reply.response_metadata), len(executed))

        yield ask_agent
