"""Grammar-constrained decoding for tool calls and structured output, after the contrast.

Small models write broken JSON: a missing brace, a misspelt key, a trailing comment. Rather
than retrying and hoping, the engine's ``constraint=`` hook masks every token that would
make the output leave a grammar, so the text is valid by construction. The mask is applied
*after* the contrast (``logits_SP - alpha * logits_AP``) and before the plausibility filter
and the sampler, so ACD still chooses *which* valid continuation to write (the engine's
plausibility filter takes its maximum over the tokens the grammar still allows).

Library: `llguidance <https://github.com/guidance-ai/llguidance>`_ (MIT, one ~3 MB
abi3 wheel with no dependencies). It compiles JSON schemas and Lark grammars (with
``%json`` for embedded schemas), computes the 49k-token mask in about 0.1 ms per token on
this project's CPU box, and handles tokens that straddle grammar boundaries. Alternatives
considered: ``xgrammar`` 0.2.8 pulls in ``triton`` and ``apache-tvm-ffi`` (hundreds of MB,
of no use on CPU); ``lm-format-enforcer`` is pure Python, walking its parser over the
vocabulary at every step, which costs more per token on a 2-core machine.

Tool choice "auto" (see :func:`tool_call_grammar`): the grammar is ``TEXT | CALLS`` where
``TEXT`` is any non-empty text that does *not* contain ``<tool_call>``. The model's own
(contrasted) scores pick the first tokens, so it decides between prose and a call; once
it has written ``<tool_call>`` it can only finish a schema-valid call to a bound tool.

Loop guard: greedy decoding on a 135M model loops inside JSON strings until the token limit
truncates the object, so constrained requests also get a :class:`LoopGuard` (no repeated
3-gram of generated word tokens; JSON punctuation exempt).

This module imports no framework; it uses llguidance, numpy and torch only.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from acd_engine.errors import ConfigError
from acd_integrations._tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolMode, ToolSpec

__all__ = [
    "PROSE_GRAMMAR",
    "GrammarConstraint",
    "LoopGuard",
    "compile_grammar",
    "constraint_for",
    "json_object_grammar",
    "json_schema_grammar",
    "strict_schema",
    "tool_call_grammar",
]

logger = logging.getLogger(__name__)

# Compact, single-line JSON with the usual separators: small models otherwise pad JSON with
# whitespace until they hit the token limit, and ", " / ": " tokenise like normal prose.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_TOKENIZERS: dict[int, tuple[Any, Any]] = {}  # id(hf tokenizer) -> (hf tokenizer, LLTokenizer)
_TOKENIZERS_LOCK = threading.Lock()


def _ll_tokenizer(tokenizer: Any) -> Any:
    """llguidance's view of a Hugging Face tokenizer, built once per tokenizer (~1 s)."""
    import llguidance.hf

    with _TOKENIZERS_LOCK:
        hit = _TOKENIZERS.get(id(tokenizer))
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
        try:
            ll = llguidance.hf.from_tokenizer(tokenizer)
        except ValueError as exc:
            raise ConfigError(
                f"grammar-constrained decoding needs a fast (Rust) tokenizer, got "
                f"{type(tokenizer).__name__}: {exc}"
            ) from None
        _TOKENIZERS[id(tokenizer)] = (tokenizer, ll)  # keeps the tokenizer alive: ids stay unique
        return ll


def _with_options(schema: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(schema)
    out["x-guidance"] = {**_JSON_OPTIONS, **dict(schema.get("x-guidance", {}))}
    return out


def _lark_json(schema: Mapping[str, Any]) -> str:
    return "%json " + json.dumps(_with_options(schema), ensure_ascii=False)


def _lark_literal(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid Lark string literal


def json_schema_grammar(schema: Mapping[str, Any], *, strict: bool = True) -> str:
    """A grammar for one JSON value valid against ``schema`` (compact, one line).

    Args:
        schema: A JSON schema (``$defs``/``$ref``, ``anyOf``, enums, bounds are supported).
        strict: Forbid keys the schema does not list (see :func:`strict_schema`).
    """
    return "start: json_value\njson_value: " + _lark_json(
        strict_schema(schema) if strict else schema
    )


def json_object_grammar() -> str:
    """A grammar for any JSON object (``json_mode``)."""
    return json_schema_grammar({"type": "object"}, strict=False)


def strict_schema(schema: Any) -> Any:
    """A copy of ``schema`` where objects without ``additionalProperties`` get ``false``.

    JSON Schema allows extra keys by default, and a small model happily invents them
    (it copied ``"type": "integer"`` from the tool description into the arguments in our
    tests). OpenAI's strict mode makes the same choice. An explicit
    ``additionalProperties`` is kept as written.
    """
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _call_schema(tool: ToolSpec) -> dict[str, Any]:
    params = strict_schema(dict(tool.parameters) or {"type": "object", "properties": {}})
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


# A turn with tools bound but not callable (tool_choice "none", or the answer after a tool
# result): prose that never opens a call. Without it a small model imitates the call format
# it sees in the history instead of answering. It must also start with a word, not markup:
# otherwise the model opens with a tag of its own invention ("<tool_call_result>") instead
# of reading the result back to the user.
PROSE_GRAMMAR = (
    "start: TEXT\nTEXT: /[^<\\s](.|\\n)*/ & ~/(.|\\n)*"
    + re.escape(TOOL_CALL_OPEN[:-1]).replace("/", "\\/")
    + "(.|\\n)*/\n"
)


def tool_call_grammar(
    tools: Sequence[ToolSpec],
    mode: ToolMode,
    names: Sequence[str] | None = None,
    *,
    parallel: bool = False,
) -> str | None:
    """The grammar of one assistant turn when tools are bound.

    Args:
        tools: The bound tools.
        mode: ``"required"``: the turn is one call (or several when ``parallel``) and
            nothing else. ``"auto"``: either plain text or call(s); the model's first tokens
            decide (text may not contain ``<tool_call>``, so every call is constrained).
            ``"none"``: no grammar.
        names: The tools that may be called (default: all of ``tools``).
        parallel: Allow several calls in one turn, one per line.

    Returns:
        A Lark grammar for llguidance, or None when ``mode == "none"``.
    """
    if mode == "none":
        return None
    allowed = [t for t in tools if names is None or t.name in names]
    if not allowed:
        raise ConfigError(f"tool_choice must name a bound tool, got {list(names or [])}")
    schema: dict[str, Any]
    if len(allowed) == 1:
        schema = _call_schema(allowed[0])
    else:
        schema = {"anyOf": [_call_schema(t) for t in allowed]}
    call = (
        f"call: {_lark_literal(TOOL_CALL_OPEN + chr(10))} call_json "
        f"{_lark_literal(chr(10) + TOOL_CALL_CLOSE)}\ncall_json: {_lark_json(schema)}\n"
    )
    calls = 'calls: call ("\\n" call)*\n' if parallel else "calls: call\n"
    if mode == "required":
        return "start: calls\n" + calls + call
    # auto: prose that never opens a call (so no call escapes the grammar), or the call(s).
    text = f"TEXT: /(.|\\n)+/ & ~/(.|\\n)*{_regex_escape(TOOL_CALL_OPEN)}(.|\\n)*/\n"
    return "start: TEXT | calls\n" + calls + call + text


def _regex_escape(text: str) -> str:
    return re.escape(text).replace("/", "\\/")


def compile_grammar(tokenizer: Any, grammar: str) -> tuple[Any, Any]:
    """Check a Lark grammar against a tokenizer once; returns ``(LLTokenizer, grammar)``.

    Raises:
        ConfigError: The grammar (usually: a JSON schema inside it) does not compile.
    """
    ll = _ll_tokenizer(tokenizer)
    return ll, _validated(ll, grammar)


@lru_cache(maxsize=256)
def _validated(ll: Any, grammar: str) -> str:
    """Validate once per (tokenizer, grammar): a bound tool set is reused for many calls."""
    from llguidance import LLMatcher

    compiled = LLMatcher.grammar_from_lark(grammar)
    is_error, messages = LLMatcher.validate_grammar_with_warnings(compiled, ll)
    if is_error:
        raise ConfigError(f"schema must compile to a grammar, got error: {messages[0]}")
    for msg in messages:
        logger.debug("grammar warning: %s", msg)
    return str(compiled)


class GrammarConstraint(LogitsProcessor):
    """Masks every token that would leave the grammar; one instance per request.

    The engine calls it once per generated token with the conversation ids plus the tokens
    generated so far (``[1, L]``) and the contrasted scores (``[1, V]``). The first call
    records where generation starts; later calls feed the new tokens to the matcher. When
    the grammar is complete only EOS stays allowed, so the engine stops cleanly.

    If the matcher ever reaches an error state (it cannot with tokens it allowed, but a
    custom processor placed after it could pick a masked one) generation is ended with
    EOS and :attr:`error` says why, rather than raising inside the decode loop.
    """

    def __init__(self, ll_tokenizer: Any, grammar: str, eos_token_ids: Iterable[int]) -> None:
        from llguidance import LLMatcher

        self._matcher = LLMatcher(ll_tokenizer, grammar)
        if self._matcher.is_error():
            raise ConfigError(f"grammar must compile, got error: {self._matcher.get_error()}")
        self._vocab = int(ll_tokenizer.vocab_size)
        self._eos = [int(e) for e in eos_token_ids]
        self._start: int | None = None
        self._consumed = 0
        self.error: str | None = None

    @property
    def finished(self) -> bool:
        """Whether the output so far is a complete sentence of the grammar."""
        return bool(self._matcher.is_accepting())

    def _advance(self, input_ids: torch.Tensor) -> None:
        length = int(input_ids.shape[-1])
        if self._start is None:
            self._start = length
            return
        new = input_ids[0, self._start + self._consumed :].tolist()
        self._consumed += len(new)
        for token in new:
            if self.error is None and not self._matcher.consume_token(int(token)):
                self.error = self._matcher.get_error() or f"token {token} is not allowed"
                logger.warning("grammar constraint stopped generation: %s", self.error)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        self._advance(input_ids)
        allowed = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        if self.error is not None or self._matcher.is_error():
            allowed[self._eos] = True
        else:
            bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
            mask = np.unpackbits(bits, bitorder="little")[: min(self._vocab, scores.shape[-1])]
            allowed[: mask.shape[0]] = torch.from_numpy(mask.astype(bool)).to(scores.device)
        return scores.masked_fill(~allowed, float("-inf"))


_STRUCTURAL = frozenset('"{}[],:')
_STRUCTURAL_MASKS: dict[int, tuple[Any, torch.Tensor]] = {}


def _structural_mask(tokenizer: Any) -> torch.Tensor:
    """``[V]`` bool: tokens holding a JSON structural character (never loop-guarded)."""
    with _TOKENIZERS_LOCK:
        hit = _STRUCTURAL_MASKS.get(id(tokenizer))
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        mask = torch.tensor([bool(_STRUCTURAL & set(p or "")) for p in pieces])
        _STRUCTURAL_MASKS[id(tokenizer)] = (tokenizer, mask)
        return mask


class LoopGuard(LogitsProcessor):
    """Forbid repeating an n-gram of generated tokens, except JSON punctuation.

    Greedy decoding on a small model loops inside JSON strings (``"A cat is a cat, a cat
    is a cat, ..."``) until the token limit cuts the object off, and a truncated object is
    useless. Banning the token that would repeat an earlier ``n``-gram of *this answer*
    (the prompt is not looked at) breaks the loop and lets the string close. Tokens holding
    ``" { } [ ] , :`` are exempt so repeated JSON structure (arrays of objects) is never
    blocked, and a ban is skipped when it would leave no allowed token. Runs after the
    grammar mask, so it only chooses among grammar-valid tokens.
    """

    def __init__(self, n: int, structural: torch.Tensor) -> None:
        if n < 2:
            raise ConfigError(f"loop guard n must be >= 2, got {n}")
        self.n = n
        self._structural = structural
        self._start: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self._start is None:
            self._start = int(input_ids.shape[-1])
        gen = input_ids[0, self._start :].tolist()
        n = self.n
        if len(gen) < n:
            return scores
        prefix = gen[len(gen) - n + 1 :]
        banned = {gen[i + n - 1] for i in range(len(gen) - n + 1) if gen[i : i + n - 1] == prefix}
        banned = {t for t in banned if t >= self._structural.shape[0] or not self._structural[t]}
        if not banned:
            return scores
        out = scores.clone()
        out[0, sorted(banned)] = float("-inf")
        return out if bool(torch.isfinite(out).any()) else scores


def constraint_for(
    tokenizer: Any,
    grammar: str,
    eos_token_ids: Iterable[int],
    *,
    loop_guard: int | None = 3,
) -> LogitsProcessorList:
    """A fresh constraint for one request (the matcher is stateful: never share it).

    Args:
        tokenizer: The engine's Hugging Face tokenizer (``engine.tokenizer``).
        grammar: A Lark grammar from this module.
        eos_token_ids: The engine's ``eos_token_ids``; allowed once the grammar completes.
        loop_guard: ``n`` of the :class:`LoopGuard` (3 makes the default 135M model finish
            its JSON in our tests; without it greedy decoding loops inside strings), or
            None to turn it off.

    Returns:
        A ``LogitsProcessorList`` for ``engine.generate(..., constraint=...)``.
    """
    ll, compiled = compile_grammar(tokenizer, grammar)
    procs = LogitsProcessorList([GrammarConstraint(ll, compiled, eos_token_ids)])
    if loop_guard is not None:
        procs.append(LoopGuard(loop_guard, _structural_mask(tokenizer)))
    return procs
