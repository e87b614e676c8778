"""The public object: one engine owns a model, its tokenizer, a prompt pack, its options
and a lock, and delegates every other job; docs/architecture.md names the module that does
each, in the order one ``generate`` call reaches them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessorList

from acd_engine.backends.base import Backend, BackendName, LlamaCppOptions, resolve_backend
from acd_engine.backends.torch.backend import TorchBackend
from acd_engine.backends.torch.kernels import KernelPolicy
from acd_engine.backends.torch.prefix_cache import PrefixCache
from acd_engine.backends.torch.rows import RowBuilder
from acd_engine.config import DecodingConfig, EngineOptions, ModelConfig
from acd_engine.errors import ConfigError, PromptPackError
from acd_engine.loading.models import LoadedModel, default_model_path, load_model
from acd_engine.rendering import Messages, Rendered, Renderer, template_kwargs
from acd_engine.runtime.answer import GenerationResult, StreamChunk, Usage, eos_token_ids
from acd_engine.runtime.calls import Call, CallRunner, calls_of, stream_in_thread, text_deltas
from acd_engine.runtime.scoring import score_continuations
from acd_engine.safety.contrast import BranchPlan, plan_branches
from acd_engine.safety.gate import GateScope, GateVerdict, ReadSpan, SafetyGate, probe_states
from acd_engine.safety.pack_info import NO_PACK, pack_report
from acd_engine.safety.prompts import PromptPack, model_fingerprint, resolve_pack

__all__ = ["Engine", "EngineOptions", "GenerationResult", "LlamaCppOptions", "Messages"]
__all__ += ["StreamChunk", "Usage", "get_engine"]

logger = logging.getLogger(__name__)


class Engine:
    """Safer generation for one local chat model.

    Thread-safe: a lock serialises requests, so concurrent callers never interleave state.
    Use :func:`get_engine` to share one engine (and one copy of the weights) per process.
    ``model``, ``tokenizer``, ``model_name``, ``device`` and ``context_window`` are those of
    ``loaded``, the process-wide :class:`~acd_engine.loading.models.LoadedModel`.

    Args:
        model, device, dtype, trust_remote_code, quantize, keep_layers: Which model to load,
            where and how: the fields of :class:`~acd_engine.config.ModelConfig` (documented
            there). On the torch backend an engine with ``keep_layers`` is a front end for
            another runtime: it renders, embeds and gates requests but refuses to decode
            them; the llama.cpp backend sets ``keep_layers=0`` itself.
        pack: Prompt pack for ``method="acd"``: a path, a :class:`PromptPack`, or None for
            the pack shipped for this model (else the manual-prompt initialisation, which
            makes ``acd`` the same as ``oid``, with no safety gate: the first call that
            needs a pack logs a WARNING saying so, once per engine).
        require_pack: Refuse (:class:`~acd_engine.errors.PromptPackError`) a call whose
            method needs a trained pack when this engine has none, instead of warning and
            decoding on the manual prompts. Checked on the first such call, not here: an
            engine without a pack is a legitimate one for ``plain``, ``base``, ``nid`` or
            ``oid`` (and a call may pick its method itself), so only a call can tell.
        defaults: Decoding settings used when a call passes none.
        fast_path, compile_step: Shortcuts for the :class:`EngineOptions` fields.
        options: How forwards run (:class:`EngineOptions`); never changes a greedy token.
        backend: What runs the forwards (:mod:`acd_engine.backends.base`): ``torch`` (this
            engine's PyTorch model: CPU or GPU, token for token transformers'
            ``generate``), ``llamacpp`` (llama.cpp on the model's ``.gguf`` file, CPU; the
            engine then loads only the embedding table, ``keep_layers=0``, and llama.cpp
            runs every forward, the gate's included; extra ``[llamacpp]``), or ``auto``,
            which is ``torch`` (:func:`~acd_engine.backends.base.resolve_backend` says why).
            Requests, streams, batches, scoring and results are the same on both;
            ``llamacpp`` computes with the GGUF's quantized weights, so its tokens may
            differ slightly.
        llamacpp: How the ``llamacpp`` backend runs (threads, prefix room, where the gate
            is read: :class:`~acd_engine.backends.base.LlamaCppOptions`).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        pack: str | Path | PromptPack | None = None,
        require_pack: bool = False,
        trust_remote_code: bool = False,
        quantize: str = "none",
        keep_layers: int | None = None,
        defaults: DecodingConfig | None = None,
        fast_path: bool = True,
        compile_step: bool | None = None,
        options: EngineOptions | None = None,
        backend: str = "auto",
        llamacpp: LlamaCppOptions | None = None,
    ) -> None:
        backend_name = resolve_backend(backend, model, device, quantize)
        on_llamacpp = backend_name == "llamacpp"
        self.model_config = ModelConfig(
            model=model and str(model),
            device="cpu" if on_llamacpp else device,  # llama.cpp reads host embeddings
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            quantize=quantize,
            # llama.cpp runs every layer: the engine keeps the embedding table alone
            keep_layers=0 if on_llamacpp and keep_layers is None else keep_layers,
        )
        self.loaded: LoadedModel = load_model(self.model_config)
        self.model: Any = self.loaded.model
        self.tokenizer: Any = self.loaded.tokenizer
        self.model_name = self.loaded.name
        self.device = self.loaded.device
        self.context_window = self.loaded.context_window
        self.defaults = defaults or DecodingConfig()
        self._pack_source = pack
        self._pack: PromptPack | None = None
        self.require_pack = require_pack
        self._pack_warned = False
        self._lock = threading.RLock()
        self.eos_token_ids = eos_token_ids(self.model, self.tokenizer)
        self.renderer = Renderer(self.tokenizer, self.model_name)
        self.prefix_cache = PrefixCache()
        self.rows = RowBuilder(
            self.model, self.renderer, self.prefix_cache, self.context_window, self.device
        )
        self.options = (options or EngineOptions()).with_shortcuts(fast_path, compile_step)
        self.kernels = KernelPolicy(self.model, self.options, self.model_name, self.device)
        self.backend: Backend = (
            self._llamacpp_backend(model, llamacpp or LlamaCppOptions())
            if on_llamacpp
            else TorchBackend(self)
        )
        self.calls = CallRunner(self, self._lock)
        self._coalescer = self.calls.coalescer  # its queue, as tests watch it

    def _llamacpp_backend(self, model: str | Path | None, options: LlamaCppOptions) -> Backend:
        """llama.cpp on ``model``'s GGUF (the default model's when None); imported here, so
        an engine on the torch backend never loads the llama.cpp bindings."""
        from acd_engine.backends.llamacpp.backend import LlamaCppBackend

        gguf = default_model_path() if model is None else Path(model).expanduser()
        return LlamaCppBackend(self, gguf, options)

    # ------------------------------------------------------------------ what it owns
    @cached_property
    def fingerprint(self) -> dict[str, str]:
        """The model's fingerprint (computed once; hashes the embedding matrix)."""
        return model_fingerprint(self.model, self.tokenizer)

    @property
    def pack(self) -> PromptPack:
        """The SP/AP pack used by ``method="acd"`` (resolved on first use).

        Once resolved it is read without the lock (one attribute read), so a front end
        preparing a request never waits for a decode in flight to ask which pack it gets.
        """
        if (pack := self._pack) is not None:
            return pack
        with self._lock:
            if self._pack is None:
                self._pack = resolve_pack(self._pack_source, self.loaded, self.fingerprint)
            return self._pack

    def set_pack(self, pack: str | Path | PromptPack | None) -> None:
        """Swap the prompt pack (checked against this model) for later requests."""
        with self._lock:
            self._pack = resolve_pack(pack, self.loaded, self.fingerprint)
            self._pack_source = pack
            self._pack_warned = False

    def pack_for(self, config: DecodingConfig, *, require: bool = False) -> PromptPack | None:
        """The pack ``config``'s method reads, or None for a method that reads none.

        The one place a call meets the pack (:meth:`plan` and :meth:`active_gate` ask here),
        so it is also where an untrained pack is reported: the first call logs a WARNING
        with the fix, once per engine (a front end's requests would repeat it endlessly),
        and with ``require`` or :attr:`require_pack` the call is refused instead. A pack
        handed in as a :class:`PromptPack` object is the caller's own choice (``acd train``
        validates its candidates this way) and is not warned about; it is still refused.

        Raises:
            PromptPackError: The method needs a trained pack, this engine has none, and a
                trained pack is required.
        """
        if not config.method_entry.uses_pack:
            return None
        pack = self.pack
        if pack.trained:
            return pack
        if require or self.require_pack:
            raise PromptPackError(
                f"pack must be a trained prompt pack for method {config.method!r} when "
                f"require_pack is set, got {NO_PACK} for {self.model_name}; train one with "
                "`acd train --model PATH --out PACK` and pass it (pack=PACK, --pack PACK)"
            )
        with self._lock:
            warn = not self._pack_warned and not isinstance(self._pack_source, PromptPack)
            self._pack_warned = True
        if warn:
            logger.warning(
                "method %r has no trained prompt pack for %s: it decodes with soft prompts "
                "initialised from the manual prompts (the same as method 'oid') and no safety "
                "gate. Train a pack with `acd train --model PATH --out PACK` and pass it "
                "(pack=PACK, --pack PACK); require_pack=True (--require-pack) refuses instead",
                config.method,
                self.model_name,
            )
        return pack

    def pack_report(self, config: DecodingConfig) -> dict[str, str]:
        """``{"pack": ..., "gate": ..., "backend": ...}``: what every front end reports about
        how a request was decoded (:func:`acd_engine.safety.pack_info.pack_report`): the pack and
        gate (``none (manual prompts)`` / ``none`` when there is no trained pack) and the
        backend that ran it."""
        name = self.backend.name
        if not config.method_entry.uses_pack:
            return pack_report(None, None, backend=name)
        return pack_report(self.pack, self.active_gate(config), config.gate_threshold, backend=name)

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

    def check_decodes(self) -> None:
        """Refuse to decode on a front-end engine (``keep_layers`` on the torch backend),
        whose forward would stop after its kept layers and produce meaningless logits."""
        keep = self.loaded.keep_layers
        if keep is not None and self.backend.name == "torch":
            raise ConfigError(
                f"this engine loaded only {keep} decoder layers (keep_layers) to feed another "
                "runtime; it renders and gates requests but cannot decode them: create an "
                "engine without keep_layers, or with backend='llamacpp' on a .gguf model"
            )

    def describe(self) -> dict[str, Any]:
        """Identifying facts for logs and reports (:meth:`LoadedModel.describe`) and the
        backend that decodes."""
        return {**self.loaded.describe(), "backend": self.backend.name}

    @property
    def backend_name(self) -> BackendName:
        """Which backend runs this engine's forwards: ``torch`` or ``llamacpp``."""
        return self.backend.name

    # ------------------------------------------------------------------ rendering
    def encode_data(self, text: str) -> list[int]:
        """Token ids of user text as data (see :meth:`Renderer.encode_data`)."""
        return self.renderer.encode_data(text)

    def render(self, messages: Messages, **template_kwargs: Any) -> Rendered:
        """Render once, split around the system-prompt slot (see :meth:`Renderer.render`)."""
        return self.renderer.render(messages, **template_kwargs)

    def plan(self, config: DecodingConfig) -> BranchPlan:
        """The branches ``config`` runs (for inspection and tests)."""
        return plan_branches(config, self.pack_for(config))

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
        if not (config.method_entry.gated and config.gate):
            return None
        pack = self.pack_for(config)
        return None if pack is None else pack.gate

    def gate_states(
        self,
        messages: Messages,
        gate_layers: Sequence[int],
        scope: GateScope = "request",
        **template_kwargs: Any,
    ) -> torch.Tensor:
        """``[T, F]``: the gate's layers' states, from a forward of the request's plain
        rendering, at the positions a gate of ``scope`` reads (:mod:`acd_engine.safety.gate`); the
        gate pools and scores them (:meth:`~acd_engine.safety.gate.SafetyGate.score`)."""
        rendered = self.render(messages, **template_kwargs)
        return self.read_gate(rendered, gate_layers, scope, template_kwargs)[0]

    def read_gate(
        self,
        rendered: Rendered,
        gate_layers: Sequence[int],
        scope: GateScope,
        template_kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, ReadSpan]:
        """:meth:`gate_states` of a request already rendered, and the span they were read
        at (the gate's trainer places each anchor's own tokens within it)."""
        assert rendered.plain is not None
        span = self.rows.gate_span(scope, rendered, template_kwargs)
        with self._lock:
            states = probe_states(self.model, rendered.plain, gate_layers, span, self.device)
        return states, span

    def gate_verdict(
        self, messages: Messages, config: DecodingConfig, **template_kwargs: Any
    ) -> GateVerdict | None:
        """The gate's verdict on one request, read by the backend's forward of its own
        (None when not gated)."""
        with self._lock:
            rendered = self.render(messages, **template_kwargs)
            return self.backend.gate_verdict(rendered, config, template_kwargs)

    # ------------------------------------------------------------------ generation
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
        (:mod:`acd_engine.runtime.coalesce`); each result is the one a lone call would get.
        """
        cfg = (config or self.defaults).replace(**overrides)
        return self.calls.submit(Call(messages, cfg, tools, constraint, cancel))

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
        here; closing the stream stops the decode (:func:`acd_engine.runtime.calls.stream_in_thread`)."""
        cfg = (config or self.defaults).replace(**overrides)
        return stream_in_thread(self.calls.submit, Call(messages, cfg, tools, constraint, cancel))

    def stream(
        self, messages: Messages, config: DecodingConfig | None = None, **kwargs: Any
    ) -> Iterator[str]:
        """Yield text deltas whose concatenation equals :meth:`generate`'s text."""
        yield from text_deltas(self.stream_chunks(messages, config, **kwargs))

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
        cfg = (config or self.defaults).replace(**overrides)
        return self.calls.batch(calls_of(batch, cfg, tools, constraint, cancel))

    # ------------------------------------------------------------------ scoring
    def score_continuations(
        self,
        messages: Messages,
        continuations: Sequence[str],
        config: DecodingConfig | None = None,
        **overrides: Any,
    ) -> list[float]:
        """Summed log-probability of each continuation under the method's distribution
        (:mod:`acd_engine.runtime.scoring`); the gate routes the request as it would a generation."""
        cfg = (config or self.defaults).replace(**overrides)
        self.check_decodes()
        with self._lock, torch.inference_mode():
            return score_continuations(self, messages, continuations, cfg)


_ENGINES: dict[tuple[Any, ...], Engine] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(
    model: str | Path | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    pack: str | Path | None = None,
    require_pack: bool = False,
    trust_remote_code: bool = False,
    quantize: str = "none",
    keep_layers: int | None = None,
    backend: str = "auto",
    llamacpp: LlamaCppOptions | None = None,
) -> Engine:
    """The process-wide engine for these settings: created once, shared by all callers
    (with ``require_pack`` a second engine over the same loaded weights). ``backend``
    (``auto``, ``torch`` or ``llamacpp``) and ``llamacpp`` are :class:`Engine`'s; engines
    of different backends are different engines."""
    name = resolve_backend(backend, model, device, quantize)
    key = (
        model and str(model),
        device,
        dtype,
        pack and str(pack),
        require_pack,
        trust_remote_code,
        quantize,
        keep_layers,
        name,
        llamacpp if name == "llamacpp" else None,
    )
    with _ENGINES_LOCK:
        if (engine := _ENGINES.get(key)) is None:
            start = time.perf_counter()
            engine = Engine(
                model,
                device=device,
                dtype=dtype,
                pack=pack,
                require_pack=require_pack,
                trust_remote_code=trust_remote_code,
                quantize=quantize,
                keep_layers=keep_layers,
                backend=name,
                llamacpp=llamacpp,
            )
            logger.info("engine ready in %.1fs", time.perf_counter() - start)
            _ENGINES[key] = engine
        return engine
