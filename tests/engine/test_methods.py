"""The method registry: one entry per method, and everything else derived from it.

Drift tests keep the static ``Method`` literal, ``METHODS``, ``CONTRAST_METHODS``, the CLI's
help and ``DecodingConfig``'s field description equal to the registry; an oracle table (the
paper's, written out by hand) checks the branches each built-in method runs; and a method
registered in one place decodes exactly like the same branches spelled as ``custom``.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import get_args

import pytest
import torch

from acd_engine import (
    OPPOSITE_PROMPT,
    SAFE_PROMPT,
    ConfigError,
    DecodingConfig,
    DecodingMethod,
    register_method,
    unregister_method,
)
from acd_engine.config import CONTRAST_METHODS, METHODS, Method
from acd_engine.methods import BUILTIN_METHODS, METHOD_REGISTRY
from acd_engine.safety.contrast import plan_branches

BUILT_IN = ("plain", "base", "nid", "oid", "acd", "custom")


def test_the_literal_and_the_derived_names_are_the_registry():
    assert get_args(Method) == tuple(METHOD_REGISTRY) == METHODS == BUILT_IN
    assert tuple(m.name for m in BUILTIN_METHODS) == METHODS
    assert {n for n, m in METHOD_REGISTRY.items() if m.contrastive} == CONTRAST_METHODS
    assert {"nid", "oid", "acd", "custom"} == CONTRAST_METHODS
    assert [n for n, m in METHOD_REGISTRY.items() if m.uses_pack or m.gated] == ["acd"]
    assert [n for n, m in METHOD_REGISTRY.items() if m.takes_prompts] == ["custom"]
    description = DecodingConfig.model_fields["method"].description or ""
    for method in BUILTIN_METHODS:
        assert f"'{method.name}': {method.description}" in description


def test_cli_help_lists_every_method():
    from typer.testing import CliRunner

    from acd_engine.cli.main import app

    out = CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "200"}).output
    assert " | ".join(METHODS) in out


def _text(branch) -> tuple[str, str | None] | None:
    return None if branch is None else (branch.kind, branch.text)


@pytest.mark.parametrize(
    ("method", "extra", "positive", "negative"),
    [  # The paper's table: positive branch, negative branch.
        ("plain", {}, None, None),
        ("base", {}, ("text", SAFE_PROMPT), None),
        ("nid", {}, ("text", SAFE_PROMPT), ("empty", None)),
        ("oid", {}, ("text", SAFE_PROMPT), ("text", OPPOSITE_PROMPT)),
        ("custom", {"negative_prompt": "N"}, ("text", SAFE_PROMPT), ("text", "N")),
        ("custom", {"positive_prompt": "P", "negative_prompt": "N"}, ("text", "P"), ("text", "N")),
    ],
)
def test_each_text_method_plans_the_papers_branches(method, extra, positive, negative):
    plan = plan_branches(DecodingConfig(method=method, **extra), None)
    assert (_text(plan.positive), _text(plan.negative)) == (positive, negative)
    assert plan.n_branches == (2 if method in CONTRAST_METHODS else 1)


def test_acd_plans_the_packs_soft_prompts_and_needs_a_pack():
    pack = SimpleNamespace(sp=torch.zeros(2, 4), ap=torch.ones(2, 4), id="p1")
    plan = plan_branches(DecodingConfig(method="acd"), pack)  # type: ignore[arg-type]
    assert plan.positive is not None and plan.negative is not None
    assert (plan.positive.kind, plan.positive.key, plan.negative.key) == ("soft", "sp:p1", "ap:p1")
    assert plan.positive.soft is pack.sp and plan.negative.soft is pack.ap
    with pytest.raises(ConfigError, match="method 'acd' needs a prompt pack; the engine supplies"):
        plan_branches(DecodingConfig(method="acd"), None)


@pytest.fixture()
def registered() -> Iterator[list[str]]:
    """Names registered during the test; unregistered afterwards whatever happens."""
    names: list[str] = []
    yield names
    for name in names:
        unregister_method(name)
    assert tuple(METHOD_REGISTRY) == BUILT_IN


def _register(names: list[str], *args, **kwargs) -> DecodingMethod:
    method = register_method(DecodingMethod(*args, **kwargs))
    names.append(method.name)
    return method


def test_a_method_registered_in_one_place_decodes(tiny_engine, registered):
    _register(registered, "reverse-oid", "opposite prompt minus safe prompt.", "opposite", "safe")
    _register(registered, "base-twin", "manual safe system prompt, one branch.", "safe")
    assert DecodingConfig(method="reverse-oid").is_contrastive
    assert DecodingConfig(method="base-twin", alpha=0.4).effective_alpha == 0.0

    prompts = ["hi", "a longer question here"]
    spelled_out = DecodingConfig(
        method="custom",
        positive_prompt=OPPOSITE_PROMPT,
        negative_prompt=SAFE_PROMPT,
        alpha=0.4,
        max_new_tokens=6,
    )
    new = tiny_engine.generate_batch(prompts, method="reverse-oid", alpha=0.4, max_new_tokens=6)
    want = tiny_engine.generate_batch(prompts, spelled_out)
    assert [r.token_ids for r in new] == [r.token_ids for r in want]
    assert [(r.method, r.alpha) for r in new] == [("reverse-oid", 0.4)] * 2

    tiny_engine.set_options(fast_path=False)
    try:  # the reference decoder reads the same entry
        ref = tiny_engine.generate("hi", method="reverse-oid", alpha=0.4, max_new_tokens=6)
    finally:
        tiny_engine.set_options(fast_path=True)
    assert ref.token_ids == new[0].token_ids

    twin = tiny_engine.generate("hi", method="base-twin", alpha=0.4, max_new_tokens=6)
    base = tiny_engine.generate("hi", method="base", max_new_tokens=6)
    assert (twin.token_ids, twin.alpha) == (base.token_ids, 0.0)


def test_unregistered_names_are_refused_again(registered):
    _register(registered, "tmp", "safe prompt minus no prompt.", "safe", "empty")
    with pytest.raises(ConfigError, match="'custom' or 'tmp', got 'zzz'"):
        DecodingConfig(method="zzz")
    unregister_method(registered.pop())
    with pytest.raises(
        ConfigError,
        match=r"method must be one of 'plain', 'base', 'nid', 'oid', 'acd' or 'custom', got 'tmp'",
    ):
        DecodingConfig(method="tmp")


def test_request_prompts_follow_the_entry(registered):
    _register(registered, "neg-only", "safe prompt minus your prompt.", "safe", "negative_prompt")
    with pytest.raises(ConfigError, match="negative_prompt is required when method='neg-only'"):
        DecodingConfig(method="neg-only")
    plan = plan_branches(DecodingConfig(method="neg-only", negative_prompt="N"), None)
    assert (_text(plan.positive), _text(plan.negative)) == (("text", SAFE_PROMPT), ("text", "N"))
    with pytest.raises(
        ConfigError,
        match="positive_prompt must be None for method='neg-only', which does not read it, got 'P'",
    ):
        DecodingConfig(method="neg-only", positive_prompt="P", negative_prompt="N")
    with pytest.raises(
        ConfigError,
        match="only used with method='custom' or method='neg-only', got method='oid'",
    ):
        DecodingConfig(method="oid", negative_prompt="N")


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("acd", "again.", "safe"), {}, "method 'acd' is already registered; choose another name"),
        (
            ("", "x.", "safe"),
            {},
            "name must be a non-empty string without spaces or commas, got ''",
        ),
        (("a,b", "x.", "safe"), {}, "without spaces or commas, got 'a,b'"),
        (("x", " ", "safe"), {}, "description must be a non-empty string, got ' '"),
        (("x", "x.", "soft"), {}, "positive must be one of 'template', 'empty', 'safe', "),
        (("x", "x.", "safe", "rose"), {}, "negative must be one of 'template', .* or None, got"),
        (("x", "x.", "template", "empty"), {}, "negative must be None when positive is 'template'"),
        (("x", "x.", "safe", "template"), {}, "'template' cannot be a negative branch"),
        (("x", "x.", "safe", "empty"), {"gated": True}, "gated must be False for a method that"),
    ],
)
def test_bad_entries_are_refused_with_the_rule(args, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        register_method(DecodingMethod(*args, **kwargs))
    assert tuple(METHOD_REGISTRY) == BUILT_IN


def test_built_in_methods_cannot_be_unregistered_or_replaced():
    with pytest.raises(ConfigError, match="method 'acd' is built in and cannot be unregistered"):
        unregister_method("acd")
    with pytest.raises(ConfigError, match="method 'nope' is not registered"):
        unregister_method("nope")
    with pytest.raises(ConfigError, match="method must be a DecodingMethod, got dict"):
        register_method({"name": "x"})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        METHOD_REGISTRY["x"] = METHOD_REGISTRY["acd"]  # type: ignore[index]
