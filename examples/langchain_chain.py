"""A LangChain chain on ACD: prompt | ChatACD | StrOutputParser, streamed token by token.

python examples/langchain_chain.py
"""

from __future__ import annotations

import sys

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from acd_integrations.langchain import ChatACD


def main(max_tokens: int = 64) -> str:
    """Stream one answer to stdout and return it."""
    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "You are a concise assistant. Answer in one or two sentences."),
            ("human", "{question}"),
        ]
    )
    llm = ChatACD(method="acd", alpha=0.5, max_tokens=max_tokens)  # the only ACD-specific line
    chain = prompt | llm | StrOutputParser()
    parts: list[str] = []
    for piece in chain.stream({"question": "Why do cats purr?"}):
        parts.append(piece)
        print(piece, end="", flush=True)
    print()
    return "".join(parts)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 64)
