"""One adapter call -> one engine call: the request core of ChatACD, ACDLLM and the server.

Every way into the engine from outside Python's own API (LangChain ``ChatACD``,
LlamaIndex ``ACDLLM``, the OpenAI-compatible server) has to do the same things before a
token is generated: split per-call keywords into decoding overrides and the rest, refuse
unknown keywords, validate the overrides with ``DecodingConfig``'s own messages, reduce
``tool_choice`` to a mode, pick the grammar (tool calls, prose, JSON), write the tool
protocol into the messages, and afterwards parse tool calls and report usage and the
method and alpha applied. Written once here, the three front ends cannot drift apart: an
unknown keyword is an error with a did-you-mean in all of them, and ``tool_choice="none"``
means the same everywhere (the turn is prose, constrained so that it never opens a call,
and no call is parsed out of it).

The front ends keep only their framework's plumbing: converting messages to OpenAI dicts
and turning :class:`CallOutcome` / :class:`CallDelta` into their own response types.

This module imports no framework.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from acd_engine.config import DecodingConfig, did_you_mean
from acd_engine.errors import ConfigError
from acd_engine.runtime.engine import Engine, StreamChunk, Usage
from acd_integrations._constrained import (
    PROSE_GRAMMAR,
    constraint_for,
    json_object_grammar,
    json_schema_grammar,
    tool_call_grammar,
)
from acd_integrations._params import PARAM_TO_FIELD, build_config, result_metadata, split_kwargs
from acd_integrations._tools import (
    TOOL_CALL_OPEN,
    InvalidToolCall,
    ToolCall,
    ToolChoice,
    ToolMode,
    ToolSpec,
    normalise_tool_choice,
    normalise_tools,
    parse_tool_calls,
    prepare_messages,
    supports_native_tools,
    tools_system_prompt,
)

__all__ = [
    "AdapterCall",
    "CallDelta",
    "CallOutcome",
    "FinishReason",
    "check_call_kwargs",
    "prepare_call",
    "response_format_grammar",
]

FinishReason = Literal["stop", "length", "tool_calls"]


def check_call_kwargs(
    kwargs: Mapping[str, Any], accepted: Collection[str], owner: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split per-call keywords into (decoding overrides, accepted others); refuse the rest.

    One policy for every front end: a keyword that is neither a decoding setting nor one
    the front end handles is an error with a did-you-mean, never silently dropped (a typo
    such as ``temprature=0`` would otherwise decode with the default and nobody would know).

    Args:
        kwargs: The per-call keywords.
        accepted: The non-decoding keywords this front end understands (``tools`` ...).
        owner: The front end's name for the message (``ChatACD``).

    Raises:
        ConfigError: ``unknown ChatACD call argument 'temprature'; did you mean ...``.
    """
    decoding, rest = split_kwargs(kwargs)
    unknown = [k for k in rest if k not in accepted]
    if unknown:
        known = [*PARAM_TO_FIELD, *accepted]
        raise ConfigError(did_you_mean(unknown[0], known, f"{owner} call argument"))
    return decoding, rest


def _schema_instructions(schema: Mapping[str, Any]) -> str:
    """Tell the model what to write; the grammar guarantees the form, this guides content."""
    props = schema.get("properties")
    if isinstance(props, Mapping) and props:
        lines = []
        for key, spec in props.items():
            kind = spec.get("type", "value") if isinstance(spec, Mapping) else "value"
            desc = spec.get("description", "") if isinstance(spec, Mapping) else ""
            lines.append(f"- {key} ({kind}){': ' + desc if desc else ''}")
        what = schema.get("description") or schema.get("title") or "the answer"
        return f"Reply with only a JSON object for {what}, with these fields:\n" + "\n".join(lines)
    return "Reply with only a JSON value matching this JSON schema:\n" + json.dumps(schema)


def response_format_grammar(fmt: Any) -> tuple[str, str]:
    """OpenAI ``response_format`` -> (instructions for the system prompt, grammar).

    ``{"type": "json_object"}`` allows any JSON object (a ``"schema"`` given next to it, as
    LangChain's ``json_mode`` does, is enforced too: an object the parser then rejects is
    no use); ``{"type": "json_schema", "json_schema": {"schema": ...}}`` enforces the schema.

    Raises:
        ConfigError: Another shape, or a schema that does not compile.
    """
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if kind == "json_object":
        schema = fmt.get("schema")
        if isinstance(schema, Mapping):
            return _schema_instructions(schema), json_schema_grammar(schema)
        return "Reply with only a JSON object.", json_object_grammar()
    if kind == "json_schema":
        spec = fmt.get("json_schema", {})
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if isinstance(schema, Mapping):
            return _schema_instructions(schema), json_schema_grammar(schema)
    raise ConfigError(
        "response_format must be {'type': 'json_object'} or {'type': 'json_schema', "
        f"'json_schema': {{'schema': {{...}}}}}}, got {fmt!r}"
    )


@dataclass(frozen=True)
class CallDelta:
    """A piece of answer text that is safe to show now (never part of a tool call)."""

    text: str


@dataclass(frozen=True)
class CallOutcome:
    """The finished answer, in the vocabulary every front end maps from.

    Attributes:
        text: The prose answer (tool-call blocks removed).
        raw_text: What the model wrote, untouched.
        tool_calls: Well-formed calls (empty unless tools were callable this turn).
        invalid_tool_calls: Calls the model attempted but got wrong.
        finish_reason: ``"tool_calls"`` when a call was made, else the engine's reason.
        usage: Prompt and completion tokens.
        metadata: Method, applied alpha, pack and gate, and the gate's verdict
            (``result_metadata``).
    """

    text: str
    raw_text: str
    tool_calls: list[ToolCall]
    invalid_tool_calls: list[InvalidToolCall]
    finish_reason: FinishReason
    usage: Usage
    metadata: dict[str, Any]


@dataclass
class AdapterCall:
    """One engine call, resolved and validated before any token is generated.

    Build it with :func:`prepare_call`; then :meth:`generate` (one result, coalesced with
    concurrent calls by the engine) or :meth:`stream` (deltas, then the outcome) runs it.
    """

    engine: Engine
    messages: list[dict[str, Any]]
    config: DecodingConfig
    tools: list[ToolSpec] = field(default_factory=list)
    mode: ToolMode = "none"
    names: tuple[str, ...] = ()
    grammar: str | None = None
    native_tools: list[dict[str, Any]] | None = None

    def engine_kwargs(self, cancel: threading.Event | None) -> dict[str, Any]:
        """Keyword arguments of the engine call (a fresh grammar matcher each time)."""
        constraint = None
        if self.grammar is not None:
            constraint = constraint_for(
                self.engine.tokenizer, self.grammar, self.engine.eos_token_ids
            )
        return {"tools": self.native_tools, "constraint": constraint, "cancel": cancel}

    def count_tokens(self) -> int:
        """The prompt tokens this call will use (its ``usage.prompt_tokens``)."""
        return self.engine.count_tokens(self.messages, self.config, tools=self.native_tools)

    def outcome(
        self,
        text: str,
        finish_reason: Literal["stop", "length"],
        usage: Usage,
        gate_score: float | None = None,
        gate_flagged: bool | None = None,
        *,
        parse: bool = True,
    ) -> CallOutcome:
        """Parse ``text`` for this call's tools (when callable) and assemble the outcome."""
        calls: list[ToolCall] = []
        invalid: list[InvalidToolCall] = []
        content = text
        if parse and self.mode != "none":
            parsed = parse_tool_calls(text, self.names)
            content, calls, invalid = parsed.text, parsed.tool_calls, parsed.invalid_tool_calls
        return CallOutcome(
            text=content,
            raw_text=text,
            tool_calls=calls,
            invalid_tool_calls=invalid,
            finish_reason="tool_calls" if calls else finish_reason,
            usage=usage,
            metadata=result_metadata(
                self.config, gate_score, gate_flagged, self.engine.pack_report(self.config)
            ),
        )

    def generate(self, cancel: threading.Event | None = None) -> CallOutcome:
        """Run the call to the end (``Engine.generate``: concurrent calls share forwards)."""
        out = self.engine.generate(self.messages, self.config, **self.engine_kwargs(cancel))
        return self.outcome(
            out.text, out.finish_reason, out.usage, out.gate_score, out.gate_flagged
        )

    def stream(self, cancel: threading.Event | None = None) -> Iterator[CallDelta | CallOutcome]:
        """Text deltas as they come, then the outcome; tool-call text is never a delta.

        With tool choice ``auto`` the first characters decide: text that cannot be the
        start of ``<tool_call>`` streams as it comes; a call is held back and arrives
        parsed in the outcome (the grammar guarantees it is complete). Closing the
        iterator stops the decode before its next token.
        """
        state = {"none": "text", "auto": "undecided", "required": "call"}[self.mode]
        sent = ""  # text already handed out as deltas
        held = ""  # text that may be (part of) a tool call
        last: StreamChunk | None = None
        chunks = self.engine.stream_chunks(self.messages, self.config, **self.engine_kwargs(cancel))
        try:
            for sc in chunks:
                if sc.finish_reason is not None:
                    last = sc
                    held += sc.text
                    break
                if state == "text":
                    if sc.text:
                        sent += sc.text
                        yield CallDelta(sc.text)
                    continue
                held += sc.text
                if state == "undecided":
                    if held.startswith(TOOL_CALL_OPEN):
                        state = "call"
                    elif not TOOL_CALL_OPEN.startswith(held):
                        state = "text"
                        sent, held = held, ""
                        yield CallDelta(sent)
        finally:
            chunks.close()
        if last is None or last.usage is None or last.finish_reason is None:
            raise RuntimeError("the engine's stream ended without its closing chunk")
        if state == "text" and held:
            yield CallDelta(held)
        outcome = self.outcome(
            sent + held, last.finish_reason, last.usage, *self._gate(last), parse=state != "text"
        )
        if state != "text" and outcome.text:
            yield CallDelta(outcome.text)  # prose next to a call is still answer text
        yield outcome

    @staticmethod
    def _gate(last: StreamChunk) -> tuple[float | None, bool | None]:
        return (last.gate.score, last.gate.flagged) if last.gate else (None, None)


def prepare_call(
    engine: Engine,
    messages: Sequence[Mapping[str, Any]],
    *,
    base: DecodingConfig | None,
    decoding: Mapping[str, Any],
    owner: str,
    tools: Sequence[Mapping[str, Any] | ToolSpec] = (),
    tool_choice: ToolChoice = None,
    parallel_tool_calls: bool = False,
    response_format: Mapping[str, Any] | None = None,
    answer_after_tool_result: bool = False,
    require_pack: bool = False,
) -> AdapterCall:
    """Resolve one adapter call: config, tool mode, grammar and the messages to render.

    Args:
        engine: The engine that will run it.
        messages: OpenAI-style messages (the front end converts its own types first).
        base: The front end's configured defaults; per-call ``decoding`` goes on top.
        decoding: Per-call decoding overrides in adapter names (``max_tokens``, ``alpha``).
        owner: The front end's name in error messages.
        tools: Bound tools (OpenAI dicts or :class:`ToolSpec`).
        tool_choice: Any spelling :func:`normalise_tool_choice` accepts.
        parallel_tool_calls: Allow several calls in one turn.
        response_format: OpenAI ``response_format`` (not together with tools).
        answer_after_tool_result: With ``tool_choice`` auto, answer in prose when the last
            message is a tool result (small models otherwise call the same tool in a loop).
        require_pack: Refuse a method that needs a trained pack the engine lacks, whatever
            the engine's own ``require_pack`` (the server's ``--require-pack`` over an
            engine it was handed).

    Raises:
        ConfigError: A bad setting, tool choice, response format or schema.
        PromptPackError: The method needs a trained pack and one is required.
    """
    config = build_config(decoding, base=base, owner=owner)
    # Before anything is generated, so a refusal is an error response rather than a broken
    # stream, and the no-pack warning is logged by the call that meets it first.
    engine.pack_for(config, require=require_pack)
    specs = normalise_tools(list(tools))
    raw = [dict(m) for m in messages]
    if specs and response_format:
        raise ConfigError(
            "tools and response_format must not be combined in one call, got both; ask for "
            "a forced tool call instead to get arguments that follow a schema"
        )
    call = AdapterCall(engine, [], config, specs)
    instructions = ""
    if specs:
        call.mode, call.names = normalise_tool_choice(tool_choice, specs)
        if call.mode == "auto" and answer_after_tool_result and raw and raw[-1]["role"] == "tool":
            call.mode, call.names = "none", ()
        if call.mode == "none":
            # Tools bound but not callable: prose that never opens a call. Without the
            # grammar a small model imitates the call format it sees in the history.
            call.grammar = PROSE_GRAMMAR
        else:
            instructions = tools_system_prompt(specs, call.mode, call.names)
            call.grammar = tool_call_grammar(
                specs, call.mode, call.names, parallel=parallel_tool_calls
            )
            if supports_native_tools(getattr(engine.tokenizer, "chat_template", None)):
                call.native_tools = [t.to_openai() for t in specs]
    elif response_format:
        instructions, call.grammar = response_format_grammar(response_format)
    call.messages = prepare_messages(
        raw,
        tools=specs,
        mode=call.mode,
        names=call.names,
        native_tools=call.native_tools is not None,
        instructions=instructions,
    )
    return call
