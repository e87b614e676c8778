"""Tool calling for any chat template: tool specs, the prompt protocol, message prep, parsing.

Most small local models (SmolLM2 among them) have chat templates that silently ignore
``tools=``. So tool calling here never depends on the template alone:

* **The protocol.** A tool call is written as one JSON object between tags, the Hermes /
  Qwen convention that several open models are trained on::

      <tool_call>
      {"name": "get_weather", "arguments": {"location": "Paris"}}
      </tool_call>

  :func:`tools_system_prompt` describes the tools and this format in the system prompt
  (always: a template that supports tools also gets them through ``tools=``, see
  :func:`prepare_messages`). The grammar in :mod:`acd_integrations._constrained` then
  makes the model's output follow it exactly, so even a 135M model emits parseable calls.
* **History.** Earlier assistant tool calls are written back in the same format, and tool
  results become user turns (``Tool result for get_weather (call_1): ...``) on templates
  without tool support, because many such templates reject a ``tool`` role or require
  strict user/assistant alternation.
* **Parsing.** :func:`parse_tool_calls` turns the generated text back into structured
  calls with ids, putting anything malformed into ``invalid`` instead of raising.

Messages are OpenAI-style dicts (``role``, ``content``, ``tool_calls``, ``tool_call_id``),
the lingua franca both LangChain and LlamaIndex can convert to, so this module imports no
framework.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from acd_engine.config import did_you_mean
from acd_engine.errors import ConfigError, MessagesError

__all__ = [
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "InvalidToolCall",
    "ParsedOutput",
    "ToolCall",
    "ToolChoice",
    "ToolMode",
    "ToolSpec",
    "format_tool_call",
    "new_tool_call_id",
    "normalise_tool_choice",
    "normalise_tools",
    "parse_tool_calls",
    "prepare_messages",
    "supports_native_tools",
    "tools_system_prompt",
]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

#: How the model may use its tools on one turn.
ToolMode = Literal["auto", "none", "required"]
#: What callers may pass as ``tool_choice`` (OpenAI and LangChain spellings).
ToolChoice = str | bool | Mapping[str, Any] | None

_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ToolSpec:
    """One tool as the model sees it: a name, what it does, and a JSON schema of arguments."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI ``{"type": "function", "function": {...}}`` form (for chat templates)."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": dict(self.parameters),
            },
        }


@dataclass(frozen=True)
class ToolCall:
    """A well-formed call the model made."""

    name: str
    arguments: dict[str, Any]
    id: str


@dataclass(frozen=True)
class InvalidToolCall:
    """A call the model attempted but got wrong; kept so the caller can show or retry it."""

    name: str | None
    arguments: str | None
    id: str
    error: str


@dataclass
class ParsedOutput:
    """Generated text split into the prose answer and the tool calls found in it."""

    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)


def new_tool_call_id() -> str:
    """A fresh id in OpenAI's shape (``call_`` + 24 hex digits)."""
    return "call_" + uuid.uuid4().hex[:24]


def normalise_tools(tools: Sequence[Mapping[str, Any] | ToolSpec]) -> list[ToolSpec]:
    """Accept OpenAI tool dicts, bare function dicts or :class:`ToolSpec` objects.

    Framework objects (LangChain ``BaseTool``, pydantic classes) are converted by the
    adapter first, e.g. with ``convert_to_openai_tool``.

    Raises:
        ConfigError: A tool has no name, or two different tools share one.
    """
    specs: list[ToolSpec] = []
    for i, tool in enumerate(tools):
        if isinstance(tool, ToolSpec):
            specs.append(tool)
            continue
        fn = tool.get("function", tool) if tool.get("type") == "function" else tool
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"tools[{i}] must have a non-empty 'name', got {dict(tool)!r}")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        specs.append(ToolSpec(name, str(fn.get("description") or ""), dict(params)))
    unique: dict[str, ToolSpec] = {}
    for spec in specs:
        seen = unique.setdefault(spec.name, spec)
        if _shape(seen.parameters) != _shape(spec.parameters):
            raise ConfigError(
                f"tool names must be unique, got two different definitions of {spec.name!r}"
            )
    # The same tool bound twice (a pydantic class and its JSON schema differ only in titles)
    # is one tool; the first definition wins.
    specs = list(unique.values())
    return specs


_ANNOTATIONS = frozenset({"title", "description", "examples", "$comment"})


def _shape(schema: Any) -> Any:
    """A schema without its annotation keywords: what validation actually depends on."""
    if isinstance(schema, Mapping):
        return {k: _shape(v) for k, v in schema.items() if k not in _ANNOTATIONS}
    if isinstance(schema, list):
        return [_shape(v) for v in schema]
    return schema


def normalise_tool_choice(
    choice: ToolChoice, tools: Sequence[ToolSpec]
) -> tuple[ToolMode, tuple[str, ...]]:
    """Reduce every spelling of ``tool_choice`` to a mode and the tools allowed.

    Accepted: ``None``/``"auto"`` (the model decides), ``"none"`` (never call),
    ``"any"``/``"required"``/``True`` (must call one of the tools), a tool name, or
    ``{"type": "function", "function": {"name": ...}}`` (must call that tool).

    Returns:
        ``(mode, names)``: ``names`` are the tools the model may call in that mode.

    Raises:
        ConfigError: Unknown tool name or spelling (with a did-you-mean hint).
    """
    names = tuple(t.name for t in tools)
    if choice is None or choice == "auto" or choice is False:
        return ("auto", names) if names else ("none", ())
    if choice == "none":
        return "none", ()
    if choice in ("any", "required") or choice is True:
        if not names:
            raise ConfigError(f"tool_choice {choice!r} needs at least one tool, got none")
        return "required", names
    if isinstance(choice, Mapping):
        fn = choice.get("function") if choice.get("type") == "function" else choice
        choice = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(choice, str):
            raise ConfigError(
                "tool_choice must be 'auto', 'none', 'any', 'required', a tool name or "
                f"{{'type': 'function', 'function': {{'name': ...}}}}, got {choice!r}"
            )
    if isinstance(choice, str) and choice in names:
        return "required", (choice,)
    raise ConfigError(
        did_you_mean(str(choice), ["auto", "none", "any", "required", *names], "tool_choice")
    )


def supports_native_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders ``tools=`` (it mentions the variable at all)."""
    return bool(chat_template) and re.search(r"\btools\b", chat_template or "") is not None


def format_tool_call(name: str, arguments: Mapping[str, Any] | str) -> str:
    """One call in the protocol's text form, as the model should write it."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            arguments = {"__raw__": arguments}
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def tools_system_prompt(tools: Sequence[ToolSpec], mode: ToolMode, names: Sequence[str]) -> str:
    """The system-prompt section describing the tools and the call format.

    Args:
        tools: Every bound tool (all are described, so history that mentions them reads).
        mode: ``"auto"``, ``"required"`` or ``"none"`` (``"none"`` returns ``""``).
        names: The tools the model may call now.
    """
    if mode == "none" or not tools:
        return ""
    lines = ["You have access to these tools:"]
    for t in tools:
        spec = {"name": t.name, "description": t.description, "parameters": t.parameters}
        lines.append(json.dumps(spec, ensure_ascii=False))
    example = format_tool_call(names[0], {"...": "..."})
    lines.append("To call a tool, reply with only the call, in exactly this format:\n" + example)
    if mode == "required":
        which = f"the tool {names[0]}" if len(names) == 1 else "one of the tools"
        lines.append(f"You must call {which} now.")
    else:
        lines.append(
            "If a tool can answer the request, call it. Otherwise, or once you have the "
            "tool results you need, answer the user in plain text."
        )
    return "\n\n".join(lines)


def _content_text(content: Any) -> str:
    """Flatten string or OpenAI content-part lists to text; refuse non-text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, Mapping) and part.get("type") in ("tool_use", "tool_call"):
                continue  # carried in tool_calls
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise MessagesError(
                    f"message content parts must be text (this model reads text only), got {kind!r}"
                )
        return "\n".join(p for p in parts if p)
    raise MessagesError(f"message content must be a string or a list of parts, got {content!r}")


def _call_name_args(call: Mapping[str, Any]) -> tuple[str, Any, str | None]:
    fn = call.get("function", call)
    return str(fn.get("name", "")), fn.get("arguments", fn.get("args", {})), call.get("id")


def prepare_messages(
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[ToolSpec] = (),
    mode: ToolMode = "none",
    names: Sequence[str] = (),
    native_tools: bool = False,
    instructions: str = "",
) -> list[dict[str, Any]]:
    """OpenAI-style messages -> the engine's ``[{"role", "content"}]`` for one template.

    What it does, and why:

    * Every system message is merged into one leading system message: the engine puts its
      safety prompt in that slot and many templates accept a system turn only first.
    * ``instructions`` (e.g. the tool protocol or an output schema) is appended to it.
    * Assistant tool calls are written in the protocol format; tool results become user
      turns unless the template renders tools natively (then they stay ``tool`` turns and
      the calls are also passed as ``tool_calls`` for the template). A tool message with
      ``"status": "error"`` is labelled as an error so the model can react to it.
    * Consecutive turns of the same role are merged with a blank line, since templates
      such as Llama 2 / Mistral / Gemma require strict alternation.

    Raises:
        MessagesError: Unknown role, non-text content, or no user/assistant turn.
    """
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    call_names = {
        c.get("id"): _call_name_args(c)[0] for m in messages for c in (m.get("tool_calls") or [])
    }
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in _ROLES:
            raise MessagesError(
                f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {role!r}"
            )
        text = _content_text(m.get("content"))
        if role == "system":
            if text:
                system.append(text)
            continue
        if role == "assistant" and m.get("tool_calls"):
            calls = [_call_name_args(c) for c in m["tool_calls"]]
            rendered = "\n".join(format_tool_call(n, a) for n, a, _ in calls)
            turn: dict[str, Any] = {
                "role": "assistant",
                "content": f"{text}\n{rendered}".strip() if text else rendered,
            }
            if native_tools:
                turn["tool_calls"] = [
                    {
                        "type": "function",
                        "id": cid,
                        "function": {
                            "name": n,
                            "arguments": json.loads(a) if isinstance(a, str) and a else a,
                        },
                    }
                    for n, a, cid in calls
                ]
            turns.append(turn)
            continue
        if role == "tool":
            name = m.get("name") or call_names.get(m.get("tool_call_id"))
            if native_tools:
                turns.append(
                    {"role": "tool", "content": text, "tool_call_id": m.get("tool_call_id")}
                )
                continue
            kind = "Tool error" if m.get("status") == "error" else "Tool result"
            label = f"{kind} for {name}" if name else kind
            if m.get("tool_call_id"):
                label += f" ({m['tool_call_id']})"
            turns.append({"role": "user", "content": f"{label}:\n{text}"})
            continue
        turns.append({"role": role, "content": text})
    if instructions:
        system.append(instructions)
    if not turns:
        raise MessagesError("messages must contain at least one user or assistant turn, got none")
    merged: list[dict[str, Any]] = []
    for turn in turns:
        prev = merged[-1] if merged else None
        if prev is not None and prev["role"] == turn["role"] and turn["role"] != "tool":
            prev["content"] = f"{prev['content']}\n\n{turn['content']}".strip()
            if "tool_calls" in turn:
                prev["tool_calls"] = [*prev.get("tool_calls", []), *turn["tool_calls"]]
        else:
            merged.append(dict(turn))
    head = [{"role": "system", "content": "\n\n".join(system)}] if system else []
    return head + merged


_CALL_BLOCK = re.compile(
    re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|\Z)", re.DOTALL
)


def _parse_one(body: str, names: Sequence[str]) -> ToolCall | InvalidToolCall:
    call_id = new_tool_call_id()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as exc:
        return InvalidToolCall(None, body, call_id, f"tool call must be valid JSON, got {exc}")
    if not isinstance(obj, dict):
        return InvalidToolCall(None, body, call_id, f"tool call must be a JSON object, got {body}")
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        with contextlib.suppress(json.JSONDecodeError):
            args = json.loads(args) if args.strip() else {}
    raw_args = json.dumps(args, ensure_ascii=False) if not isinstance(args, str) else args
    if not isinstance(name, str) or (names and name not in names):
        err = (
            did_you_mean(str(name), list(names), "tool")
            if names
            else f"tool call must name a tool, got {name!r}"
        )
        return InvalidToolCall(name if isinstance(name, str) else None, raw_args, call_id, err)
    if not isinstance(args, dict):
        return InvalidToolCall(
            name, raw_args, call_id, f"tool call arguments must be a JSON object, got {raw_args}"
        )
    return ToolCall(name, args, call_id)


def parse_tool_calls(text: str, names: Sequence[str] = ()) -> ParsedOutput:
    """Split generated text into prose and tool calls (never raises).

    Recognises ``<tool_call>{...}</tool_call>`` blocks (a block cut off by the token limit
    counts, and is reported invalid if its JSON is incomplete), and, for models that answer
    in bare JSON, a whole reply that is exactly one ``{"name": ..., "arguments": ...}``
    object naming a known tool.

    Args:
        text: The generated text.
        names: Known tool names; calls to other names are reported invalid. Empty accepts
            any name.
    """
    blocks = list(_CALL_BLOCK.finditer(text))
    if not blocks:
        stripped = text.strip()
        if names and stripped.startswith("{") and stripped.endswith("}"):
            try:
                obj = json.loads(stripped)
            except json.JSONDecodeError:
                obj = None
            if (
                isinstance(obj, dict)
                and obj.get("name") in names
                and ("arguments" in obj or "parameters" in obj)
            ):
                call = _parse_one(stripped, names)
                if isinstance(call, ToolCall):
                    return ParsedOutput("", [call])
        return ParsedOutput(text)
    out = ParsedOutput(_CALL_BLOCK.sub("", text).strip())
    for block in blocks:
        call = _parse_one(block.group(1).strip(), names)
        if isinstance(call, ToolCall):
            out.tool_calls.append(call)
        else:
            out.invalid_tool_calls.append(call)
    return out
