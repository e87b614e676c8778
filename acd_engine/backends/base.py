"""Backends: what runs a model's forwards under the engine's one request path.

The request path is written once (:mod:`acd_engine.runtime.calls`): calls are coalesced and
batched, rendered, planned into branches and routed by the safety gate, and their tokens go
through one answer loop (:func:`acd_engine.runtime.answer.run_answers`: stop strings, stream
chunks, cancellation, results). Each token is chosen by one token step
(:class:`acd_engine.backends.step.TokenStep`) and continuations are scored by one rule
(:func:`acd_engine.backends.step.continuation_logprob`). What differs between runtimes is only how
the logits are produced, and a :class:`Backend` supplies exactly that:

* :meth:`Backend.start`: a batch of calls (one config) becomes a generator of
  ``{request: token}`` steps, each request's token limit, and each request's facts (prompt
  tokens and gate verdict, asked when it ends);
* :meth:`Backend.gate_verdict`: the gate's reading of one rendered request, from this
  backend's own forward;
* :meth:`Backend.continuation_logits`: the ``[R, n, V]`` branch logits of continuations
  appended to a routed request;
* capabilities: :attr:`Backend.name` (what results report) and :attr:`Backend.batches`
  (whether concurrent calls are coalesced into one batched decode).

Two backends exist: ``torch`` (:mod:`acd_engine.backends.torch.backend`: the fast path and the
reference path, CPU or GPU, token for token transformers' own ``generate``) and
``llamacpp`` (:mod:`acd_engine.backends.llamacpp.backend`: llama.cpp on the model's GGUF, CPU). An engine
picks one with ``backend=`` (:func:`resolve_backend`).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, get_args

import torch
from pydantic import Field, field_validator
from transformers import LogitsProcessorList

from acd_engine.backends.torch.kernels import KernelPolicy
from acd_engine.backends.torch.rows import RowBuilder
from acd_engine.config import DecodingConfig, EngineOptions, Settings
from acd_engine.errors import ConfigError
from acd_engine.methods import one_of
from acd_engine.rendering import Messages, Rendered
from acd_engine.safety.contrast import BranchPlan
from acd_engine.safety.gate import GateVerdict, SafetyGate

__all__ = [
    "BACKENDS",
    "BACKEND_HELP",
    "Backend",
    "BackendChoice",
    "BackendEngine",
    "BackendName",
    "BatchCall",
    "LlamaCppOptions",
    "RequestFacts",
    "Started",
    "check_backend",
    "resolve_backend",
]

BackendChoice = Literal["auto", "torch", "llamacpp"]
"""What ``Engine(backend=...)`` takes: ``auto`` resolves to one of the others."""
BackendName = Literal["torch", "llamacpp"]
BACKENDS: tuple[str, ...] = get_args(BackendChoice)
BACKEND_HELP = (
    "What runs the model: 'torch' (its PyTorch weights, CPU or GPU; token for token "
    "transformers' generate), 'llamacpp' (llama.cpp on the model's .gguf file, CPU, extra "
    "[llamacpp]; its quantized weights may change a token) or 'auto' (torch)."
)
_CHOICES: dict[str, BackendChoice] = {"auto": "auto", "torch": "torch", "llamacpp": "llamacpp"}

RequestFacts = Callable[[], tuple[int, GateVerdict | None]]
"""A request's prompt tokens and gate verdict, asked when it ends (on the fast path the
gate reads the request inside the prefill, so they are known only then)."""


class Started(NamedTuple):
    """A batch of calls under way, as :func:`acd_engine.runtime.answer.run_answers` drives it.

    Attributes:
        steps: Yields ``{request index: token}`` for the requests still running and drops
            a request once its index is in the ``finished`` set it was started with.
        limits: The tokens each request may generate (``max_new_tokens`` clamped to the
            context window).
        facts: Per request, its prompt tokens and gate verdict.
    """

    steps: Generator[dict[int, int], None, None]
    limits: list[int]
    facts: list[RequestFacts]


class BatchCall(Protocol):
    """What a backend reads of one queued call (:class:`acd_engine.runtime.calls.Call` is one)."""

    @property
    def messages(self) -> Messages: ...
    @property
    def constraint(self) -> LogitsProcessorList | None: ...


class BackendEngine(Protocol):
    """What a backend reads from its engine: the model's parts and the request steps the
    engine owns (render, plan, the gate a config routes by).

    :class:`~acd_engine.runtime.engine.Engine` is one; backends never import the engine.
    """

    @property
    def model(self) -> Any: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def kernels(self) -> KernelPolicy: ...
    @property
    def rows(self) -> RowBuilder: ...
    @property
    def options(self) -> EngineOptions: ...

    def render(self, messages: Messages, **template_kwargs: Any) -> Rendered: ...
    def plan(self, config: DecodingConfig) -> BranchPlan: ...
    def active_gate(self, config: DecodingConfig) -> SafetyGate | None: ...


class Backend(Protocol):
    """The model-specific part of the request path (see the module docstring).

    A backend holds no lock of its own: the engine's lock is held around every call into
    it (:class:`acd_engine.runtime.calls.CallRunner`, ``Engine.score_continuations``,
    ``Engine.gate_verdict``), and around the whole life of a :class:`Started` generator.
    """

    @property
    def name(self) -> BackendName:
        """What results report as their ``backend``."""
        ...

    @property
    def batches(self) -> bool:
        """Whether concurrent calls are coalesced, and ``generate_batch`` decodes groups of
        ``max_batch_requests`` calls together, rather than one call at a time."""
        ...

    def start(
        self,
        calls: Sequence[BatchCall],
        config: DecodingConfig,
        template_kwargs: dict[str, Any],
        finished: set[int],
    ) -> Started:
        """Start decoding ``calls`` (all with ``config`` and ``template_kwargs``): each is
        rendered, routed by the gate when ``config`` is gated, and decoded with the token
        step. Prompts that do not fit are refused here, before any token."""
        ...

    def gate_verdict(
        self, rendered: Rendered, config: DecodingConfig, template_kwargs: dict[str, Any]
    ) -> GateVerdict | None:
        """The gate's verdict on one rendered request (None when ``config`` is not gated)."""
        ...

    def continuation_logits(
        self, rendered: Rendered, config: DecodingConfig, continuations: Sequence[list[int]]
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """For each non-empty continuation ``i``: ``(i, [R, n, V] logits)``, the branch rows
        of ``rendered`` under ``config`` (already routed; positive row first) predicting its
        ``n`` tokens."""
        ...

    def close(self) -> None:
        """Free what the backend holds outside Python's memory (a no-op for torch)."""
        ...


class LlamaCppOptions(Settings):
    """How the ``llamacpp`` backend runs (:mod:`acd_engine.backends.llamacpp.backend`). None of these
    change what a request means; ``gate_on`` changes where its gate is read."""

    threads: int | None = Field(
        default=None, ge=1, description="CPU threads for llama.cpp (None: every core)."
    )
    ubatch: int = Field(
        default=512,
        ge=1,
        description="Tokens per physical llama.cpp batch: a longer prefill is fed in pieces, "
        "which bounds the compute buffer (llama.cpp's own default).",
    )
    prefix_tokens: int = Field(
        default=512,
        ge=0,
        description="Positions of branch-prefix KV kept in host memory (the SP/AP soft "
        "prompts and the templates' constant starts, computed once and copied into every "
        "request's sequence; ~23 KB a position for the default model); a longer prefix is "
        "prefilled with its request, and older ones are dropped, least recently used first.",
    )
    extra_buffers: bool | None = Field(
        default=None,
        description="Let llama.cpp repack weights into its extra CPU buffer types (AMX, "
        "AVX2/NEON interleaved blocks). None: yes, except on a CPU that reports AMX, where "
        "llama.cpp 0.3.36's AMX matmul crashes the process on the first batch "
        "(llama.cpp issue #20824).",
    )
    gate_on: Literal["llamacpp", "engine"] = Field(
        default="llamacpp",
        description="Where a gated request's gate is read: 'llamacpp', from llama.cpp's own "
        "layers, so the engine holds no decoder layer; 'engine', by the engine's PyTorch "
        "layers (load them with keep_layers >= the deepest gate layer + 1).",
    )

    @field_validator("gate_on", mode="before")
    @classmethod
    def _gate_on(cls, value: Any) -> Any:
        if value not in ("llamacpp", "engine"):
            raise ValueError(f"must be one of {one_of(['llamacpp', 'engine'])}")
        return value


def check_backend(choice: object) -> BackendChoice:
    """``choice`` if it names a backend, else the house-style ``ConfigError``."""
    if isinstance(choice, str) and choice in _CHOICES:
        return _CHOICES[choice]
    raise ConfigError(f"backend must be one of {one_of(BACKENDS)}, got {choice!r}")


def resolve_backend(
    choice: object, model: str | Path | None, device: str, quantize: str = "none"
) -> BackendName:
    """The backend an engine runs: ``choice``, with ``auto`` resolved, checked against
    the model and device.

    ``auto`` is ``torch`` on every machine. The torch backend reproduces transformers'
    ``generate`` token for token on the model's own weights (a GGUF is dequantized), runs
    on a GPU, and batches on its fast path; the llama.cpp backend runs the GGUF's
    quantized weights, so its tokens differ slightly (the same greedy answer on most
    prompts, not all). On a CPU llama.cpp decodes faster and holds less memory
    (docs/performance.md has the figures per machine), but a user who picks
    ``llamacpp`` knowingly trades equality with ``generate`` for it, and needs the
    ``[llamacpp]`` extra, which compiles llama.cpp on install; ``auto`` never makes that
    trade silently.

    Raises:
        ConfigError: An unknown backend, or ``llamacpp`` on a model that is not a
            ``.gguf`` file, on a GPU device (it runs on the CPU) or with ``quantize`` (it
            runs the GGUF's own quantized weights).
    """
    name = check_backend(choice)
    if name == "auto":
        return "torch"
    if name == "llamacpp":
        if model is not None and Path(model).suffix != ".gguf":
            raise ConfigError(f"backend 'llamacpp' needs a .gguf model file, got {str(model)!r}")
        if device not in ("auto", "cpu"):
            raise ConfigError(
                f"device must be 'auto' or 'cpu' with backend 'llamacpp' (it runs llama.cpp "
                f"on the CPU), got {device!r}"
            )
        if quantize != "none":
            raise ConfigError(
                "quantize must be 'none' with backend 'llamacpp' (llama.cpp runs the GGUF's "
                f"own quantized weights), got {quantize!r}"
            )
    return name
