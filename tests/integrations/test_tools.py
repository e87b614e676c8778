"""Tool protocol, message preparation, parsing, and grammar-constrained decoding.

The grammar tests run on the tiny *random* model: it emits arbitrary tokens, so if its
output parses and validates, the grammar (not the model) is doing the work.
"""

from __future__ import annotations

import json
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from acd_engine import ConfigError, DecodingConfig, MessagesError
from acd_integrations._constrained import (
    LoopGuard,
    constraint_for,
    json_object_grammar,
    json_schema_grammar,
    strict_schema,
    tool_call_grammar,
)
from acd_integrations._tools import (
    TOOL_CALL_OPEN,
    ToolCall,
    ToolSpec,
    format_tool_call,
    normalise_tool_choice,
    normalise_tools,
    parse_tool_calls,
    prepare_messages,
    supports_native_tools,
    tools_system_prompt,
)

DIAL = ToolSpec(
    "set_dial",
    "Set a dial.",
    {
        "type": "object",
        "properties": {
            "level": {"type": "integer", "minimum": 0, "maximum": 9},
            "unit": {"enum": ["low", "high"]},
        },
        "required": ["level", "unit"],
    },
)


class Point(BaseModel):
    x: int = Field(ge=0, le=99)
    y: int = Field(ge=0, le=99)
    visible: bool
    colour: Literal["red", "green", "blue"]


# ---------------------------------------------------------------- tool specs and choice
def test_normalise_tools_accepts_openai_and_bare_dicts(weather_tool):
    specs = normalise_tools([weather_tool, {"name": "noop"}, DIAL])
    assert [s.name for s in specs] == ["get_weather", "noop", "set_dial"]
    assert specs[0].parameters["required"] == ["location"]
    assert specs[1].parameters == {"type": "object", "properties": {}}
    assert specs[0].to_openai() == {**weather_tool, "function": {**weather_tool["function"]}}


def test_normalise_tools_rejects_nameless_and_conflicting_tools(weather_tool):
    with pytest.raises(ConfigError, match=r"tools\[0\] must have a non-empty 'name'"):
        normalise_tools([{"description": "x"}])
    with pytest.raises(ConfigError, match="got two different definitions of 'noop'"):
        normalise_tools([{"name": "noop"}, {"name": "noop", "parameters": {"type": "string"}}])
    assert normalise_tools([weather_tool, weather_tool["function"]]) == normalise_tools(
        [weather_tool]
    )
    titled = {
        **weather_tool["function"],
        "parameters": {**weather_tool["function"]["parameters"], "title": "W"},
    }
    assert normalise_tools([weather_tool, titled]) == normalise_tools([weather_tool])  # titles only


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, ("auto", ("get_weather", "set_dial"))),
        ("auto", ("auto", ("get_weather", "set_dial"))),
        ("none", ("none", ())),
        ("any", ("required", ("get_weather", "set_dial"))),
        ("required", ("required", ("get_weather", "set_dial"))),
        (True, ("required", ("get_weather", "set_dial"))),
        ("set_dial", ("required", ("set_dial",))),
        ({"type": "function", "function": {"name": "get_weather"}}, ("required", ("get_weather",))),
    ],
)
def test_tool_choice_spellings(choice, expected, weather_tool):
    assert normalise_tool_choice(choice, normalise_tools([weather_tool, DIAL])) == expected


def test_unknown_tool_choice_suggests_a_tool(weather_tool):
    with pytest.raises(
        ConfigError, match="unknown tool_choice 'get_wether'; did you mean 'get_weather'"
    ):
        normalise_tool_choice("get_wether", normalise_tools([weather_tool]))


def test_template_tool_support_detection(engine):
    assert not supports_native_tools(engine.tokenizer.chat_template)  # SmolLM2 ignores tools
    assert supports_native_tools("{% if tools %}{{ tools | tojson }}{% endif %}")


def test_system_prompt_describes_tools_and_format(weather_tool):
    specs = normalise_tools([weather_tool, DIAL])
    auto = tools_system_prompt(specs, "auto", ("get_weather", "set_dial"))
    assert '"name": "get_weather"' in auto and TOOL_CALL_OPEN in auto
    assert "plain text" in auto
    forced = tools_system_prompt(specs, "required", ("set_dial",))
    assert "You must call the tool set_dial now." in forced
    assert tools_system_prompt(specs, "none", ()) == ""


# ---------------------------------------------------------------- message preparation
def test_prepare_merges_systems_and_same_role_turns():
    msgs = [
        {"role": "system", "content": "A"},
        {"role": "user", "content": "u1"},
        {"role": "system", "content": "B"},
        {"role": "user", "content": [{"type": "text", "text": "u2"}]},
        {"role": "assistant", "content": "a1"},
        {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "u3"},
    ]
    out = prepare_messages(msgs, instructions="FORMAT")
    assert out == [
        {"role": "system", "content": "A\n\nB\n\nFORMAT"},
        {"role": "user", "content": "u1\n\nu2"},
        {"role": "assistant", "content": "a1\n\na2"},
        {"role": "user", "content": "u3"},
    ]


def test_prepare_writes_tool_history_in_the_protocol():
    msgs = [
        {"role": "user", "content": "add 1 and 2"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
        {"role": "tool", "tool_call_id": "c1", "content": "boom", "status": "error"},
    ]
    out = prepare_messages(msgs)
    assert out[1] == {"role": "assistant", "content": format_tool_call("add", {"a": 1, "b": 2})}
    # Tool results become one user turn (named from the call id), errors labelled as such.
    assert out[2] == {
        "role": "user",
        "content": "Tool result for add (c1):\n3\n\nTool error for add (c1):\nboom",
    }
    native = prepare_messages(msgs, native_tools=True)
    assert native[1]["tool_calls"][0]["function"] == {"name": "add", "arguments": {"a": 1, "b": 2}}
    assert [m["role"] for m in native] == ["user", "assistant", "tool", "tool"]


def test_prepare_refuses_non_text_content_and_empty_conversations():
    with pytest.raises(MessagesError, match=r"must be text .* got 'image_url'"):
        prepare_messages([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])
    with pytest.raises(MessagesError, match="at least one user or assistant turn"):
        prepare_messages([{"role": "system", "content": "s"}])
    with pytest.raises(MessagesError, match=r"messages\[0\].role must be one of"):
        prepare_messages([{"role": "wizard", "content": "x"}])


# ---------------------------------------------------------------- parsing
def test_parse_calls_and_surrounding_text():
    text = "Sure.\n" + format_tool_call("get_weather", {"location": "Paris"})
    out = parse_tool_calls(text, ["get_weather"])
    assert out.text == "Sure."
    assert [(c.name, c.arguments) for c in out.tool_calls] == [
        ("get_weather", {"location": "Paris"})
    ]
    assert out.tool_calls[0].id.startswith("call_") and len(out.tool_calls[0].id) == 29


def test_parse_reports_broken_calls_as_invalid():
    truncated = TOOL_CALL_OPEN + '\n{"name": "get_weather", "arguments": {"loc'
    out = parse_tool_calls(truncated, ["get_weather"])
    assert out.tool_calls == [] and out.text == ""
    assert "must be valid JSON" in out.invalid_tool_calls[0].error
    unknown = parse_tool_calls(format_tool_call("get_wether", {}), ["get_weather"])
    assert "did you mean 'get_weather'" in unknown.invalid_tool_calls[0].error
    assert unknown.invalid_tool_calls[0].name == "get_wether"
    bad_args = parse_tool_calls(
        TOOL_CALL_OPEN + '{"name": "get_weather", "arguments": [1]}', ["get_weather"]
    )
    assert "arguments must be a JSON object" in bad_args.invalid_tool_calls[0].error


def test_parse_accepts_bare_json_calls_and_leaves_prose_alone():
    bare = parse_tool_calls(
        '{"name": "get_weather", "parameters": {"location": "Oslo"}}', ["get_weather"]
    )
    assert bare.tool_calls[0].arguments == {"location": "Oslo"}
    prose = parse_tool_calls('{"answer": 3}', ["get_weather"])
    assert prose.tool_calls == [] and prose.text == '{"answer": 3}'


# ---------------------------------------------------------------- grammars (tiny random model)
def test_strict_schema_forbids_extra_keys_unless_allowed():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {}}}}
    strict = strict_schema(schema)
    assert strict["additionalProperties"] is False
    assert strict["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # input untouched
    assert strict_schema({"type": "object", "additionalProperties": True})["additionalProperties"]


def test_bad_schema_fails_with_a_config_error(tiny_engine):
    with pytest.raises(ConfigError, match="schema must compile to a grammar"):
        constraint_for(tiny_engine.tokenizer, json_schema_grammar({"type": "nonsense"}), [2])


@pytest.mark.parametrize("seed", range(3))
def test_random_model_writes_schema_valid_json_under_the_grammar(tiny_engine, seed):
    schema = Point.model_json_schema()
    cfg = DecodingConfig(method="oid", temperature=1.0, seed=seed, max_new_tokens=60)
    free = tiny_engine.generate("point?", cfg)
    with pytest.raises(ValueError):
        Point.model_validate_json(free.text)  # without the grammar: garbage
    cons = constraint_for(
        tiny_engine.tokenizer, json_schema_grammar(schema), tiny_engine.eos_token_ids
    )
    out = tiny_engine.generate("point?", cfg, constraint=cons)
    assert out.finish_reason == "stop"
    Point.model_validate_json(out.text)
    assert cons[0].finished and cons[0].error is None


def test_json_object_grammar_gives_an_object(tiny_engine):
    cons = constraint_for(tiny_engine.tokenizer, json_object_grammar(), tiny_engine.eos_token_ids)
    out = tiny_engine.generate("obj", method="base", max_new_tokens=40, constraint=cons)
    assert out.text.startswith("{")  # the random model may not close it within 40 tokens


@pytest.mark.parametrize("seed", range(3))
def test_random_model_makes_valid_forced_tool_calls(tiny_engine, seed, weather_tool):
    specs = [*normalise_tools([weather_tool]), DIAL]
    grammar = tool_call_grammar(specs, "required", ["set_dial"])
    assert grammar is not None
    cons = constraint_for(tiny_engine.tokenizer, grammar, tiny_engine.eos_token_ids)
    cfg = DecodingConfig(method="oid", temperature=1.0, seed=seed, max_new_tokens=60)
    out = tiny_engine.generate("dial", cfg, constraint=cons)
    parsed = parse_tool_calls(out.text, ["get_weather", "set_dial"])
    assert parsed.invalid_tool_calls == [] and len(parsed.tool_calls) == 1
    call = parsed.tool_calls[0]
    assert isinstance(call, ToolCall) and call.name == "set_dial"
    assert set(call.arguments) == {"level", "unit"}
    assert 0 <= call.arguments["level"] <= 9 and call.arguments["unit"] in ("low", "high")


def test_auto_grammar_allows_text_or_a_call_but_never_a_loose_call(tiny_engine):
    grammar = tool_call_grammar([DIAL], "auto")
    assert grammar is not None and tool_call_grammar([DIAL], "none") is None
    ll_ids = tiny_engine.tokenizer.encode
    from acd_integrations._constrained import compile_grammar

    ll, compiled = compile_grammar(tiny_engine.tokenizer, grammar)
    from llguidance import LLMatcher

    def accepts(text: str) -> bool:
        m = LLMatcher(ll, compiled)
        ids = ll_ids(text, add_special_tokens=False)
        return m.validate_tokens(ids) == len(ids)

    assert accepts("Just prose, with <b>tags</b> too.")
    assert accepts(format_tool_call("set_dial", {"level": 3, "unit": "low"}))
    assert not accepts("Prose, then " + TOOL_CALL_OPEN)  # calls only come whole, first
    assert not accepts(TOOL_CALL_OPEN + '\n{"name": "set_dial", "arguments": {"level": 11')


def test_loop_guard_breaks_repeats_but_never_empties_the_choice():
    import torch

    structural = torch.zeros(10, dtype=torch.bool)
    structural[9] = True
    guard = LoopGuard(3, structural)
    scores = torch.zeros(1, 10)
    guard(torch.tensor([[0, 0]]), scores)  # prompt of length 2
    ids = torch.tensor([[0, 0, 1, 2, 3, 1, 2]])  # "1 2" seen before, followed by 3
    out = guard(ids, scores)
    assert out[0, 3] == float("-inf") and torch.isfinite(out[0, :3]).all()
    only3 = torch.full((1, 10), float("-inf"))
    only3[0, 3] = 0.0
    assert guard(ids, only3)[0, 3] == 0.0  # the only allowed token survives
    ids9 = torch.tensor([[0, 0, 1, 2, 9, 1, 2]])
    assert guard(ids9, scores)[0, 9] == 0.0  # JSON punctuation is exempt
    with pytest.raises(ConfigError, match="loop guard n must be >= 2, got 1"):
        LoopGuard(1, structural)


def test_constrained_output_is_parsed_json(tiny_engine):
    grammar = tool_call_grammar([DIAL], "required")
    assert grammar is not None
    cons = constraint_for(tiny_engine.tokenizer, grammar, tiny_engine.eos_token_ids)
    out = tiny_engine.generate("x", method="base", max_new_tokens=60, constraint=cons)
    body = out.text.split("\n")[1]
    assert json.loads(body)["name"] == "set_dial"
