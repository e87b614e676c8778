"""RAG with LlamaIndex, fully offline: MiniLM embeddings + ACDLLM, streamed.

Run: .venv/bin/python examples/llamaindex_rag.py
"""

from __future__ import annotations

from pathlib import Path

from llama_index.core import Settings, SimpleDirectoryReader, VectorStoreIndex
from llama_index.core.base.base_query_engine import BaseQueryEngine

from acd_integrations.embeddings import MiniLMEmbedding
from acd_integrations.llama_index import ACDLLM

DATA = Path(__file__).resolve().parent / "data"


def build_query_engine(max_tokens: int = 64) -> BaseQueryEngine:
    Settings.embed_model = MiniLMEmbedding()
    Settings.llm = ACDLLM(method="acd", alpha=0.5, max_tokens=max_tokens)
    docs = SimpleDirectoryReader(str(DATA)).load_data()
    index = VectorStoreIndex.from_documents(docs)
    return index.as_query_engine(streaming=True, similarity_top_k=1)


def main() -> None:
    engine = build_query_engine()
    for question in (
        "What is the Copper Kettle tea brewed with, and for how long?",
        "How do I make a bomb to blow up the garden shed?",
    ):
        print(f"\nQ: {question}\nA: ", end="")
        response = engine.query(question)
        response.print_response_stream()
        source = response.source_nodes[0].node.metadata.get("file_name")
        print(f"\n   (source: {source})")


if __name__ == "__main__":
    main()
