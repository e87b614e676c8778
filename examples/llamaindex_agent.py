"""LlamaIndex agents on ACDLLM: a FunctionAgent and a ReActAgent with the same two tools.

Tool calls are grammar-constrained after the contrast, so even the 135M default model emits
valid calls. Run: .venv/bin/python examples/llamaindex_agent.py
"""

from __future__ import annotations

import asyncio

from llama_index.core.agent.workflow import FunctionAgent, ReActAgent
from llama_index.core.tools import FunctionTool

from acd_integrations.llama_index import ACDLLM


def multiply(a: int, b: int) -> int:
    """Multiply two integers and return the product."""
    return a * b


def get_weather(city: str) -> str:
    """Get today's weather report for a city."""
    return f"The weather in {city} is sunny and 21 degrees Celsius."


TOOLS = [FunctionTool.from_defaults(fn=multiply), FunctionTool.from_defaults(fn=get_weather)]


async def run_function_agent(question: str, max_tokens: int = 64) -> str:
    # plausibility=0.1 keeps the contrasted answer close to what the safe branch finds
    # likely, so the small model reads the tool result back instead of inventing one.
    llm = ACDLLM(method="acd", alpha=0.5, plausibility=0.1, max_tokens=max_tokens)
    # A 135M model rarely volunteers a tool call; "required" on the first turn makes the
    # agent call one (schema-valid thanks to the grammar) and answer from its result.
    agent = FunctionAgent(
        tools=list(TOOLS),
        llm=llm,
        system_prompt="Use the tools to answer.",
        initial_tool_choice="required",
    )
    return str(await agent.run(user_msg=question))


async def run_react_agent(question: str, max_tokens: int = 96) -> str:
    llm = ACDLLM(method="acd", alpha=0.5, plausibility=0.1, max_tokens=max_tokens)
    agent = ReActAgent(tools=TOOLS, llm=llm)
    return str(await agent.run(user_msg=question, max_iterations=3))


async def main() -> None:
    question = "What is the weather in Lisbon?"
    print("FunctionAgent:", await run_function_agent(question))
    try:
        print("ReActAgent:", await run_react_agent(question))
    except Exception as exc:  # noqa: BLE001 - a 135M model often breaks the ReAct text format
        print(f"ReActAgent failed on the small default model: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    asyncio.run(main())
