"""The safety gate: a small probe on the model's own hidden states, kept in the prompt pack.

Why: a small chat model's hidden state at the last prompt token separates harmful requests
from benign look-alikes far better than its outputs do (it rarely refuses, yet a logistic
regression on its layer outputs reaches AUC ~0.99 on held-out harmful sets against XSTest's
safe prompts). Contrast strength alone cannot make it refuse, and a safeguarding prompt
strong enough to refuse also refuses benign requests. The gate confines the strong side to
the requests the model itself flags: flagged requests decode with SP − α·AP, the rest with
one branch of ``DecodingConfig.gate_passed_method``: the manual safe system prompt
(``base``, shipped: it catches a little of what the gate misses) or the model's own template
(``plain``, the model as shipped).

The features are the outputs of a few decoder layers over the *plain* rendering (the
model's template, no branch prompt), pooled over the request's own tokens: their mean
(``pooling="mean"``, what ``acd train`` fits) or the last prompt token's state
(``"last"``, packs fitted before pooling existed). The request's tokens are the rendering
after the template's constant start (SmolLM2's default system prompt and user header), so
the pool reads what the user sent, not boilerplate every request shares. The mean
generalises better: fitted on some anchor categories and scored on others it flags 75 %
of harmful prompts at a 5 % benign budget, against 51 % for the last token (docs/opo.md).

The probe itself is a standardised logistic regression, optionally behind one hidden GELU
layer (the shipped gate v4: it flags more harmful validation anchors than any linear probe
we tried at the same benign budget; docs/opo.md). It is fitted offline, by
:mod:`acd_engine.training.probe`; this module only scores and routes.

The engine adds that rendering as a third row of the same prefill forward, so scoring
costs no forward of its own; the rows a request does not need are dropped after the
prefill.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

import torch

from acd_engine.config import DecodingConfig
from acd_engine.errors import PromptPackError
from acd_engine.methods import one_of
from acd_engine.rendering import Rendered

__all__ = [
    "GATE_HIDDEN_TENSORS",
    "GATE_TENSORS",
    "GatePooling",
    "GateScope",
    "GateVerdict",
    "ReadSpan",
    "RowGate",
    "SafetyGate",
    "applied_alpha",
    "capture_states",
    "decoded_rendering",
    "decoder_layers",
    "gate_threshold",
    "passed_config",
    "pool_bounds",
    "pool_penalised",
    "probe_states",
    "read_span",
    "routed_config",
    "states_of",
    "verdict_of",
]

GATE_TENSORS = ("gate.weight", "gate.mean", "gate.scale", "gate.bias")
GATE_HIDDEN_TENSORS = ("gate.hidden.weight", "gate.hidden.bias")
"""A gate with one hidden layer (:func:`acd_engine.training.probe.fit_mlp_gate`) stores
these too; a linear gate lacks them, so packs written before the hidden layer existed load
unchanged."""

GatePooling = Literal["mean", "last", "window"]
"""How a gate pools a layer's states over the positions it reads: ``mean`` over all of them,
``last``, the state at the last one alone, or ``window``: the mean of every window of
``SafetyGate.window`` positions (stride ``SafetyGate.stride``) and of the whole span, each
scored, the highest score counting. Windows keep a harmful sentence from being averaged
away by the harmless text around it (retrieved passages, padding, a long message)."""
POOLINGS: tuple[GatePooling, ...] = get_args(GatePooling)

GateScope = Literal["request", "user_turn"]
"""Which positions of the plain rendering a gate reads: ``request``, every token after the
template's constant start (the caller's system prompt and earlier turns included; packs
before scopes existed), or ``user_turn``, the latest user message's own text, whose states
still carry the whole conversation through attention."""
SCOPES: tuple[GateScope, ...] = get_args(GateScope)

_Choice = TypeVar("_Choice", bound=str)


def _choice(name: str, value: object, choices: tuple[_Choice, ...]) -> _Choice:
    """``value`` as one of ``choices`` (a ``Literal``'s values), or the pack error saying
    which are allowed; typed, so a string read from a pack file becomes the literal."""
    for choice in choices:
        if value == choice:
            return choice
    raise PromptPackError(f"gate {name} must be one of {one_of(choices)}, got {value!r}")


@dataclass(frozen=True)
class ReadSpan:
    """The positions a gate reads: the ``length`` positions that end ``trail`` positions
    before the end of the plain rendering. Counted from the end because the fast path's
    probe row is right-aligned in its batch."""

    length: int
    trail: int = 0

    def __post_init__(self) -> None:
        if self.length < 1 or self.trail < 0:
            raise ValueError(f"a gate's span must read >= 1 position, got {self}")

    def of(self, positions: int) -> slice:
        """The slice of a row of ``positions`` states (right-aligned) this span reads."""
        return slice(positions - self.trail - self.length, positions - self.trail)


@dataclass
class SafetyGate:
    """A standardised logistic probe over decoder-layer outputs: linear, or with one hidden
    layer.

    ``p = sigmoid(weight · h + bias)`` with ``z = (x - mean) / scale`` and ``h = z`` (linear)
    or ``h = gelu(hidden_weight @ z + hidden_bias)`` (one hidden layer,
    :func:`~acd_engine.training.probe.fit_mlp_gate`).

    Attributes:
        layers: Decoder layers whose outputs, pooled over the request as ``pooling`` says,
            are concatenated into the features, in this order.
        weight: fp32 ``[F]`` with ``F = len(layers) * hidden`` (linear), or ``[W]``, the
            hidden layer's width.
        bias: fp32 ``[1]``.
        mean: fp32 ``[F]``, subtracted before ``weight`` (fitted on the train anchors).
        scale: fp32 ``[F]``, positive; divides after ``mean``.
        threshold: Probability at or above which a request is flagged harmful.
        metadata: Strings stored with the gate (how it was fitted, validation figures).
        pooling: How each layer's states are pooled over the positions read
            (:data:`GatePooling`); packs written before it existed read ``"last"``.
        scope: Which positions are read (:data:`GateScope`); packs written before it
            existed read ``"request"``.
        window: Positions per window (``pooling="window"``).
        stride: Positions between window starts (``pooling="window"``).
        hidden_weight: fp32 ``[W, F]`` or None (a linear gate).
        hidden_bias: fp32 ``[W]``; present exactly when ``hidden_weight`` is.
        pool_penalty: How much the score's log-odds drop per unit of ``log`` (number of
            pools read); 0 (packs written before it existed) scores the highest pool as it
            is. Why: the score is the highest of a request's pools, and the highest of many
            pools is high by chance more often than the highest of a few, so one threshold
            held benign requests with many pools (long RAG prompts, 140 pools) to the
            budget by being stricter than it needs on a short request (3 pools). The
            penalty puts both on one scale (:meth:`score`).
    """

    layers: tuple[int, ...]
    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor
    threshold: float
    metadata: dict[str, str] = field(default_factory=dict)
    pooling: GatePooling = "mean"
    hidden_weight: torch.Tensor | None = None
    hidden_bias: torch.Tensor | None = None
    scope: GateScope = "request"
    window: int = 16
    stride: int = 4
    pool_penalty: float = 0.0

    def __post_init__(self) -> None:
        """Refuse a gate that could score NaN or index a layer that does not exist."""
        if not self.layers or any(not isinstance(x, int) or x < 0 for x in self.layers):
            raise PromptPackError(
                f"gate layers must be a non-empty list of layer indices >= 0, got {self.layers}"
            )
        if not 0.0 < self.threshold < 1.0:
            raise PromptPackError(f"gate threshold must be in (0, 1), got {self.threshold}")
        self.pooling = _choice("pooling", self.pooling, POOLINGS)
        self.scope = _choice("scope", self.scope, SCOPES)
        for name, value in (("window", self.window), ("stride", self.stride)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
                raise PromptPackError(f"gate {name} must be an integer in [1, 4096], got {value!r}")
        penalty = self.pool_penalty
        if isinstance(penalty, bool) or not isinstance(penalty, int | float):
            raise PromptPackError(f"gate pool_penalty must be a number in [0, 4], got {penalty!r}")
        if not 0.0 <= penalty <= 4.0:  # also refuses NaN
            raise PromptPackError(f"gate pool_penalty must be in [0, 4], got {penalty}")
        self.pool_penalty = float(penalty)
        if (self.hidden_weight is None) != (self.hidden_bias is None):
            raise PromptPackError(
                "gate hidden.weight and hidden.bias must both be present or both absent, got one"
            )
        vectors = {"weight": self.weight, "mean": self.mean, "scale": self.scale, "bias": self.bias}
        if self.hidden_bias is not None:
            vectors["hidden.bias"] = self.hidden_bias
        for name, t in vectors.items():
            _check_finite(name, t, dims=1)
        width = self.scale.shape[0]  # F: the features every other tensor is checked against
        if width % len(self.layers):
            raise PromptPackError(
                f"gate scale must have a multiple of its {len(self.layers)} layers' features, "
                f"got {width}"
            )
        features = {"mean": self.mean, "scale": self.scale}
        if self.hidden_weight is None:
            features["weight"] = self.weight
        else:
            _check_finite("hidden.weight", self.hidden_weight, dims=2)
            units = self.hidden_weight.shape[0]
            if self.hidden_weight.shape[1] != width:
                raise PromptPackError(
                    f"gate hidden.weight must have {width} columns (one per feature), "
                    f"got {self.hidden_weight.shape[1]}"
                )
            for name, size in (
                ("hidden.bias", len(vectors["hidden.bias"])),
                ("weight", len(self.weight)),
            ):
                if size != units:
                    raise PromptPackError(
                        f"gate {name} must have {units} values (hidden.weight's rows), got {size}"
                    )
        for name, t in features.items():
            if t.shape[0] != width:
                raise PromptPackError(f"gate {name} must have {width} features, got {t.shape[0]}")
        if self.bias.shape[0] != 1:
            raise PromptPackError(f"gate bias must have 1 value, got {self.bias.shape[0]}")
        if not bool((self.scale > 0).all()):
            raise PromptPackError("gate scale must be > 0 everywhere, got a value <= 0")
        self.weight, self.bias, self.mean, self.scale = (
            _fp32(t) for t in (self.weight, self.bias, self.mean, self.scale)
        )
        if self.hidden_weight is not None and self.hidden_bias is not None:
            self.hidden_weight, self.hidden_bias = (
                _fp32(self.hidden_weight),
                _fp32(self.hidden_bias),
            )

    @property
    def hidden_size(self) -> int:
        """The model's hidden size this gate reads (its features per layer)."""
        return self.mean.shape[0] // len(self.layers)

    @property
    def head(self) -> str:
        """``"mlp"`` for a gate with a hidden layer, else ``"linear"``."""
        return "linear" if self.hidden_weight is None else "mlp"

    def pool_bounds(self, positions: int) -> list[tuple[int, int]]:
        """The ``(start, stop)`` of each pool over ``positions`` states read
        (:func:`pool_bounds` with this gate's pooling, window and stride)."""
        return pool_bounds(self.pooling, positions, self.window, self.stride)

    def pools(self, states: torch.Tensor) -> torch.Tensor:
        """``[T, F]`` states of the positions read -> ``[P, F]`` pooled features (the means
        over :meth:`pool_bounds`), each scored on its own."""
        x = states.detach().float()
        return torch.stack([x[a:b].mean(0) for a, b in self.pool_bounds(len(x))])  # [P, F]

    def score(self, states: torch.Tensor) -> float:
        """A request's probability of harm from the ``[T, F]`` states of the positions read:
        the highest of its ``P`` pools' probabilities ``p``, as
        ``sigmoid(logit(p) - pool_penalty * ln P)`` (``p`` itself when the penalty is 0)."""
        p = self.probability(self.pools(states))  # [P]
        best = p.max().reshape(1)  # [1]
        return float(pool_penalised(best, torch.tensor([len(p)]), self.pool_penalty)[0])

    def probability(self, features: torch.Tensor) -> torch.Tensor:
        """``[N, F]`` features -> ``[N]`` probabilities of "harmful" (fp32, on CPU)."""
        x = (features.detach().float().cpu() - self.mean) / self.scale  # [N, F]
        if self.hidden_weight is not None and self.hidden_bias is not None:
            x = torch.nn.functional.gelu(x @ self.hidden_weight.T + self.hidden_bias)  # [N, W]
        return torch.sigmoid(x @ self.weight + self.bias)

    # ---------------------------------------------------------------- pack I/O
    def tensors(self) -> dict[str, torch.Tensor]:
        out = dict(zip(GATE_TENSORS, (self.weight, self.mean, self.scale, self.bias), strict=True))
        if self.hidden_weight is not None and self.hidden_bias is not None:
            out.update(
                zip(GATE_HIDDEN_TENSORS, (self.hidden_weight, self.hidden_bias), strict=True)
            )
        return out

    def strings(self) -> dict[str, str]:
        return {
            **{f"gate.{k}": v for k, v in self.metadata.items()},
            "gate.layers": ",".join(map(str, self.layers)),
            "gate.threshold": repr(self.threshold),
            "gate.pooling": self.pooling,
            "gate.scope": self.scope,
            "gate.window": str(self.window),
            "gate.stride": str(self.stride),
            "gate.pool_penalty": repr(self.pool_penalty),
        }

    @classmethod
    def from_pack(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> SafetyGate:
        """Rebuild from a pack's tensors and metadata (keys ``gate.*``), checked."""
        missing = [n for n in GATE_TENSORS if n not in tensors]
        if missing:
            raise PromptPackError(
                f"prompt pack gate must have tensors {list(GATE_TENSORS)}, got none of {missing}"
            )
        try:
            layers = tuple(int(x) for x in meta["gate.layers"].split(","))
            threshold = float(meta["gate.threshold"])
        except (KeyError, ValueError):
            raise PromptPackError(
                "prompt pack gate metadata must have gate.layers (comma-separated ints) and "
                f"gate.threshold (a float), got {meta.get('gate.layers')!r} and "
                f"{meta.get('gate.threshold')!r}"
            ) from None
        own = (
            "gate.layers",
            "gate.threshold",
            "gate.pooling",
            "gate.scope",
            "gate.window",
            "gate.stride",
            "gate.pool_penalty",
        )
        try:
            window, stride = int(meta.get("gate.window", 16)), int(meta.get("gate.stride", 4))
        except ValueError:
            raise PromptPackError(
                "prompt pack gate.window and gate.stride must be integers, got "
                f"{meta.get('gate.window')!r} and {meta.get('gate.stride')!r}"
            ) from None
        try:
            pool_penalty = float(meta.get("gate.pool_penalty", 0.0))
        except ValueError:
            raise PromptPackError(
                "prompt pack gate.pool_penalty must be a number, got "
                f"{meta.get('gate.pool_penalty')!r}"
            ) from None
        extra = {
            k[len("gate.") :]: v for k, v in meta.items() if k.startswith("gate.") and k not in own
        }
        return cls(
            layers,
            tensors["gate.weight"],
            tensors["gate.bias"],
            tensors["gate.mean"],
            tensors["gate.scale"],
            threshold,
            extra,
            _choice("pooling", meta.get("gate.pooling", "last"), POOLINGS),
            tensors.get("gate.hidden.weight"),
            tensors.get("gate.hidden.bias"),
            _choice("scope", meta.get("gate.scope", "request"), SCOPES),
            window,
            stride,
            pool_penalty,
        )


def _check_finite(name: str, t: object, dims: int) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != dims:
        raise PromptPackError(f"gate {name} must be a {dims}-D float tensor, got {t!r:.60}")
    if not bool(torch.isfinite(t.float()).all()):
        raise PromptPackError(f"gate {name} must be finite, got NaN or inf")


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous()


def pool_penalised(p_max: torch.Tensor, pools: torch.Tensor, beta: float) -> torch.Tensor:
    """``[N]`` gate scores (fp64) from ``[N]`` highest pool probabilities and ``[N]`` pool
    counts: ``sigmoid(logit(p) - beta * ln P)``, ``p`` itself where ``beta`` is 0 or ``P`` is 1.

    The one place the pool-count penalty's formula lives: :meth:`SafetyGate.score` applies it
    to one request, a study to thousands of stored scores at once (so a penalty can be
    compared without scoring the states again)."""
    p = p_max.double()
    if beta == 0.0:
        return p
    clamped = p.clamp(1e-12, 1.0 - 1e-12)  # a finite logit: p may round to 0 or 1 in fp32
    logit = torch.log(clamped) - torch.log1p(-clamped)
    penalised = torch.sigmoid(logit - beta * torch.log(pools.double()))
    return torch.where(pools > 1, penalised, p)


def pool_bounds(
    pooling: GatePooling, positions: int, window: int, stride: int
) -> list[tuple[int, int]]:
    """The ``(start, stop)`` of each pool over ``positions`` states: the one place the
    pooling rule lives. ``window`` pools the whole span, then every window of ``window`` and
    of ``window // 2`` positions shorter than the span, ``stride`` apart, the last of each
    size ending at the last position. Two sizes, because a request is read best by a pool
    about its own length: a short harmful question inside a long window is diluted by the
    text around it, a long one is cut by a short window."""
    if pooling == "last":
        return [(positions - 1, positions)]
    bounds = [(0, positions)]
    if pooling == "mean":
        return bounds
    for size in dict.fromkeys((window, window // 2)):
        if not 1 < size < positions:
            continue
        starts = list(range(0, positions - size + 1, stride))
        if starts[-1] != positions - size:
            starts.append(positions - size)
        bounds += [(s, s + size) for s in starts]
    return bounds


def read_span(
    scope: GateScope, plain_len: int, request_tokens: int, user_span: tuple[int, int] | None
) -> ReadSpan:
    """The positions of a plain rendering of ``plain_len`` tokens a gate of ``scope`` reads.

    ``request_tokens``: the request's own trailing tokens
    (:meth:`acd_engine.backends.torch.rows.RowBuilder.request_tokens`); ``user_span``: where the latest user
    message lies (:attr:`acd_engine.rendering.Rendered.user_span`). A ``user_turn`` gate
    reads the latest user message, or the whole request when there is none. It takes the
    scope, not a gate, so a gate's trainer reads anchors the way the gate will read
    requests before the gate exists.
    """
    if scope == "user_turn" and user_span is not None:
        start, stop = max(user_span[0], 1), user_span[1]  # never the first (sink) token
        if stop > start:
            return ReadSpan(stop - start, plain_len - stop)
    return ReadSpan(max(1, request_tokens))


@dataclass(frozen=True)
class GateVerdict:
    """The gate's reading of one request: its probability of harm and the threshold used."""

    score: float
    threshold: float

    @property
    def flagged(self) -> bool:
        return self.score >= self.threshold


def decoded_rendering(rendered: Rendered, verdict: GateVerdict | None) -> Rendered:
    """What a request decodes on once the gate has read it: a flagged request's latest user
    message alone (:attr:`~acd_engine.rendering.Rendered.alone`), anything else as sent.

    Why: the safeguarding prompt was optimised on single requests, and after a caller's
    system prompt and earlier turns the model tends to continue the conversation instead of
    refusing (a flagged request behind a history echoed or answered it on our anchors). A
    refusal needs no history, and a conversation built to steer the model (many earlier
    turns, a role-play set up before the request) cannot steer it. The gate still reads the
    request in its whole context; a request it passes keeps the whole conversation.
    """
    if verdict is not None and verdict.flagged and rendered.alone is not None:
        return rendered.alone
    return rendered


def applied_alpha(config: DecodingConfig, flagged: bool | None) -> float:
    """The alpha a request was decoded with: 0 when the gate passed it to its single
    branch (``flagged is False``), else the config's own (0 for single-branch methods).
    One rule for results, streams and adapter metadata."""
    return 0.0 if flagged is False else config.effective_alpha


def passed_config(config: DecodingConfig) -> DecodingConfig:
    """The config a request the gate passes decodes with: ``config.gate_passed_method``'s
    single branch."""
    return config.replace(method=config.gate_passed_method)


def routed_config(config: DecodingConfig, verdict: GateVerdict | None) -> DecodingConfig:
    """The config a request decodes with once the gate has read it: ``config`` itself when
    it was flagged or not gated, else :func:`passed_config`."""
    return config if verdict is None or verdict.flagged else passed_config(config)


def gate_threshold(config: DecodingConfig, gate: SafetyGate) -> float:
    """The threshold a request is gated at: its own ``gate_threshold``, else the gate's."""
    return gate.threshold if config.gate_threshold is None else config.gate_threshold


@dataclass
class RowGate:
    """One request's gate in a fast batch: which row it reads, which rows each verdict keeps.

    :func:`acd_engine.backends.torch.decoding.decode_rows` calls :meth:`route` once, after the prefill,
    with the states of the ``probe_span`` columns of row ``probe_row`` (the probe row's tail
    is right-aligned, so the span counts from its end as it does in the plain rendering).
    """

    gate: SafetyGate
    threshold: float
    probe_row: int
    probe_span: ReadSpan
    flagged_rows: list[int]
    benign_rows: list[int]
    benign_prompt_tokens: int
    verdict: GateVerdict | None = None

    def route(self, states: torch.Tensor) -> list[int]:
        """Score this request's ``[T, F]`` states; the rows it decodes with."""
        self.verdict = GateVerdict(self.gate.score(states), self.threshold)
        return self.flagged_rows if self.verdict.flagged else self.benign_rows


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM or of its inner decoder (``model.layers``)."""
    for candidate in (model, getattr(model, "model", None)):
        layers = getattr(candidate, "layers", None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    raise TypeError(f"cannot find the decoder layers of {type(model).__name__}")


@contextmanager
def capture_states(
    model: Any, layers: Sequence[int], spans: Sequence[tuple[int, ReadSpan]]
) -> Iterator[list[list[torch.Tensor] | None]]:
    """Record each listed layer's output of the next forward at the positions each probe
    reads.

    ``spans`` lists ``(row, span)``: row ``row``'s positions ``span`` (counted from the
    row's end). Yields a list that holds, after the forward, per layer (in the order of
    ``layers``) one ``[T_p, H]`` fp32 tensor per probe. Only the first forward inside the
    block is recorded (the prefill), so decode steps inside it cost nothing, and only the
    probes' positions are kept, never a whole ``[R, T, H]``.
    """
    blocks = decoder_layers(model)
    if max(layers) >= len(blocks):
        raise PromptPackError(
            f"gate layers must be < the model's {len(blocks)} layers, got {max(layers)}"
        )
    states: list[list[torch.Tensor] | None] = [None] * len(layers)

    def hook(slot: int) -> Any:
        def record(_module: Any, _args: Any, output: Any) -> None:
            if states[slot] is None:
                hidden = output[0] if isinstance(output, tuple) else output  # [R, T, H]
                width = hidden.shape[1]
                states[slot] = [
                    hidden[row, span.of(width)].detach().float() for row, span in spans
                ]  # [T_p, H] per probe

        return record

    handles = [blocks[layer].register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


def states_of(captured: list[list[torch.Tensor] | None]) -> list[torch.Tensor]:
    """Captured layer states -> one ``[T_p, F]`` tensor per probe (layers concatenated)."""
    if any(s is None for s in captured):
        raise RuntimeError("the gate's layers produced no output; was the forward run?")
    layers = [s for s in captured if s is not None]
    return [torch.cat(per_probe, dim=-1) for per_probe in zip(*layers, strict=True)]


def probe_states(
    model: Any,
    plain_ids: list[int],
    gate_layers: Sequence[int],
    span: ReadSpan,
    device: torch.device,
) -> torch.Tensor:
    """``[T, F]``: the gate's layers' states at ``span`` from a forward of their own over one
    request's plain rendering.

    The reference path and the gate's trainer read a request this way; the fast path reads
    the same states from the prefill it runs anyway (:class:`RowGate`), at no extra forward.
    The forward stops after the deepest gate layer: nothing past it is read (for the default
    model 17 of 30 layers run).
    """
    ids = torch.tensor([plain_ids], device=device)

    def stop(_module: Any, _args: Any, _output: Any) -> None:
        raise _GateLayersDone

    with torch.inference_mode(), capture_states(model, gate_layers, [(0, span)]) as captured:
        # registered after capture's own hooks (which checked the layers exist): they record first
        handle = decoder_layers(model)[max(gate_layers)].register_forward_hook(stop)
        try:
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        except _GateLayersDone:
            pass
        finally:
            handle.remove()
    return states_of(captured)[0]


class _GateLayersDone(Exception):
    """Raised by :func:`probe_states` to end a forward once the gate's layers have run."""


def verdict_of(gate: SafetyGate, config: DecodingConfig, states: torch.Tensor) -> GateVerdict:
    """The gate's verdict on one request's ``[T, F]`` states, at ``config``'s threshold."""
    return GateVerdict(gate.score(states), gate_threshold(config, gate))
