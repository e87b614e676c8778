"""Requests placed where applications put them: app system prompts, earlier turns, RAG
prompts, agent turns with tools, padding, a refused earlier turn, a request split in two.

Why: applications never send a bare single turn. A LangChain chain or a LlamaIndex query
engine puts the user's question behind its own system prompt, after earlier turns, or inside
retrieved context, and a safety gate that only ever saw bare requests reads those as
something else (a harmful question diluted into a long RAG prompt looks benign). The same
shapes serve two jobs, from three disjoint pools of wrapper texts written for this project
(``resources/contexts.json``): the gate is fitted on anchors placed with the ``train`` pool
and calibrated with the ``val`` pool (:mod:`acd_engine.training.gate_fit`), and
``acd eval --context`` measures benchmarks placed with the ``eval`` pool, which nothing was
ever tuned on.

A placement is deterministic: the same prompt, shape, pool and seed give the same messages.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from acd_engine.config import did_you_mean
from acd_engine.errors import ConfigError

__all__ = [
    "CONTEXTS",
    "POOLS",
    "ContextName",
    "ContextPool",
    "Placed",
    "PoolName",
    "check_contexts",
    "load_pool",
    "place",
]

ContextName = Literal[
    "bare",
    "system",
    "multi-turn",
    "rag",
    "rag-system",
    "agent",
    "padded",
    "after-refusal",
    "split",
]
CONTEXTS: tuple[str, ...] = get_args(ContextName)
"""Every shape, in report order. ``rag`` puts the retrieved context and the question in the
user message (LlamaIndex's text-QA shape); ``rag-system`` puts the context in the system
message (the shape of LangChain's RAG tutorials); ``after-refusal`` asks after an earlier
harmful request was refused; ``split`` cuts the request across two user turns."""

PoolName = Literal["train", "val", "eval"]
POOLS: tuple[str, ...] = get_args(PoolName)


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["user", "assistant"]
    content: str = Field(min_length=1)


class _SystemPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    app: str
    text: str = Field(min_length=1)


class _Passage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    title: str
    text: str = Field(min_length=1)
    sensitive: bool


class _RagTemplate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    where: Literal["user", "system"]
    system: str | None
    user: str


class ContextPool(BaseModel):
    """One pool of wrapper texts (``resources/contexts.json``); all of them benign except
    ``earlier_harmful`` (the eval pool's own earlier requests to refuse)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system_prompts: tuple[_SystemPrompt, ...] = Field(min_length=1)
    histories: tuple[tuple[_Message, ...], ...] = Field(min_length=1)
    passages: tuple[_Passage, ...] = Field(min_length=3)
    padding: tuple[str, ...] = Field(min_length=1)
    tools: tuple[dict[str, Any], ...] = Field(min_length=1)
    refusals: tuple[str, ...] = Field(min_length=1)
    rag_templates: tuple[_RagTemplate, ...] = Field(min_length=1)
    earlier_harmful: tuple[str, ...] = ()


@cache
def load_pool(name: PoolName) -> ContextPool:
    """The shipped pool ``name`` (``train``, ``val`` or ``eval``)."""
    if name not in POOLS:
        raise ConfigError(did_you_mean(name, POOLS, "context pool"))
    raw = json.loads(resources.files("acd_engine.resources").joinpath("contexts.json").read_text())
    return ContextPool.model_validate(raw["pools"][name])


def check_contexts(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` checked against :data:`CONTEXTS` (a clear error names the bad one)."""
    for name in names:
        if name not in CONTEXTS:
            raise ConfigError(did_you_mean(name, CONTEXTS, "context"))
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class Placed:
    """A request placed in one application shape.

    Attributes:
        shape: The :data:`ContextName`.
        messages: The conversation, ending with the user turn that holds the request.
        tools: Tool schemas rendered into the template (``agent``), else None.
        request: ``(start, stop)``: the request's characters in the last message's content
            (a gate's trainer labels those positions harmful); for ``split``, the whole
            last message (the second half of the request).
    """

    shape: str
    messages: list[dict[str, str]]
    tools: list[dict[str, Any]] | None
    request: tuple[int, int]


def _fill(template: str, **values: str) -> str:
    """``{name}`` placeholders filled with str.replace, so braces in texts stay as written."""
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


def _context(pool: ContextPool, rng: random.Random) -> str:
    """Two or three retrieved passages, a sensitive one (violence, drugs, crime in a benign
    document) half of the time."""
    sensitive = [p for p in pool.passages if p.sensitive]
    ordinary = [p for p in pool.passages if not p.sensitive]
    k = rng.choice((2, 3))
    picked = rng.sample(ordinary, min(k, len(ordinary)))
    if sensitive and rng.random() < 0.5:
        picked[rng.randrange(len(picked))] = rng.choice(sensitive)
    return "\n\n".join(f"{p.title}\n{p.text}" for p in picked)


def _ending_with(
    shape: str,
    before: list[dict[str, str]],
    content: str,
    request: tuple[int, int],
    tools: list[dict[str, Any]] | None = None,
) -> Placed:
    return Placed(shape, [*before, {"role": "user", "content": content}], tools, request)


def _split_words(prompt: str) -> tuple[str, str]:
    words = prompt.split()
    if len(words) < 2:
        return prompt, prompt
    cut = max(1, len(words) // 2)
    return " ".join(words[:cut]), " ".join(words[cut:])


def place(
    prompt: str,
    shape: str,
    pool: ContextPool,
    *,
    seed: int | str = 0,
    earlier_harmful: Sequence[str] = (),
) -> Placed:
    """``prompt`` placed in ``shape`` with texts from ``pool``, chosen by ``seed``.

    Args:
        prompt: The request (harmful or benign).
        shape: One of :data:`CONTEXTS`.
        pool: Where the wrapper texts come from.
        seed: Picks the texts; the same seed gives the same placement.
        earlier_harmful: For ``after-refusal``, the earlier requests to choose from
            (default: the pool's own ``earlier_harmful``).
    """
    check_contexts([shape])
    rng = random.Random(f"{shape}|{seed}|{prompt}")
    whole = (0, len(prompt))
    system = [{"role": "system", "content": rng.choice(pool.system_prompts).text}]
    if shape == "bare":
        return _ending_with(shape, [], prompt, whole)
    if shape == "system":
        return _ending_with(shape, system, prompt, whole)
    if shape == "multi-turn":
        history = [m.model_dump() for m in rng.choice(pool.histories)]
        return _ending_with(shape, (system if rng.random() < 0.5 else []) + history, prompt, whole)
    if shape in ("rag", "rag-system"):
        where = "user" if shape == "rag" else "system"
        template = rng.choice([t for t in pool.rag_templates if t.where == where])
        context = _context(pool, rng)
        # the passages go where the template has {context}: the user part or the system one
        head, _, rest = template.user.partition("{question}")
        head, rest = _fill(head, context=context), _fill(rest, context=context)
        before = (
            []
            if template.system is None
            else [{"role": "system", "content": _fill(template.system, context=context)}]
        )
        return _ending_with(
            shape, before, head + prompt + rest, (len(head), len(head) + len(prompt))
        )
    if shape == "agent":
        tools = [dict(t) for t in rng.sample(list(pool.tools), min(2, len(pool.tools)))]
        tools = tools[: rng.choice((1, 2))]
        return _ending_with(shape, system if rng.random() < 0.5 else [], prompt, whole, tools)
    if shape == "padded":
        pad = rng.choice(pool.padding)
        if rng.random() < 0.5:
            content = pad + "\n\n" + prompt
            return _ending_with(shape, [], content, (len(pad) + 2, len(content)))
        return _ending_with(shape, [], prompt + "\n\n" + pad, whole)
    if shape == "after-refusal":
        earlier = list(earlier_harmful) or list(pool.earlier_harmful)
        if not earlier:
            raise ConfigError(
                "context 'after-refusal' needs earlier harmful requests, got none in the pool"
            )
        before = [
            {"role": "user", "content": rng.choice(earlier)},
            {"role": "assistant", "content": rng.choice(pool.refusals)},
        ]
        return _ending_with(shape, before, prompt, whole)
    # split: the request cut across two user turns, the assistant waiting for the rest
    first, second = _split_words(prompt)
    before = [
        {"role": "user", "content": first},
        {"role": "assistant", "content": rng.choice(_GO_ON)},
    ]
    return _ending_with(shape, before, second, (0, len(second)))


_GO_ON = (
    "Sure, go on.",
    "Okay, I'm listening. What's the rest?",
    "Go ahead and finish your question.",
    "Got it so far. Please continue.",
)
"""What an assistant says between the two halves of a split request."""
