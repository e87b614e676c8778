"""The decoding methods: one registered entry each, and the names derived from them.

Every method is "a positive branch, optionally minus alpha times a negative branch", where a
branch is whatever fills the system-prompt slot in front of the identical user conversation.
So a method is fully described by *where its two branches come from* (a
:data:`BranchSource` each) plus whether the pack's safety gate routes it; everything the
engine asks about a method (does it contrast, does it need the prompt pack, does it read the
request's own prompts) follows from those fields, so it can never disagree with them.

Adding a method is one :class:`DecodingMethod` in :data:`BUILTIN_METHODS` and its name in
:data:`Method` (a static ``Literal`` because pydantic and type checkers need one; a test
asserts it lists exactly the registry). Code outside the package (a plugin, a test) calls
:func:`register_method` and can decode with the new name at once: ``DecodingConfig``
validates method names against the live registry. :func:`acd_engine.safety.contrast.plan_branches`
turns an entry's sources into the branches a request runs.

This module imports nothing else from the package but its errors, so ``config.py`` (which
validates method names) can depend on it without a cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, get_args

from acd_engine.errors import ConfigError

__all__ = [
    "BUILTIN_METHODS",
    "CONTRAST_METHODS",
    "METHODS",
    "METHOD_REGISTRY",
    "BranchSource",
    "DecodingMethod",
    "Method",
    "one_of",
    "register_method",
    "unregister_method",
]

Method = Literal["plain", "base", "nid", "oid", "acd", "custom"]
"""The built-in method names, for pydantic fields and type checkers (equal to
:data:`METHODS`; ``tests/engine/test_methods.py`` keeps the two from drifting)."""

BranchSource = Literal[
    "template", "empty", "safe", "opposite", "positive_prompt", "negative_prompt", "sp", "ap"
]
"""Where a branch comes from. ``template``: the model's own chat template, untouched (no
system-slot branch at all; a lone positive only). ``empty``: the system slot left blank.
``safe`` / ``opposite``: the manual safe / opposite prompt (:mod:`acd_engine.safety.prompts`).
``positive_prompt`` / ``negative_prompt``: the request's own prompt text (the positive one
defaults to the safe prompt; the negative one is required). ``sp`` / ``ap``: the prompt
pack's soft safeguarding / adversarial prompt."""

BRANCH_SOURCES: tuple[str, ...] = get_args(BranchSource)
PACK_SOURCES = frozenset({"sp", "ap"})
PROMPT_SOURCES = frozenset({"positive_prompt", "negative_prompt"})


def one_of(names: tuple[str, ...] | list[str]) -> str:
    """``'a', 'b' or 'c'``: pydantic's wording for a choice, used in every method message."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


@dataclass(frozen=True)
class DecodingMethod:
    """One decoding method: where its branches come from and what that means for the engine.

    Attributes:
        name: What users pass as ``method`` (no spaces or commas: the CLI and the eval take
            comma-separated lists of methods).
        description: What it contrasts, one phrase; joined into ``DecodingConfig.method``'s
            field description, which adapters and ``--help`` show.
        positive: The positive branch's source.
        negative: The negative branch's source, or None for a single-branch method.
        gated: Whether the prompt pack's safety gate routes requests (``DecodingConfig.gate``):
            flagged ones run the method, the others ``gate_passed_method``'s branch. Only for
            methods that read the pack, whose gate was fitted alongside its soft prompts.
    """

    name: str
    description: str
    positive: BranchSource
    negative: BranchSource | None = None
    gated: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or any(c in self.name for c in " ,"):
            raise ConfigError(
                f"name must be a non-empty string without spaces or commas, got {self.name!r}"
            )
        if not isinstance(self.description, str) or not self.description.strip():
            raise ConfigError(f"description must be a non-empty string, got {self.description!r}")
        if self.positive not in BRANCH_SOURCES:
            raise ConfigError(
                f"positive must be one of {one_of(BRANCH_SOURCES)}, got {self.positive!r}"
            )
        if self.negative is not None and self.negative not in BRANCH_SOURCES:
            raise ConfigError(
                f"negative must be one of {one_of(BRANCH_SOURCES)} or None, got {self.negative!r}"
            )
        if "template" in self.sources and self.negative is not None:
            # A request's rows share one rendering of the conversation: the template's own,
            # or the tail after the system slot; never one of each.
            raise ConfigError(
                "negative must be None when positive is 'template' and 'template' cannot be a "
                f"negative branch, got positive={self.positive!r}, negative={self.negative!r}"
            )
        if self.gated and not self.uses_pack:
            raise ConfigError(
                "gated must be False for a method that reads no prompt pack (sp or ap), got True"
            )

    @property
    def sources(self) -> tuple[BranchSource, ...]:
        """The sources of its branches, positive first."""
        return (self.positive,) if self.negative is None else (self.positive, self.negative)

    @property
    def contrastive(self) -> bool:
        """Whether it runs two branches (``pos - alpha * neg``); alpha is ignored otherwise."""
        return self.negative is not None

    @property
    def uses_pack(self) -> bool:
        """Whether its branches read the prompt pack (so the engine resolves one)."""
        return not PACK_SOURCES.isdisjoint(self.sources)

    @property
    def takes_prompts(self) -> bool:
        """Whether it reads the request's ``positive_prompt`` / ``negative_prompt``."""
        return not PROMPT_SOURCES.isdisjoint(self.sources)


BUILTIN_METHODS: tuple[DecodingMethod, ...] = (
    # The baseline every other method is measured against.
    DecodingMethod("plain", "the model as shipped, no added system prompt.", "template"),
    # The manual prompt on its own: what prompting alone buys.
    DecodingMethod("base", "manual safe system prompt, one branch.", "safe"),
    # Instructive decoding: steer away from what the model does unprompted.
    DecodingMethod("nid", "safe prompt minus no prompt.", "safe", "empty"),
    # ROSE (arXiv:2402.11889): steer away from what an opposite prompt elicits.
    DecodingMethod("oid", "safe prompt minus manual opposite prompt (ROSE).", "safe", "opposite"),
    # The paper (arXiv:2406.16743): both prompts learned (OPO), so the gap is widest.
    DecodingMethod(
        "acd",
        "soft safeguarding prompt minus soft adversarial prompt (the paper).",
        "sp",
        "ap",
        gated=True,
    ),
    # The same contrast with the caller's own texts.
    DecodingMethod(
        "custom", "positive_prompt minus negative_prompt.", "positive_prompt", "negative_prompt"
    ),
)

_REGISTRY: dict[str, DecodingMethod] = {m.name: m for m in BUILTIN_METHODS}
METHOD_REGISTRY: Mapping[str, DecodingMethod] = MappingProxyType(_REGISTRY)
"""Every registered method by name, in registration order (a read-only view: change it
through :func:`register_method` / :func:`unregister_method`)."""

METHODS: tuple[str, ...] = tuple(m.name for m in BUILTIN_METHODS)
"""The built-in method names, in declaration order."""
CONTRAST_METHODS: frozenset[str] = frozenset(m.name for m in BUILTIN_METHODS if m.contrastive)
"""Built-in methods that run two branches (positive minus alpha times negative)."""


def register_method(method: DecodingMethod) -> DecodingMethod:
    """Add ``method`` to the registry; ``DecodingConfig(method=name)`` accepts it from now on.

    Returns ``method``, so a module can keep the entry it registered. A taken name is
    refused rather than replaced: two meanings for one name would make records and results
    that carry it ambiguous.
    """
    if not isinstance(method, DecodingMethod):
        raise ConfigError(f"method must be a DecodingMethod, got {type(method).__name__}")
    if method.name in _REGISTRY:
        raise ConfigError(f"method {method.name!r} is already registered; choose another name")
    _REGISTRY[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a method added with :func:`register_method` (built-in methods stay)."""
    if name in METHODS:
        raise ConfigError(f"method {name!r} is built in and cannot be unregistered")
    if _REGISTRY.pop(name, None) is None:
        raise ConfigError(f"method {name!r} is not registered")
