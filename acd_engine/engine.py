"""The public object: one engine owns a model, its tokenizer, a prompt pack and a lock.

It delegates every job: rendering to :mod:`acd_engine.rendering`, rows to
:mod:`acd_engine.rows`, forwards and kernels to :mod:`acd_engine.kernels`, the token step to
:mod:`acd_engine.step`, tokens -> text and results to :mod:`acd_engine.answer`, queueing
and streaming to :mod:`acd_engine.calls`. See docs/architecture.md for one call's path.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessorList

from acd_engine.answer import GenerationResult, StreamChunk, Usage, eos_token_ids
from acd_engine.calls import Call, decode_calls, run_coalesced, stream_in_thread
from acd_engine.coalesce import Coalescer, Pending
from acd_engine.config import DecodingConfig, ModelConfig
from acd_engine.contrast import BranchPlan, plan_branches
from acd_engine.errors import ConfigError
from acd_engine.gate import GateVerdict, SafetyGate, capture_last_states, features_of
from acd_engine.gate import gate_threshold as threshold_of
from acd_engine.kernels import EngineOptions, KernelPolicy
from acd_engine.loading import LoadedModel, load_model
from acd_engine.prefix_cache import PrefixCache
from acd_engine.prompts import PromptPack, model_fingerprint, resolve_pack
from acd_engine.rendering import Messages, Rendered, Renderer, template_kwargs
from acd_engine.rows import RowBuilder
from acd_engine.scoring import score_continuations

__all__ = ["Engine", "EngineOptions", "GenerationResult", "Messages", "StreamChunk", "Usage"]
__all__ += ["get_engine"]

logger = logging.getLogger(__name__)


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
        quantize: ``"int8"`` or ``"int4"`` weight-only linear layers (torchao), or
            ``"none"``; see :class:`~acd_engine.config.ModelConfig`.
        defaults: Decoding settings used when a call passes none.
        fast_path, compile_step: Shortcuts for the :class:`EngineOptions` fields.
        options: How forwards run (:class:`EngineOptions`); never changes a greedy token.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        pack: str | Path | PromptPack | None = None,
        trust_remote_code: bool = False,
        quantize: str = "none",
        defaults: DecodingConfig | None = None,
        fast_path: bool = True,
        compile_step: bool | None = None,
        options: EngineOptions | None = None,
    ) -> None:
        self.model_config = ModelConfig(
            model=model and str(model),
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            quantize=quantize,
        )
        self.loaded: LoadedModel = load_model(self.model_config)
        self.defaults = defaults or DecodingConfig()
        self._pack_source = pack
        self._pack: PromptPack | None = None
        self._fingerprint: dict[str, str] | None = None
        self._lock = threading.RLock()
        self.eos_token_ids = eos_token_ids(self.model, self.tokenizer)
        self.renderer = Renderer(self.tokenizer, self.model_name)
        self.prefix_cache = PrefixCache()
        self.rows = RowBuilder(
            self.model, self.renderer, self.prefix_cache, self.context_window, self.device
        )
        self.options = (options or EngineOptions()).with_shortcuts(fast_path, compile_step)
        self.kernels = KernelPolicy(self.model, self.options, self.model_name, self.device)
        self._coalescer: Coalescer[GenerationResult] = Coalescer(
            self._run_calls, self._lock, lambda: self.options.max_batch_requests
        )

    # ------------------------------------------------------------------ what it owns
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
                self._pack = self._resolve(self._pack_source)
            return self._pack

    def _resolve(self, source: str | Path | PromptPack | None) -> PromptPack:
        return resolve_pack(source, self.model, self.tokenizer, self.fingerprint, self.model_name)

    def set_pack(self, pack: str | Path | PromptPack | None) -> None:
        """Swap the prompt pack (checked against this model) for later requests."""
        with self._lock:
            self._pack = self._resolve(pack)

    def set_options(self, **changes: Any) -> None:
        """Change :class:`EngineOptions` fields (validated) for later requests; what the
        kernels measured or compiled is measured again."""
        with self._lock:
            self.options = self.options.replace(**changes)
            self.kernels = KernelPolicy(self.model, self.options, self.model_name, self.device)

    @property
    def fast_path(self) -> bool:
        """Whether requests may take the fast path (``options.fast_path``)."""
        return self.options.fast_path

    @fast_path.setter
    def fast_path(self, on: bool) -> None:
        self.set_options(fast_path=on)

    def describe(self) -> dict[str, Any]:
        """Identifying facts for logs and reports (the eval runner pins the dtype from it)."""
        return {
            "model_name": self.model_name,
            "model_path": self.loaded.path,
            "device": str(self.device),
            "dtype": str(self.loaded.dtype).replace("torch.", ""),
            "context_window": self.context_window,
        }

    # ------------------------------------------------------------------ rendering
    def encode_data(self, text: str) -> list[int]:
        """Token ids of user text as data (see :meth:`Renderer.encode_data`)."""
        return self.renderer.encode_data(text)

    def render(self, messages: Messages, **template_kwargs: Any) -> Rendered:
        """Render once, split around the system-prompt slot (see :meth:`Renderer.render`)."""
        return self.renderer.render(messages, **template_kwargs)

    def plan(self, config: DecodingConfig) -> BranchPlan:
        """The branches ``config`` runs (for inspection and tests)."""
        return plan_branches(config, self.pack if config.method_entry.uses_pack else None)

    def count_tokens(
        self,
        messages: Messages,
        config: DecodingConfig | None = None,
        *,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> int:
        """The prompt tokens a request would use: ``usage.prompt_tokens`` before decoding.

        Counts the positive branch as rendered for ``config``'s method (its system prompt or
        soft prompt included), so framework token budgets see what the model will read.
        """
        with self._lock:
            rendered = self.render(messages, **template_kwargs(tools))
            return self.rows.prompt_tokens(rendered, self.plan(config or self.defaults))

    def branch_inputs(
        self, messages: Messages, config: DecodingConfig, **template_kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Left-padded ``[R, T, H]`` embeddings, ``[R, T]`` mask, and the shared ids."""
        rendered = self.render(messages, **template_kwargs)
        return self.rows.branch_inputs(rendered, self.plan(config))

    # ------------------------------------------------------------------ the safety gate
    def active_gate(self, config: DecodingConfig) -> SafetyGate | None:
        """The gate that routes requests decoded with ``config`` (None: no routing)."""
        return self.pack.gate if config.method_entry.gated and config.gate else None

    def gate_features(self, messages: Messages, layers: Sequence[int]) -> torch.Tensor:
        """``[1, F]``: the gate's features from a forward of the request's plain rendering."""
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
        return GateVerdict(score, threshold_of(config, gate))

    # ------------------------------------------------------------------ generation
    def _config(self, config: DecodingConfig | None, overrides: dict[str, Any]) -> DecodingConfig:
        return (config or self.defaults).replace(**overrides)

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

        ``messages``: OpenAI-style dicts or a user string; ``config``: decoding settings
        (default ``defaults``), changed per call by validated ``**overrides`` (``alpha=0.3``);
        ``tools``: JSON-schema specs for the chat template; ``constraint``: processors right
        after the contrast (grammar masks); ``cancel``: stops before the next token when set.
        Calls from several threads while the engine is busy are decoded together
        (:mod:`acd_engine.coalesce`); each result is the one a lone call would get.
        """
        cfg = self._config(config, overrides)
        return self._submit(Call(messages, cfg, tools, constraint, cancel))

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
        """Text deltas (their concatenation is :meth:`generate`'s text); the last chunk
        carries ``finish_reason`` and ``usage``. Takes :meth:`generate`'s arguments, checked
        here; closing the stream stops the decode (:func:`acd_engine.calls.stream_in_thread`)."""
        cfg = self._config(config, overrides)
        return stream_in_thread(self._submit, Call(messages, cfg, tools, constraint, cancel))

    def stream(
        self, messages: Messages, config: DecodingConfig | None = None, **kwargs: Any
    ) -> Iterator[str]:
        """Yield text deltas whose concatenation equals :meth:`generate`'s text."""
        chunks = self.stream_chunks(messages, config, **kwargs)
        try:
            yield from (chunk.text for chunk in chunks if chunk.text)
        finally:
            chunks.close()

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
        """Answers for several conversations, in order, up to ``max_batch_requests`` per
        forward; each equals what :meth:`generate` returns for it alone. ``constraint`` is
        one (stateless) list for all, or one list (or None) per conversation."""
        cfg = self._config(config, overrides)
        if constraint is None or isinstance(constraint, LogitsProcessorList):
            constraints: list[LogitsProcessorList | None] = [constraint] * len(batch)
        elif len(constraints := list(constraint)) != len(batch):
            raise ConfigError(
                f"constraint must have one entry per conversation ({len(batch)}), got "
                f"{len(constraints)}"
            )
        calls = [Call(m, cfg, tools, c, cancel) for m, c in zip(batch, constraints, strict=True)]
        if not self.kernels.use_fast_path():
            return [self._submit(call) for call in calls]
        k = self.options.max_batch_requests
        return [r for s in range(0, len(calls), k) for r in self._generate_group(calls[s : s + k])]

    def _submit(self, call: Call) -> GenerationResult:
        """Queue ``call`` for the engine (coalesced with compatible ones on the fast path)."""
        if not self.kernels.use_fast_path():
            with self._lock:
                return self._decode([call])[0]
        key = (call.config.model_dump_json(), json.dumps(call.tools, sort_keys=True, default=str))
        return self._coalescer.submit(call, key)

    def _run_calls(self, group: Sequence[Pending[GenerationResult]]) -> None:
        """Run coalesced calls (lock held): one batched decode, or each call alone."""
        run_coalesced(group, self._generate_group, lambda call: self._decode([call])[0])

    def _generate_group(self, calls: list[Call]) -> list[GenerationResult]:
        """One batched decode of several calls (what coalescing and batches run)."""
        return self._decode(calls)

    def _decode(self, calls: list[Call]) -> list[GenerationResult]:
        with self._lock:  # the request path itself: acd_engine.calls.decode_calls
            return decode_calls(self, calls)

    # ------------------------------------------------------------------ scoring
    def score_continuations(
        self,
        messages: Messages,
        continuations: Sequence[str],
        config: DecodingConfig | None = None,
        **overrides: Any,
    ) -> list[float]:
        """Summed log-probability of each continuation under the method's distribution
        (:mod:`acd_engine.scoring`); the gate routes the request as it would a generation."""
        cfg = self._config(config, overrides)
        verdict = self.gate_verdict(messages, cfg)
        if verdict is not None and not verdict.flagged:
            cfg = cfg.replace(method="plain")
        conts = [self.encode_data(c) for c in continuations]
        with self._lock, torch.inference_mode():
            return score_continuations(self, messages, conts, cfg)


_ENGINES: dict[tuple[Any, ...], Engine] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(
    model: str | Path | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    pack: str | Path | None = None,
    trust_remote_code: bool = False,
    quantize: str = "none",
) -> Engine:
    """The process-wide engine for these settings: created once, shared by all callers."""
    key = (model and str(model), device, dtype, pack and str(pack), trust_remote_code, quantize)
    with _ENGINES_LOCK:
        if (engine := _ENGINES.get(key)) is None:
            start = time.perf_counter()
            engine = Engine(
                model,
                device=device,
                dtype=dtype,
                pack=pack,
                trust_remote_code=trust_remote_code,
                quantize=quantize,
            )
            logger.info("engine ready in %.1fs", time.perf_counter() - start)
            _ENGINES[key] = engine
        return engine
