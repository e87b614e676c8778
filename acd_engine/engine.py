"""The public object: one engine owns a model, its tokenizer, a prompt pack and a lock.

This is the only module that renders chat templates. A request is rendered once with a
sentinel in the system-prompt slot; the text is split there into a head and a tail that
every branch shares token for token, and each branch fills the slot with its own content
(nothing, a manual prompt, or soft-prompt embeddings).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field
from transformers import LogitsProcessorList

from acd_engine.config import DecodingConfig, ModelConfig
from acd_engine.contrast import (
    Branch,
    BranchPlan,
    contrast_logits,
    plan_branches,
    plausibility_filter,
)
from acd_engine.decoding import Prefill, decode
from acd_engine.errors import MessagesError, PromptPackError, PromptTooLongError
from acd_engine.loading import LoadedModel, load_model
from acd_engine.prompts import PromptPack, model_fingerprint

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
_SENTINEL = "@@ACD_BRANCH_PROMPT@@"
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
    alpha: float = Field(description="The alpha applied (0 for single-branch methods).")


@dataclass
class StreamChunk:
    """One piece of a stream; the last one carries ``finish_reason`` and ``usage``."""

    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"] | None = None
    usage: Usage | None = None


@dataclass
class _Rendered:
    """A request split around the system-prompt slot (token ids, shared by all branches)."""

    head: list[int]
    tail: list[int]
    plain: list[int] | None  # the template rendered untouched, for method 'plain'


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
        return list(self.tokenizer.encode(text, add_special_tokens=False))

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
        refuse a system role get the slot at the start of the first user message.
        """
        msgs = _normalise_messages(messages)
        user_system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
        rest = msgs[1:] if user_system is not None else msgs
        slot = _SENTINEL + ("\n\n" + user_system if user_system else "")
        try:
            text = self._template([{"role": "system", "content": slot}, *rest], **template_kwargs)
        except MessagesError:
            raise
        except Exception:  # template without a system role: use the first user turn
            first = next(i for i, m in enumerate(rest) if m["role"] == "user")
            rest = [dict(m) for m in rest]
            rest[first]["content"] = slot + "\n\n" + rest[first]["content"]
            text = self._template(rest, **template_kwargs)
        if text.count(_SENTINEL) != 1:
            raise MessagesError(
                "chat template dropped the system prompt slot; cannot place branches"
            )
        head, tail = text.split(_SENTINEL)
        plain = self._encode(self._template(msgs, **template_kwargs))
        return _Rendered(self._encode(head), self._encode(tail), plain)

    def _branch_embeds(self, rendered: _Rendered, branch: Branch | None) -> torch.Tensor:
        """``[T, H]`` input embeddings of one branch, in the model's dtype."""
        emb = self.model.get_input_embeddings()
        dev = emb.weight.device

        def embed(ids: list[int]) -> torch.Tensor:
            return emb(torch.tensor(ids, dtype=torch.long, device=dev))

        if branch is None:
            assert rendered.plain is not None
            return embed(rendered.plain)
        parts = [embed(rendered.head)]
        if branch.kind == "text":
            assert branch.text is not None
            parts.append(embed(self._encode(branch.text)))
        elif branch.kind == "soft":
            assert branch.soft is not None
            parts.append(branch.soft.to(device=dev, dtype=emb.weight.dtype))
        parts.append(embed(rendered.tail))
        return torch.cat(parts, dim=0)

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
        return base.replace(**overrides) if overrides else base  # type: ignore[return-value]

    def stream_chunks(
        self,
        messages: Messages,
        config: DecodingConfig | None = None,
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        constraint: LogitsProcessorList | None = None,
        cancel: threading.Event | None = None,
        **overrides: Any,
    ) -> Iterator[StreamChunk]:
        """Stream text deltas; the final chunk carries ``finish_reason`` and ``usage``.

        Text is held back while it could still be the start of a stop string or ends in
        an incomplete multi-byte character, so the concatenated deltas always equal the
        text :meth:`generate` returns.

        Args:
            messages: OpenAI-style messages or a user string.
            config: Decoding settings (default: the engine's ``defaults``).
            tools: JSON-schema tool specs passed to the chat template (``tools=``).
            constraint: Logits processors applied right after the contrast (grammar masks).
            cancel: When set (from any thread), generation stops before the next token.
            **overrides: Validated per-call changes to ``config`` fields.
        """
        cfg = self._config(config, overrides)
        template_kwargs = {"tools": list(tools)} if tools else {}
        with self._lock:
            embeds, mask, shared = self.branch_inputs(messages, cfg, **template_kwargs)
            prompt_tokens = int(mask[0].sum())
            room = self.context_window - embeds.shape[1]
            if room <= 0:
                raise PromptTooLongError(
                    f"prompt must be shorter than the model's context window of "
                    f"{self.context_window} tokens, got {embeds.shape[1]}; shorten the "
                    "conversation"
                )
            if cfg.max_new_tokens > room:
                cfg = cfg.replace(max_new_tokens=room)  # type: ignore[assignment]
            context = torch.tensor([shared], device=embeds.device)
            prefill = Prefill(embeds, mask, context, constraint)
            yield from self._stream_tokens(prefill, cfg, prompt_tokens, cancel)

    def _stream_tokens(
        self,
        prefill: Prefill,
        cfg: DecodingConfig,
        prompt_tokens: int,
        cancel: threading.Event | None = None,
    ) -> Iterator[StreamChunk]:
        ids: list[int] = []
        emitted = ""  # text already yielded; always a prefix of the final text
        final: str | None = None  # set when a stop string cut the text
        finish: Literal["stop", "length"] = "length"
        longest = max((len(s) for s in cfg.stop), default=0)
        steps = decode(self.model, prefill, cfg)
        try:
            with torch.inference_mode():
                for token in steps:
                    if cancel is not None and cancel.is_set():
                        finish = "stop"
                        break
                    if token in self.eos_token_ids:
                        finish = "stop"
                        break
                    ids.append(token)
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                    start = max(0, len(emitted) - longest)
                    hits = [i for s in cfg.stop if (i := text.find(s, start)) >= 0]
                    if hits:
                        final, finish = text[: min(hits)], "stop"
                        break
                    ready = len(text.rstrip("\ufffd"))  # never split a multi-byte character
                    ready -= _stop_prefix_overlap(text[:ready], cfg.stop)
                    if ready > len(emitted) and text.startswith(emitted):
                        yield StreamChunk(text[len(emitted) : ready], [token])
                        emitted = text[:ready]
        finally:
            steps.close()
        if final is None:
            final = self.tokenizer.decode(ids, skip_special_tokens=True)
        if len(final) > len(emitted) and final.startswith(emitted):
            yield StreamChunk(final[len(emitted) :], [])
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=len(ids))
        yield StreamChunk("", ids, finish_reason=finish, usage=usage)

    def stream(
        self, messages: Messages, config: DecodingConfig | None = None, **kwargs: Any
    ) -> Iterator[str]:
        """Yield text deltas whose concatenation equals :meth:`generate`'s text.

        Takes the same arguments as :meth:`stream_chunks`.
        """
        for chunk in self.stream_chunks(messages, config, **kwargs):
            if chunk.text:
                yield chunk.text

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

        Args:
            messages: OpenAI-style ``[{"role": ..., "content": ...}]`` or a user string.
            config: Decoding settings (default: the engine's ``defaults``).
            tools: JSON-schema tool specs passed to the chat template.
            constraint: Logits processors applied right after the contrast (grammar masks).
            cancel: When set (from any thread), generation stops before the next token.
            **overrides: Per-call changes to ``config`` fields, validated (``alpha=0.3``).
        """
        cfg = self._config(config, dict(overrides))
        parts: list[str] = []
        last: StreamChunk | None = None
        chunks = self.stream_chunks(
            messages, cfg, tools=tools, constraint=constraint, cancel=cancel
        )
        for chunk in chunks:
            parts.append(chunk.text)
            last = chunk
        assert last is not None and last.finish_reason is not None and last.usage is not None
        return GenerationResult(
            text="".join(parts),
            token_ids=last.token_ids,
            finish_reason=last.finish_reason,
            usage=last.usage,
            method=cfg.method,
            alpha=cfg.effective_alpha,
        )

    def generate_batch(
        self,
        batch: Sequence[Messages],
        config: DecodingConfig | None = None,
        **overrides: Any,
    ) -> list[GenerationResult]:
        """Generate answers for several conversations, in order."""
        cfg = self._config(config, dict(overrides))
        return [self.generate(m, cfg) for m in batch]

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
        multiple-choice answer ranks the way the method would generate it.
        """
        cfg = self._config(config, dict(overrides))
        out: list[float] = []
        with self._lock, torch.inference_mode():
            embeds, mask, _ = self.branch_inputs(messages, cfg)
            emb = self.model.get_input_embeddings()
            for cont in continuations:
                ids = self._encode(cont)
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
                neg = logits[1] if rows == 2 else None
                scores = contrast_logits(logits[0], neg, cfg.alpha)
                scores = plausibility_filter(scores, logits[0], cfg.plausibility)
                logp = torch.log_softmax(scores, dim=-1).gather(-1, cont_ids[:, None])
                out.append(float(logp.sum()))
        return out

    def describe(self) -> dict[str, Any]:
        """Identifying facts for logs, adapters and benchmark reports."""
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
