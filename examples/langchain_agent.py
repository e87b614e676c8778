"""A LangGraph tool-calling agent with two tools, on ChatACD.

    python examples/langchain_agent.py

The graph is the usual ReAct loop (agent -> tools -> agent). One deliberate difference:
a 135M model rarely decides on its own to call a tool, so the agent node *forces* a call
(``tool_choice="any"``) until a tool result is in the conversation, then lets the model
answer in prose (``tool_choice="none"``). The grammar behind ``bind_tools`` guarantees the
forced call names a real tool with schema-valid arguments. With a larger model, plain
``tool_choice="auto"`` (or ``langgraph.prebuilt.create_react_agent``) works as usual.
"""

from __future__ import annotations

import sys
from typing import Annotated

from langchain_core.messages import AnyMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode, tools_condition
from typing_extensions import TypedDict

from acd_integrations.langchain import ChatACD


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"It is 18 degrees Celsius and sunny in {city}."


@tool
def celsius_to_fahrenheit(celsius: float) -> float:
    """Convert a temperature from degrees Celsius to degrees Fahrenheit."""
    return celsius * 9 / 5 + 32


TOOLS = [get_weather, celsius_to_fahrenheit]


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def build_agent(llm: ChatACD) -> object:
    """agent -> (tool call? tools -> agent : end)."""
    forced = llm.bind_tools(TOOLS, tool_choice="any")
    answer = llm.bind_tools(TOOLS, tool_choice="none")

    def agent(state: State) -> dict[str, list[AnyMessage]]:
        have_result = any(isinstance(m, ToolMessage) for m in state["messages"])
        reply = (answer if have_result else forced).invoke(state["messages"])
        return {"messages": [reply]}

    graph = StateGraph(State)
    graph.add_node("agent", agent)
    graph.add_node("tools", ToolNode(TOOLS))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition, {"tools": "tools", END: END})
    graph.add_edge("tools", "agent")
    return graph.compile()


def main(max_tokens: int = 48) -> list[AnyMessage]:
    """Run the agent on one question, print the trace and return the messages."""
    app = build_agent(ChatACD(method="acd", alpha=0.5, max_tokens=max_tokens))
    state = app.invoke(  # type: ignore[attr-defined]
        {"messages": [HumanMessage("What is the weather in Paris right now?")]},
        {"recursion_limit": 6},
    )
    for message in state["messages"]:
        calls = getattr(message, "tool_calls", None)
        print(f"[{message.type}] {message.text}" + (f" {calls}" if calls else ""))
    return state["messages"]


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 48)
