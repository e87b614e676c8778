"""The public object: one engine owns a model, its tokenizer, a prompt pack and a lock.

This is the only module that renders chat templates. A request is rendered once with a
sentinel in the system-prompt slot; the text is split there into a head and a tail that
every branch shares token for token, and each branch fills the slot with its own content
(nothing, a manual prompt, or soft-prompt embeddings).
"""

from __future__ import annotations

import json
import logging
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, Field
from transformers import LogitsProcessorList

from acd_engine._compat import cache_arg
from acd_engine.batching import RowInput, fast_path_supported, pack_rows
from acd_engine.coalesce import Coalescer, Pending
from acd_engine.config import DecodingConfig, ModelConfig, check_text
from acd_engine.contrast import Branch, BranchPlan, plan_branches
from acd_engine.decoding import Prefill, RowRequest, decode, decode_rows
from acd_engine.errors import ConfigError, MessagesError, PromptPackError, PromptTooLongError
from acd_engine.gate import (
    GateVerdict,
    RowGate,
    SafetyGate,
    applied_alpha,
    capture_last_states,
    features_of,
    gate_threshold,
)
from acd_engine.head import linear_head
from acd_engine.loading import LoadedModel, load_model
from acd_engine.prefix_cache import PrefixCache, PrefixKV, compute_prefix_kv
from acd_engine.prepack import (
    PLAN_ROWS,
    Prepacked,
    PrepackedLinear,
    prepack_fits,
    prepack_plan,
    shared_prepacked,
)
from acd_engine.prompts import PromptPack, model_fingerprint
from acd_engine.skinny import SkinnyLinear, skinny_plan
from acd_engine.step import continuation_logprob

__all__ = [
    "Engine",
    "GenerationResult",
    "Messages",
    "StreamChunk",
    "Usage",
    "get_engine",
]

logger = logging.getLogger(__name__)

Messages = str | Sequence[dict[str, Any]]
ROLES = ("system", "user", "assistant", "tool")
# Markers placed in the rendered template text. A random part chosen per process means no
# user text can collide with them (a fixed marker typed by a user broke rendering).
_NONCE = secrets.token_hex(8)
_SENTINEL = f"@@ACD_SLOT_{_NONCE}@@"  # the system-prompt slot where branch prompts go
_PLACEHOLDER = f"@@ACD_TEXT_{_NONCE}_"  # + index + "@@": message text kept out of the template
_DEFAULT_PACKS = "packs"  # folder in acd_engine/resources holding shipped packs


class Usage(BaseModel):
    """Token counts of one request (positive branch prompt; generated tokens)."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class GenerationResult(BaseModel):
    """What one request produced."""

    text: str = Field(description="The answer, stop string excluded.")
    token_ids: list[int] = Field(description="Generated token ids (EOS excluded).")
    finish_reason: Literal["stop", "length"] = Field(
        description="'stop' on EOS or a stop string, 'length' at max_new_tokens."
    )
    usage: Usage
    method: str
    alpha: float = Field(
        description="The alpha applied (0 for single-branch methods and for requests the "
        "safety gate routed to the plain template)."
    )
    gate_score: float | None = Field(
        default=None,
        description="The safety gate's probability that the request is harmful (None when "
        "the request was not gated: another method, gate=False, or a pack without a gate).",
    )
    gate_flagged: bool | None = Field(
        default=None,
        description="Whether the gate flagged the request (decoded with SP - alpha * AP) "
        "rather than routing it to the model's own template.",
    )


@dataclass
class StreamChunk:
    """One piece of a stream; the last one carries ``finish_reason`` and ``usage``."""

    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"] | None = None
    usage: Usage | None = None
    gate: GateVerdict | None = None  # on the last chunk of a gated request


@dataclass
class _Rendered:
    """A request split around the system-prompt slot (token ids, shared by all branches)."""

    head: list[int]
    tail: list[int]
    plain: list[int] | None  # the template rendered untouched, for method 'plain'


_NO_BRANCH = Branch("empty", key="empty")  # an empty system slot adds nothing to a prefix


def _control_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """Matches any string the tokenizer turns into an added (control) token, longest first."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    words = sorted({t.content for t in added.values() if t.content}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, words))) if words else None


def _leading(ids: list[int], start: list[int]) -> list[int]:
    """``start`` when ``ids`` begins with it and goes on past it, else ``[]``."""
    return start if len(ids) > len(start) and ids[: len(start)] == start else []


def _normalise_messages(messages: Messages) -> list[dict[str, str]]:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, Sequence) or len(messages) == 0:
        raise MessagesError(
            "messages must be a non-empty list of {'role', 'content'} dicts or a string, got "
            f"{messages!r}"
        )
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise MessagesError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}"
            )
        if m["role"] not in ROLES:
            raise MessagesError(
                f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m['role']!r}"
            )
        if not isinstance(m["content"], str):
            raise MessagesError(
                f"messages[{i}].content must be a string, got {type(m['content']).__name__}"
            )
        check_text(m["content"], f"messages[{i}].content", MessagesError)
        out.append({**m})
    return out


def _stop_prefix_overlap(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class _Answer:
    """The text side of one answer: EOS, stop strings, and how much may be streamed yet.

    Shared by streaming and batched generation so both produce the same text. Text is held
    back while it could still be the start of a stop string or ends in an incomplete
    multi-byte character.
    """

    def __init__(self, tokenizer: Any, eos_ids: frozenset[int], stops: Sequence[str]) -> None:
        self.tokenizer, self.eos_ids, self.stops = tokenizer, eos_ids, stops
        self.longest = max((len(s) for s in stops), default=0)
        self.ids: list[int] = []
        self.emitted = ""  # text already handed out; always a prefix of the final text
        self.final: str | None = None  # set when a stop string cut the text
        self.finish: Literal["stop", "length"] = "length"
        self.done = False

    def stop(self) -> None:
        """End the answer before the next token (cancelled)."""
        self.finish, self.done = "stop", True

    def push(self, token: int) -> str:
        """Add one generated token; return the text that became safe to hand out."""
        if token in self.eos_ids:
            self.stop()
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        start = max(0, len(self.emitted) - self.longest)
        hits = [i for s in self.stops if (i := text.find(s, start)) >= 0]
        if hits:
            self.final = text[: min(hits)]
            self.stop()
            return ""
        ready = len(text.rstrip("\ufffd"))  # never split a multi-byte character
        ready -= _stop_prefix_overlap(text[:ready], self.stops)
        if ready > len(self.emitted) and text.startswith(self.emitted):
            delta, self.emitted = text[len(self.emitted) : ready], text[:ready]
            return delta
        return ""

    def rest(self) -> str:
        """Once the answer is over: the text not handed out yet."""
        if self.final is None:
            self.final = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(self.final) > len(self.emitted) and self.final.startswith(self.emitted):
            return self.final[len(self.emitted) :]
        return ""


def _first_request(steps: Generator[dict[int, int], None, None]) -> Generator[int, None, None]:
    """The token stream of request 0 of a fast batch (closing this closes ``steps``)."""
    try:
        for picked in steps:
            yield picked[0]
    finally:
        steps.close()


class CancelFlag(Protocol):
    """Anything with ``is_set()``: a ``threading.Event``, or several combined."""

    def is_set(self) -> bool: ...


class _AnyEvent:
    """Set when any of its events is (the caller's cancel, or the stream being closed)."""

    def __init__(self, *events: CancelFlag | None) -> None:
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


@dataclass
class _Call:
    """One request, as queued for coalescing.

    ``sink`` receives its stream chunks as they are ready (streaming calls); ``streamed``
    records that it received any, so a failed batch never reruns a call whose reader has
    already seen part of an answer.
    """

    messages: Messages
    config: DecodingConfig
    tools: Sequence[dict[str, Any]] | None
    constraint: LogitsProcessorList | None
    cancel: CancelFlag | None
    sink: Callable[[StreamChunk], None] | None = None
    streamed: bool = False

    def emit(self, chunk: StreamChunk) -> None:
        """Hand one chunk to the sink."""
        if self.sink is not None:
            self.streamed = True
            self.sink(chunk)


def _closing_chunks(
    answer: _Answer, prompt_tokens: int, verdict: GateVerdict | None = None
) -> Iterator[StreamChunk]:
    """The end of a stream: the text held back, then ``finish_reason``, ``usage``, gate."""
    rest = answer.rest()
    if rest:
        yield StreamChunk(rest, [])
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=len(answer.ids))
    yield StreamChunk("", answer.ids, finish_reason=answer.finish, usage=usage, gate=verdict)


def _gate_facts(request: RowRequest, prompt_tokens: int) -> tuple[int, GateVerdict | None]:
    """A decoded request's prompt tokens and gate verdict (known once its prefill ran)."""
    gate = request.gate
    if gate is None or gate.verdict is None:
        return prompt_tokens, None
    return (prompt_tokens if gate.verdict.flagged else gate.benign_prompt_tokens), gate.verdict


def _result(
    text: str,
    last: StreamChunk,
    config: DecodingConfig,
) -> GenerationResult:
    """A request's result from its text and its stream's last chunk (finish reason, usage,
    gate verdict): one place decides what a result reports, for lone and batched calls."""
    assert last.finish_reason is not None and last.usage is not None
    verdict = last.gate
    flagged = None if verdict is None else verdict.flagged
    return GenerationResult(
        text=text,
        token_ids=last.token_ids,
        finish_reason=last.finish_reason,
        usage=last.usage,
        method=config.method,
        alpha=applied_alpha(config, flagged),
        gate_score=None if verdict is None else verdict.score,
        gate_flagged=flagged,
    )


class Engine:
    """Safer generation for one local chat model.

    Thread-safe: a lock serialises requests, so concurrent callers never interleave state.
    Use :func:`get_engine` to share one engine (and one copy of the weights) per process.

    Args:
        model: Local HF model directory, ``.gguf`` file, or None for the embedded default.
        device: ``"auto"`` (CUDA if present), ``"cpu"``, ``"cuda"`` or ``"mps"``.
        dtype: ``"auto"`` (bf16 on CUDA, fp32 on CPU), ``"float32"``, ``"bfloat16"``, ...
        pack: Prompt pack for ``method="acd"``: a path, a :class:`PromptPack`, or None for
            the pack shipped for this model (else the manual-prompt initialisation).
        trust_remote_code: Allow model code from the model directory to run.
        defaults: Decoding settings used when a call passes none.
        fast_path: Decode through cached SP/AP prefixes and batched rows (the default).
            False runs the reference path, which re-embeds and left-pads every branch; both
            give the same tokens under greedy decoding.
        compile_step: ``torch.compile`` the decode step over a static KV cache (CUDA graphs
            on CUDA). None (default) compiles on CUDA only; on CPU it measured no faster
            (see docs/performance.md).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        pack: str | Path | PromptPack | None = None,
        trust_remote_code: bool = False,
        defaults: DecodingConfig | None = None,
        fast_path: bool = True,
        compile_step: bool | None = None,
    ) -> None:
        self.model_config = ModelConfig(
            model=None if model is None else str(model),
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
        self.loaded: LoadedModel = load_model(self.model_config)
        self.defaults = defaults or DecodingConfig()
        self._pack_source = pack
        self._pack: PromptPack | None = None
        self._fingerprint: dict[str, str] | None = None
        self._lock = threading.RLock()
        eos = self.loaded.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(int(e) for e in eos_ids)
        self.fast_path = fast_path
        self.compile_step = compile_step
        # Requests per batched forward in generate_batch / continuations per forward in
        # score_continuations: 2 rows each for contrast methods.
        self.max_batch_requests = 8
        self.prefix_cache = PrefixCache()
        self._coalescer: Coalescer[GenerationResult] = Coalescer(
            self._run_calls, self._lock, lambda: self.max_batch_requests
        )
        self._fast_supported: bool | None = None
        self._compiled_step: Callable[..., Any] | None = None
        self._static_caches: dict[tuple[int, int], Any] = {}  # reused by compiled decoding
        # CPU decode steps as W @ x.T (acd_engine.skinny) for steps of at most this many
        # rows: None measures once per model up to where that is faster here; 0 turns it off.
        self.skinny_rows: int | None = None
        self.skinny_pad_block = 0  # zero-pad skinny products to this block (measured with rows)
        # CPU decode steps of at least this many rows (batches) multiply by oneDNN-prepacked
        # copies of the weights (acd_engine.prepack): None measures once per model, the first
        # time a step has that many rows, whether and from where that is faster here (and
        # checks the copy fits in memory); 0 turns it off.
        self.prepack_rows: int | None = None
        self._prepacked: Prepacked | None = None
        self._constants: dict[str, list[int]] = {}  # see _template_constant
        self._control_re = _control_pattern(self.tokenizer)  # see encode_data
        # Contrast hidden states before a linear LM head (acd_engine.head) in eager decoding:
        # one head row per contrast request instead of two. False keeps two.
        self.contrast_before_head = True

    # ------------------------------------------------------------------ properties
    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def model_name(self) -> str:
        return self.loaded.name

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def context_window(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "max_position_embeddings", 0) or self.tokenizer.model_max_length)

    @property
    def fingerprint(self) -> dict[str, str]:
        """The model's fingerprint (computed once; hashes the embedding matrix)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model, self.tokenizer)
        return self._fingerprint

    @property
    def pack(self) -> PromptPack:
        """The SP/AP pack used by ``method="acd"`` (resolved on first use)."""
        with self._lock:
            if self._pack is None:
                self._pack = self._resolve_pack(self._pack_source)
            return self._pack

    def _resolve_pack(self, source: str | Path | PromptPack | None) -> PromptPack:
        if isinstance(source, PromptPack):
            source.check_compatible(self.fingerprint)
            return source
        if source is not None:
            pack = PromptPack.load(source)
            pack.check_compatible(self.fingerprint, source=f"prompt pack '{source}'")
            return pack
        shipped = resources.files("acd_engine") / "resources" / _DEFAULT_PACKS
        if shipped.is_dir():
            for entry in sorted(shipped.iterdir(), key=lambda e: e.name):
                if not entry.name.endswith(".safetensors"):
                    continue
                with resources.as_file(entry) as file:
                    pack = PromptPack.load(file)
                try:
                    pack.check_compatible(self.fingerprint)
                except PromptPackError:
                    continue
                logger.info("using shipped prompt pack %s", entry.name)
                return pack
        logger.info(
            "no trained prompt pack for %s; acd uses soft prompts initialised from the manual "
            "prompts (numerically the same as oid) - train one with `acd train`",
            self.model_name,
        )
        return PromptPack.from_manual_prompts(
            self.model, self.tokenizer, fingerprint=self.fingerprint
        )

    def set_pack(self, pack: str | Path | PromptPack | None) -> None:
        """Swap the prompt pack (checked against this model) for later requests."""
        with self._lock:
            self._pack = self._resolve_pack(pack)

    # ------------------------------------------------------------------ rendering
    def _encode(self, text: str) -> list[int]:
        """Template text: control-token strings in it become control tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _has_control(self, text: str) -> bool:
        return self._control_re is not None and self._control_re.search(text) is not None

    def encode_data(self, text: str) -> list[int]:
        """Token ids of user text as data: ``<|im_end|>`` typed by a user stays plain text.

        Text without any control-token string takes the ordinary path, so its tokens are the
        ones the model was trained on; only text that spells a control token is tokenized
        with special tokens split into ordinary pieces.
        """
        if not self._has_control(text):
            return self._encode(text)
        return list(
            self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        )

    def _protect(self, text: str, fills: dict[str, str]) -> str:
        """``text`` itself, or a placeholder (remembered in ``fills``) if it spells a control
        token, so the template renders around it and :meth:`_encode_rendered` encodes it as
        data."""
        if not self._has_control(text):
            return text
        key = f"{_PLACEHOLDER}{len(fills)}@@"
        fills[key] = text
        return key

    def _encode_rendered(self, text: str, fills: dict[str, str]) -> list[int]:
        """Template text with placeholders: the template's own parts as template text (its
        control tokens stay control tokens), each placeholder's user text as data."""
        if not fills:
            return self._encode(text)
        ids: list[int] = []
        for piece in re.split("(" + "|".join(map(re.escape, fills)) + ")", text):
            if piece in fills:
                ids += self.encode_data(fills[piece])
            elif piece:
                ids += self._encode(piece)
        return ids

    def _template(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise MessagesError(
                f"model {self.model_name} has no chat template; use a chat/instruct model"
            )
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **kwargs
        )
        return str(text)

    def render(self, messages: Messages, **template_kwargs: Any) -> _Rendered:
        """Render once; split around the system-prompt slot so every branch shares the rest.

        The user's own system message is kept, after the branch prompt. Templates that
        refuse a system role get the slot at the start of the first user message. Message
        text is data: text that spells a control token (``<|im_start|>system``) is rendered
        through a placeholder and tokenized as plain text, so no user can forge a turn.
        """
        msgs = _normalise_messages(messages)
        fills: dict[str, str] = {}
        safe = [{**m, "content": self._protect(m["content"], fills)} for m in msgs]
        user_system = safe[0]["content"] if safe[0]["role"] == "system" else None
        rest = safe[1:] if user_system is not None else safe
        slot = _SENTINEL + ("\n\n" + user_system if user_system else "")
        try:
            text = self._template([{"role": "system", "content": slot}, *rest], **template_kwargs)
        except MessagesError:
            raise
        except Exception as exc:  # jinja raises anything; a template without a system role
            first = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
            if first is None:
                raise MessagesError(
                    f"messages must be accepted by the chat template of {self.model_name}, got "
                    f"an error from it: {exc}"
                ) from None
            rest = [dict(m) for m in rest]
            rest[first]["content"] = slot + "\n\n" + rest[first]["content"]
            text = self._template_or_error(rest, template_kwargs)
        if text.count(_SENTINEL) != 1:
            raise MessagesError(
                "chat template dropped the system prompt slot; cannot place branches"
            )
        head, tail = text.split(_SENTINEL)
        plain = self._encode_rendered(self._template_or_error(safe, template_kwargs), fills)
        return _Rendered(
            self._encode_rendered(head, fills), self._encode_rendered(tail, fills), plain
        )

    def _template_or_error(self, messages: list[dict[str, str]], kwargs: dict[str, Any]) -> str:
        """:meth:`_template`, with the template's own errors (role order, say) as input errors."""
        try:
            return self._template(messages, **kwargs)
        except MessagesError:
            raise
        except Exception as exc:  # jinja's TemplateError and whatever a template raises
            raise MessagesError(
                f"messages must be accepted by the chat template of {self.model_name}, got an "
                f"error from it: {exc}"
            ) from None

    def count_tokens(
        self,
        messages: Messages,
        config: DecodingConfig | None = None,
        *,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> int:
        """The prompt tokens a request would use: ``usage.prompt_tokens`` before decoding.

        Counts the positive branch as rendered for ``config``'s method (its system prompt or
        soft prompt included), so framework token budgets (LangChain's trimming, LlamaIndex
        memory) see what the model will read. No forward runs.
        """
        cfg = config or self.defaults
        template_kwargs = {"tools": list(tools)} if tools else {}
        with self._lock:
            rendered = self.render(messages, **template_kwargs)
            positive = self.plan(cfg).positive
        if positive is None:
            assert rendered.plain is not None
            return len(rendered.plain)
        if positive.kind == "text":
            assert positive.text is not None
            content = len(self.encode_data(positive.text))
        elif positive.kind == "soft":
            assert positive.soft is not None
            content = int(positive.soft.shape[0])
        else:
            content = 0
        return len(rendered.head) + content + len(rendered.tail)

    def _embed(self, ids: list[int]) -> torch.Tensor:
        emb = self.model.get_input_embeddings()
        return emb(torch.tensor(ids, dtype=torch.long, device=emb.weight.device))  # [T, H]

    def _prefix_embeds(self, head: list[int], branch: Branch) -> torch.Tensor:
        """``[P, H]``: the template head then the branch content, the part shared by every
        request of the branch (and what the prefix cache stores the KV of)."""
        parts = [self._embed(head)]
        if branch.kind == "text":
            assert branch.text is not None
            parts.append(self._embed(self.encode_data(branch.text)))
        elif branch.kind == "soft":
            assert branch.soft is not None
            weight = self.model.get_input_embeddings().weight
            parts.append(branch.soft.to(device=weight.device, dtype=weight.dtype))
        return torch.cat(parts, dim=0)

    def _branch_embeds(self, rendered: _Rendered, branch: Branch | None) -> torch.Tensor:
        """``[T, H]`` input embeddings of one branch, in the model's dtype (reference path)."""
        if branch is None:
            assert rendered.plain is not None
            return self._embed(rendered.plain)
        prefix = self._prefix_embeds(rendered.head, branch)
        return torch.cat([prefix, self._embed(rendered.tail)], dim=0)

    def branch_inputs(
        self, messages: Messages, config: DecodingConfig, **template_kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Left-padded ``[R, T, H]`` embeddings, ``[R, T]`` mask, and the shared ids."""
        rendered = self.render(messages, **template_kwargs)
        plan = plan_branches(config, self.pack if config.method == "acd" else None)
        rows = [self._branch_embeds(rendered, plan.positive)]
        if plan.negative is not None:
            rows.append(self._branch_embeds(rendered, plan.negative))
        length = max(r.shape[0] for r in rows)
        hidden = rows[0].shape[1]
        embeds = rows[0].new_zeros(len(rows), length, hidden)
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=embeds.device)
        for i, r in enumerate(rows):
            embeds[i, length - r.shape[0] :] = r
            mask[i, length - r.shape[0] :] = 1
        shared = rendered.plain if plan.positive is None else rendered.tail
        assert shared is not None
        return embeds, mask, shared

    # ------------------------------------------------------------------ generation
    def _config(self, config: DecodingConfig | None, overrides: dict[str, Any]) -> DecodingConfig:
        base = config or self.defaults
        return base.replace(**overrides) if overrides else base

    def _use_fast_path(self) -> bool:
        if not self.fast_path:
            return False
        if self._fast_supported is None:
            self._fast_supported = fast_path_supported(self.model)
            if not self._fast_supported:
                logger.info(
                    "%s has sliding-window, linear or non-SDPA attention: using the reference "
                    "decode path",
                    self.model_name,
                )
        return self._fast_supported

    def _use_static_cache(self) -> bool:
        """Compiled decoding needs fixed shapes: a static KV cache (CUDA by default)."""
        if self.compile_step is None:
            return self.device.type == "cuda"
        return self.compile_step

    def _step_fn(self) -> Callable[..., Any]:
        """The decode-step forward for static caches: ``torch.compile`` with CUDA graphs.

        transformers' own compiled call (``get_compiled_call``, mode "reduce-overhead") over
        its ``StaticCache``, the combination ``generate`` uses for static-cache decoding. A
        failure to compile is raised once with the way out, then decoding stays eager.
        """
        if self._compiled_step is None:
            from transformers import CompileConfig

            compiled = self.model.get_compiled_call(CompileConfig())

            def step(**inputs: Any) -> Any:
                try:
                    return compiled(**inputs)
                except Exception as exc:
                    self.compile_step = False
                    self._compiled_step = None
                    raise RuntimeError(
                        f"torch.compile of the decode step failed ({type(exc).__name__}: "
                        f"{exc}); later requests decode eagerly. Pass "
                        "Engine(compile_step=False) to skip compiling"
                    ) from exc

            self._compiled_step = step
        return self._compiled_step

    def _step_context(
        self, static: bool
    ) -> Callable[[int, int], AbstractContextManager[Any]] | None:
        """What wraps each eager CPU forward: the matmul kernel measured fastest here.

        The returned function takes a forward's rows and tokens per row. Forwards of at
        least ``prepack_rows`` rows (a batch: its prefill too) use prepacked weights;
        one-token steps of at most ``skinny_rows`` rows skinny matmuls; others the
        ordinary kernel (no mode: it would only add its per-op Python dispatch).
        """
        if static or self.device.type != "cpu":
            return None
        if self.skinny_rows is None:
            self.skinny_rows, self.skinny_pad_block = skinny_plan(self.model)
        limit, block = self.skinny_rows, self.skinny_pad_block
        if limit <= 0 and self.prepack_rows == 0:
            return None

        def context(rows: int, width: int) -> AbstractContextManager[Any]:
            packs = self._prepacked_for(rows)
            if packs is not None:
                return PrepackedLinear(packs)
            return SkinnyLinear(limit, block) if width == 1 and rows <= limit else nullcontext()

        return context

    def _prepacked_for(self, rows: int) -> Prepacked | None:
        """The prepacked weights if a step of ``rows`` rows should use them (made on first need)."""
        if self.prepack_rows == 0 or rows < PLAN_ROWS[0]:
            return None
        if self.prepack_rows is None:
            if prepack_fits(self.model):
                skinny = (self.skinny_rows or 0, self.skinny_pad_block)
                self.prepack_rows = prepack_plan(self.model, skinny)
            else:
                logger.info("no prepacked weights: a copy would take too much of the free memory")
                self.prepack_rows = 0
        if not self.prepack_rows or rows < self.prepack_rows:
            return None
        if self._prepacked is None:
            self._prepacked = shared_prepacked(self.model)
        return self._prepacked

    def _prefix_kv(
        self, head: list[int], branch: Branch, stub: list[int] | None = None
    ) -> PrefixKV | None:
        """The cached KV of ``head + branch content + stub`` (None when all are empty)."""
        stub = stub or []
        if not head and branch.kind == "empty" and not stub:
            return None

        def compute() -> PrefixKV:
            embeds = self._prefix_embeds(head, branch)
            if stub:
                embeds = torch.cat([embeds, self._embed(stub)], dim=0)
            return compute_prefix_kv(self.model, embeds)

        return self.prefix_cache.get((branch.key, tuple(head), tuple(stub)), compute)

    def _template_constant(
        self, part: Literal["tail", "plain"], template_kwargs: dict[str, Any]
    ) -> list[int]:
        """The template tokens every ``part`` starts with, when the chat opens with a user turn.

        ``tail``: what follows the system slot, ``<|im_end|>\n<|im_start|>user\n`` for
        ChatML. ``plain``: the untouched template's start, e.g. SmolLM2's default system
        prompt and the user header. Both are the same for every request without a system
        message of its own, so their KV is cached (with the branch prefix, or alone for
        method ``plain``) and prefill skips them. Found once by rendering two different
        one-word chats and keeping their common start. A request that does not start with
        exactly these ids (a system message of its own, or a tokenizer that merged the last
        one with the user's text) keeps its whole sequence.
        """
        if template_kwargs:  # tools change the template text; not worth a cache entry each
            return []
        if part not in self._constants:
            try:
                first, second = (getattr(self.render(w), part) or [] for w in ("Hi", "Why"))
            except MessagesError:  # a template that cannot place the slot: nothing shared
                first, second = [], []
            common = 0
            while common < min(len(first), len(second)) and first[common] == second[common]:
                common += 1
            self._constants[part] = first[:common]
        return self._constants[part]

    def _request_rows(
        self, messages: Messages, config: DecodingConfig, **template_kwargs: Any
    ) -> tuple[list[RowInput], list[int]]:
        """Fast-path rows of one request (positive branch first) and its shared ids.

        Each row is its branch's cached prefix (head + branch content + the tail's template
        stub) followed by the rest of the conversation tail: the same sequence
        :meth:`branch_inputs` embeds from scratch. Method ``plain`` caches the template's
        constant start the same way.
        """
        rendered = self.render(messages, **template_kwargs)
        return self._rows_of(rendered, self.plan(config), template_kwargs)

    def _rows_of(
        self, rendered: _Rendered, plan: BranchPlan, template_kwargs: dict[str, Any]
    ) -> tuple[list[RowInput], list[int]]:
        """:meth:`_request_rows` for an already rendered request and a branch plan."""
        rows: list[RowInput] = []
        for branch in (plan.positive, plan.negative)[: plan.n_branches]:
            if branch is None:  # method 'plain': the untouched template
                assert rendered.plain is not None
                start = _leading(rendered.plain, self._template_constant("plain", template_kwargs))
                prefix = self._prefix_kv(start, _NO_BRANCH)  # the KV of `start` alone
                rows.append(RowInput(prefix, rendered.plain[len(start) :]))
            else:
                stub = _leading(rendered.tail, self._template_constant("tail", template_kwargs))
                prefix = self._prefix_kv(rendered.head, branch, stub)
                rows.append(RowInput(prefix, rendered.tail[len(stub) :]))
        shared = rendered.plain if plan.positive is None else rendered.tail
        assert shared is not None
        return rows, shared

    # ------------------------------------------------------------------ the safety gate
    def active_gate(self, config: DecodingConfig) -> SafetyGate | None:
        """The gate that routes requests decoded with ``config`` (None: no routing)."""
        if config.method != "acd" or not config.gate:
            return None
        return self.pack.gate

    def gate_features(self, messages: Messages, layers: Sequence[int]) -> torch.Tensor:
        """``[1, F]``: the gate's features of one request, from a forward of its plain
        rendering (what the fast path captures inside its prefill; used for fitting, for
        the reference path and for scoring)."""
        rendered = self.render(messages)
        assert rendered.plain is not None
        ids = torch.tensor([rendered.plain], device=self.device)
        with self._lock, torch.inference_mode(), capture_last_states(self.model, layers) as st:
            self.model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return features_of(st)

    def gate_verdict(self, messages: Messages, config: DecodingConfig) -> GateVerdict | None:
        """The gate's verdict on one request (a forward of its own; None when not gated)."""
        gate = self.active_gate(config)
        if gate is None:
            return None
        score = float(gate.probability(self.gate_features(messages, gate.layers)))
        return GateVerdict(score, gate_threshold(config, gate))

    def _plan_request(
        self,
        messages: Messages,
        cfg: DecodingConfig,
        constraint: LogitsProcessorList | None,
        first_row: int,
        template_kwargs: dict[str, Any],
    ) -> tuple[list[RowInput], RowRequest, int, int]:
        """One request's fast-path rows, placed from row ``first_row`` of a batch.

        A gated request (:meth:`active_gate`) gets a third row, its plain rendering: the
        prefill scores the gate on it, and the request then keeps either its two contrast
        rows (flagged) or that row alone (:class:`~acd_engine.gate.RowGate`).

        Returns:
            Its rows, its :class:`RowRequest`, its prompt tokens (positive branch) and the
            max_new_tokens it may use (clamped to the context window).
        """
        with torch.inference_mode():
            rendered = self.render(messages, **template_kwargs)
            rows, shared = self._rows_of(rendered, self.plan(cfg), template_kwargs)
            gate = self.active_gate(cfg)
            row_gate = None
            if gate is not None:
                plain, _ = self._rows_of(rendered, BranchPlan(None, None), template_kwargs)
                n = len(rows)
                row_gate = RowGate(
                    gate,
                    gate_threshold(cfg, gate),
                    probe_row=first_row + n,
                    flagged_rows=list(range(first_row, first_row + n)),
                    benign_rows=[first_row + n],
                    benign_prompt_tokens=plain[0].prefix_len + len(plain[0].tail),
                )
                rows += plain
        longest = max(r.prefix_len + len(r.tail) for r in rows)
        limit = self._fit_context(longest, cfg).max_new_tokens
        context = torch.tensor([shared], device=self.device)
        n_rows = len(rows) - (row_gate is not None)
        request = RowRequest(
            list(range(first_row, first_row + n_rows)), context, constraint, row_gate
        )
        return rows, request, rows[0].prefix_len + len(rows[0].tail), limit

    def _decode_packed(
        self,
        rows: list[RowInput],
        requests: list[RowRequest],
        cfg: DecodingConfig,
        finished: set[int] | None = None,
    ) -> Generator[dict[int, int], None, None]:
        """Pack ``rows`` into one cache and decode ``requests`` over them (lock held)."""
        static = self._use_static_cache()
        with torch.inference_mode():
            batch = pack_rows(
                self.model, rows, cfg.max_new_tokens, static=static, static_pool=self._static_caches
            )
        return decode_rows(
            self.model,
            batch,
            requests,
            cfg,
            finished,
            self._step_fn() if static else None,
            step_context=self._step_context(static),
            head=None if static or not self.contrast_before_head else linear_head(self.model),
        )

    def _fit_context(self, prompt_len: int, cfg: DecodingConfig) -> DecodingConfig:
        """Refuse prompts that fill the context window; clamp max_new_tokens to the rest."""
        room = self.context_window - prompt_len
        if room <= 0:
            raise PromptTooLongError(
                f"prompt must be shorter than the model's context window of "
                f"{self.context_window} tokens, got {prompt_len}; shorten the conversation"
            )
        if cfg.max_new_tokens > room:
            cfg = cfg.replace(max_new_tokens=room)
        return cfg

    def stream_chunks(
        self,
        messages: Messages,
        config: DecodingConfig | None = None,
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        constraint: LogitsProcessorList | None = None,
        cancel: threading.Event | None = None,
        **overrides: Any,
    ) -> Generator[StreamChunk, None, None]:
        """Stream text deltas; the final chunk carries ``finish_reason`` and ``usage``.

        Text is held back while it could still be the start of a stop string or ends in
        an incomplete multi-byte character, so the concatenated deltas always equal the
        text :meth:`generate` returns.

        The request is decoded by a worker thread that queues for the engine like
        :meth:`generate` (so concurrent streams and calls share forwards) and hands deltas
        over a queue: the stream holds no lock between tokens, a slow or abandoned reader
        never blocks other requests, and the iterator may be advanced from any thread (as
        Starlette does with sync iterators). Closing the iterator, or dropping it, stops
        the decode before its next token. Settings are validated here, at the call.

        Args:
            messages: OpenAI-style messages or a user string.
            config: Decoding settings (default: the engine's ``defaults``).
            tools: JSON-schema tool specs passed to the chat template (``tools=``).
            constraint: Logits processors applied right after the contrast (grammar masks).
            cancel: When set (from any thread), generation stops before the next token.
            **overrides: Validated per-call changes to ``config`` fields.
        """
        cfg = self._config(config, overrides)
        return self._stream_call(_Call(messages, cfg, tools, constraint, cancel))

    def _stream_call(self, call: _Call) -> Generator[StreamChunk, None, None]:
        """Run ``call`` in a worker thread; yield the chunks it hands over."""
        chunks: queue.SimpleQueue[StreamChunk | BaseException | None] = queue.SimpleQueue()
        closed = threading.Event()
        call.sink = chunks.put
        call.cancel = _AnyEvent(call.cancel, closed)

        def work() -> None:
            try:
                self._submit(call)
            except BaseException as exc:  # handed to the reader, who raises it
                chunks.put(exc)
            else:
                chunks.put(None)

        threading.Thread(target=work, name="acd-stream", daemon=True).start()
        try:
            while (item := chunks.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # closed, dropped or finished: stop decoding at the next token
            closed.set()

    def _chunks(self, call: _Call) -> Iterator[StreamChunk]:
        """One request decoded on its own; the caller holds the lock while iterating."""
        cfg = call.config
        template_kwargs = {"tools": list(call.tools)} if call.tools else {}
        steps: Generator[int, None, None]
        facts: Callable[[], tuple[int, GateVerdict | None]]
        if self._use_fast_path():
            rows, request, prompt_tokens, limit = self._plan_request(
                call.messages, cfg, call.constraint, 0, template_kwargs
            )
            cfg = cfg.replace(max_new_tokens=limit)
            steps = _first_request(self._decode_packed(rows, [request], cfg))
            facts = lambda: _gate_facts(request, prompt_tokens)  # noqa: E731
        else:  # the reference path scores the gate with a forward of its own
            verdict = self.gate_verdict(call.messages, cfg)
            if verdict is not None and not verdict.flagged:
                cfg = cfg.replace(method="plain")
            embeds, mask, shared = self.branch_inputs(call.messages, cfg, **template_kwargs)
            n_prompt = int(mask[0].sum())
            cfg = self._fit_context(embeds.shape[1], cfg)
            context = torch.tensor([shared], device=embeds.device)
            steps = decode(self.model, Prefill(embeds, mask, context, call.constraint), cfg)
            facts = lambda: (n_prompt, verdict)  # noqa: E731
        yield from self._stream_tokens(steps, cfg, facts, call.cancel)

    def _stream_tokens(
        self,
        steps: Generator[int, None, None],
        cfg: DecodingConfig,
        facts: Callable[[], tuple[int, GateVerdict | None]],
        cancel: CancelFlag | None = None,
    ) -> Iterator[StreamChunk]:
        """Text deltas of ``steps``; ``facts()`` gives the prompt tokens and gate verdict
        for the last chunk (asked at the end: the prefill decides the gate's route)."""
        answer = _Answer(self.tokenizer, self.eos_token_ids, cfg.stop)
        try:
            for token in steps:
                if cancel is not None and cancel.is_set():
                    answer.stop()
                    break
                delta = answer.push(token)
                if answer.done:
                    break
                if delta:
                    yield StreamChunk(delta, [token])
        finally:
            steps.close()
        yield from _closing_chunks(answer, *facts())

    def stream(
        self, messages: Messages, config: DecodingConfig | None = None, **kwargs: Any
    ) -> Iterator[str]:
        """Yield text deltas whose concatenation equals :meth:`generate`'s text.

        Takes the same arguments as :meth:`stream_chunks`.
        """
        chunks = self.stream_chunks(messages, config, **kwargs)
        try:
            for chunk in chunks:
                if chunk.text:
                    yield chunk.text
        finally:
            chunks.close()

    def generate(
        self,
        messages: Messages,
        config: DecodingConfig | None = None,
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        constraint: LogitsProcessorList | None = None,
        cancel: threading.Event | None = None,
        **overrides: Any,
    ) -> GenerationResult:
        """Generate one answer.

        Calls made from several threads while the engine is busy are decoded together
        (``acd_engine.coalesce``): LangChain's ``batch`` and concurrent async calls share
        forwards without asking. Each result is the one a lone call would get.

        Args:
            messages: OpenAI-style ``[{"role": ..., "content": ...}]`` or a user string.
            config: Decoding settings (default: the engine's ``defaults``).
            tools: JSON-schema tool specs passed to the chat template.
            constraint: Logits processors applied right after the contrast (grammar masks).
            cancel: When set (from any thread), generation stops before the next token.
            **overrides: Per-call changes to ``config`` fields, validated (``alpha=0.3``).
        """
        cfg = self._config(config, dict(overrides))
        return self._submit(_Call(messages, cfg, tools, constraint, cancel))

    def _submit(self, call: _Call) -> GenerationResult:
        """Queue ``call`` for the engine (coalesced with compatible ones on the fast path)."""
        if not self._use_fast_path():
            with self._lock:
                return self._generate_one(call)
        key = (call.config.model_dump_json(), json.dumps(call.tools, sort_keys=True, default=str))
        return self._coalescer.submit(call, key)

    def _generate_one(self, call: _Call) -> GenerationResult:
        """One request on its own (lock held); its chunks go to ``call.sink`` as well."""
        parts: list[str] = []
        last: StreamChunk | None = None
        for chunk in self._chunks(call):
            call.emit(chunk)
            parts.append(chunk.text)
            last = chunk
        assert last is not None
        return _result("".join(parts), last, call.config)

    def _run_calls(self, group: Sequence[Pending[GenerationResult]]) -> None:
        """Run coalesced calls (with the lock held): one batched decode, or one call alone.

        If a batch fails (one prompt too long, say), every call that has not streamed
        anything yet is retried alone, so each gets its own result or its own error.
        """
        calls: list[_Call] = [p.request for p in group]
        if len(group) > 1:
            try:
                results = self._generate_group(
                    [c.messages for c in calls],
                    [c.constraint for c in calls],
                    calls[0].config,
                    calls[0].tools,
                    [c.cancel for c in calls],
                    [c.emit if c.sink is not None else None for c in calls],
                )
                for p, result in zip(group, results, strict=True):
                    p.result = result
                return
            except Exception as exc:  # any failure: each call gets its own answer or error
                logger.debug("a coalesced batch failed (%s); running its calls one by one", exc)
                for p, call in zip(group, calls, strict=True):
                    if call.streamed:  # its reader has seen deltas: a rerun would repeat them
                        p.error = exc
        for p, call in zip(group, calls, strict=True):
            if p.error is not None:
                continue
            try:
                p.result = self._generate_one(call)
            except Exception as exc:  # handed to that call's caller, who raises it
                p.error = exc

    def generate_batch(
        self,
        batch: Sequence[Messages],
        config: DecodingConfig | None = None,
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        constraint: LogitsProcessorList | Sequence[LogitsProcessorList | None] | None = None,
        cancel: threading.Event | None = None,
        **overrides: Any,
    ) -> list[GenerationResult]:
        """Generate answers for several conversations, in order, several per forward.

        Up to :attr:`max_batch_requests` conversations share each forward (two rows each
        for contrast methods); each result equals what :meth:`generate` returns for that
        conversation alone.

        Args:
            batch: Conversations (each as :meth:`generate` takes them).
            config: Decoding settings shared by every conversation.
            tools: JSON-schema tool specs passed to every conversation's chat template.
            constraint: One ``LogitsProcessorList`` for all conversations (it must then be
                stateless), or a sequence with one list (or None) per conversation.
            cancel: When set (from any thread), every unfinished answer stops.
            **overrides: Validated per-call changes to ``config`` fields.
        """
        cfg = self._config(config, dict(overrides))
        convs = list(batch)
        if constraint is None or isinstance(constraint, LogitsProcessorList):
            constraints: list[LogitsProcessorList | None] = [constraint] * len(convs)
        else:
            constraints = list(constraint)
            if len(constraints) != len(convs):
                raise ConfigError(
                    f"constraint must have one entry per conversation ({len(convs)}), got "
                    f"{len(constraints)}"
                )
        if not self._use_fast_path():
            return [
                self.generate(m, cfg, tools=tools, constraint=c, cancel=cancel)
                for m, c in zip(convs, constraints, strict=True)
            ]
        out: list[GenerationResult] = []
        k = self.max_batch_requests
        for start in range(0, len(convs), k):
            group = convs[start : start + k]
            cancels = [cancel] * len(group)
            out += self._generate_group(group, constraints[start : start + k], cfg, tools, cancels)
        return out

    def _generate_group(
        self,
        convs: list[Messages],
        constraints: list[LogitsProcessorList | None],
        cfg: DecodingConfig,
        tools: Sequence[dict[str, Any]] | None,
        cancels: Sequence[CancelFlag | None],
        sinks: Sequence[Callable[[StreamChunk], None] | None] | None = None,
    ) -> list[GenerationResult]:
        """One batched decode of ``convs``: every request's rows in each forward.

        ``sinks`` (one per conversation, or None) receive that answer's stream chunks as
        they become ready, the same chunks :meth:`stream_chunks` yields for it alone.
        """
        outs = list(sinks) if sinks is not None else [None] * len(convs)
        template_kwargs = {"tools": list(tools)} if tools else {}
        rows: list[RowInput] = []
        requests: list[RowRequest] = []
        limits: list[int] = []  # per request, as generate() would clamp it
        prompt_tokens: list[int] = []
        with self._lock:
            for conv, constraint in zip(convs, constraints, strict=True):
                r_rows, request, n_prompt, limit = self._plan_request(
                    conv, cfg, constraint, len(rows), template_kwargs
                )
                rows += r_rows
                requests.append(request)
                prompt_tokens.append(n_prompt)
                limits.append(limit)
            run = cfg.replace(max_new_tokens=max(limits))
            answers = [_Answer(self.tokenizer, self.eos_token_ids, cfg.stop) for _ in convs]
            lasts: dict[int, StreamChunk] = {}  # answer -> its closing chunk (usage, gate)

            def close(i: int) -> None:
                """Answer ``i`` is over: its closing chunks (to its stream, if any)."""
                *_, last = chunks = list(
                    _closing_chunks(answers[i], *_gate_facts(requests[i], prompt_tokens[i]))
                )
                lasts[i] = last
                if (sink := outs[i]) is not None:
                    for chunk in chunks:
                        sink(chunk)

            finished: set[int] = set()
            steps = self._decode_packed(rows, requests, run, finished)
            try:
                for picked in steps:
                    for i, token in picked.items():
                        answer = answers[i]
                        cancel = cancels[i]
                        if cancel is not None and cancel.is_set():
                            answer.stop()
                        else:
                            delta = answer.push(token)
                            if delta and (sink := outs[i]) is not None and not answer.done:
                                sink(StreamChunk(delta, [token]))
                        if answer.done or len(answer.ids) >= limits[i]:
                            if i not in finished:
                                close(i)
                            finished.add(i)
                    if len(finished) == len(convs):
                        break
            finally:
                steps.close()
            for i in range(len(convs)):  # decoding ran out before they finished
                if i not in finished:
                    close(i)
        # the text generate() joins from the stream: what was handed out, then the rest
        return [_result(a.emitted + a.rest(), lasts[i], cfg) for i, a in enumerate(answers)]

    # ------------------------------------------------------------------ scoring
    def score_continuations(
        self,
        messages: Messages,
        continuations: Sequence[str],
        config: DecodingConfig | None = None,
        **overrides: Any,
    ) -> list[float]:
        """Summed log-probability of each continuation under the method's distribution.

        Each token is scored with ``log_softmax`` of the same contrasted, plausibility-
        filtered scores the decoder picks from (no sampling processors), so a
        multiple-choice answer ranks the way the method would generate it. On the fast
        path the prompt's branch prefixes come from the prefix cache and up to
        :attr:`max_batch_requests` continuations share one forward.
        """
        cfg = self._config(config, dict(overrides))
        verdict = self.gate_verdict(messages, cfg)  # scoring follows the gate's route too
        if verdict is not None and not verdict.flagged:
            cfg = cfg.replace(method="plain")
        with self._lock, torch.inference_mode():
            if not self._use_fast_path():
                return self._score_reference(messages, continuations, cfg)
            branch_rows, _ = self._request_rows(messages, cfg)
            conts = [self.encode_data(c) for c in continuations]
            out = [0.0] * len(conts)
            todo = [i for i, ids in enumerate(conts) if ids]
            nb = len(branch_rows)
            kernel = self._step_context(static=False)
            for start in range(0, len(todo), self.max_batch_requests):
                group = todo[start : start + self.max_batch_requests]
                rows = [RowInput(r.prefix, r.tail + conts[i]) for i in group for r in branch_rows]
                batch = pack_rows(self.model, rows, 0)
                keep = max(len(conts[i]) for i in group) + 1
                with kernel(*batch.input_ids.shape) if kernel else nullcontext():
                    logits = self.model(
                        input_ids=batch.input_ids,
                        attention_mask=batch.prefill_mask,
                        position_ids=batch.positions,
                        **cache_arg(self.model, batch.cache),
                        use_cache=True,
                        logits_to_keep=keep,
                    ).logits  # [R, keep, V]; tails are right-aligned, so every row ends here
                for j, i in enumerate(group):
                    n = len(conts[i])
                    rows_logits = logits[j * nb : (j + 1) * nb, keep - n - 1 : keep - 1]
                    cont_ids = torch.tensor(conts[i], device=logits.device)
                    out[i] = continuation_logprob(rows_logits, cont_ids, cfg)
        return out

    def _score_reference(
        self, messages: Messages, continuations: Sequence[str], cfg: DecodingConfig
    ) -> list[float]:
        """Reference scoring: one full forward of both branches per continuation."""
        out: list[float] = []
        embeds, mask, _ = self.branch_inputs(messages, cfg)
        emb = self.model.get_input_embeddings()
        for cont in continuations:
            ids = self.encode_data(cont)
            if not ids:
                out.append(0.0)
                continue
            cont_ids = torch.tensor(ids, device=embeds.device)
            rows = embeds.shape[0]
            full = torch.cat([embeds, emb(cont_ids)[None].expand(rows, -1, -1)], dim=1)
            full_mask = torch.cat([mask, mask.new_ones(rows, len(ids))], dim=1)
            pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(
                inputs_embeds=full, attention_mask=full_mask, position_ids=pos
            ).logits[:, embeds.shape[1] - 1 : -1, :]  # [R, n, V] predicting cont tokens
            out.append(continuation_logprob(logits, cont_ids, cfg))
        return out

    def describe(self) -> dict[str, Any]:
        """Identifying facts for logs, adapters and benchmark reports (the eval runner pins
        the dtype from it)."""
        return {
            "model_name": self.model_name,
            "model_path": self.loaded.path,
            "device": str(self.device),
            "dtype": str(self.loaded.dtype).replace("torch.", ""),
            "context_window": self.context_window,
        }

    def plan(self, config: DecodingConfig) -> BranchPlan:
        """The branches ``config`` runs (for inspection and tests)."""
        return plan_branches(config, self.pack if config.method == "acd" else None)


_ENGINES: dict[tuple[Any, ...], Engine] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(
    model: str | Path | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    pack: str | Path | None = None,
    trust_remote_code: bool = False,
) -> Engine:
    """The process-wide engine for these settings: created once, shared by all callers."""
    key = (
        None if model is None else str(model),
        device,
        dtype,
        None if pack is None else str(pack),
        trust_remote_code,
    )
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            start = time.perf_counter()
            engine = Engine(
                model, device=device, dtype=dtype, pack=pack, trust_remote_code=trust_remote_code
            )
            logger.info("engine ready in %.1fs", time.perf_counter() - start)
            _ENGINES[key] = engine
        return engine
