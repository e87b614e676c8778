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
layer (:func:`fit_mlp_gate`, the shipped gate v4: it flags more harmful validation anchors
than any linear probe we tried at the same benign budget; docs/opo.md).

The engine adds that rendering as a third row of the same prefill forward, so scoring
costs no forward of its own; the rows a request does not need are dropped after the
prefill.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from acd_engine.config import DecodingConfig
from acd_engine.errors import PromptPackError
from acd_engine.methods import one_of

__all__ = [
    "GATE_HIDDEN_TENSORS",
    "GATE_TENSORS",
    "GatePooling",
    "GateVerdict",
    "RowGate",
    "SafetyGate",
    "applied_alpha",
    "capture_pooled_states",
    "decoder_layers",
    "features_of",
    "fit_gate",
    "fit_mlp_gate",
    "gate_threshold",
    "passed_config",
    "pooled_span",
    "probe_features",
    "roc_auc",
    "routed_config",
    "threshold_for",
    "verdict_of",
]

GATE_TENSORS = ("gate.weight", "gate.mean", "gate.scale", "gate.bias")
GATE_HIDDEN_TENSORS = ("gate.hidden.weight", "gate.hidden.bias")
"""A gate with one hidden layer (:func:`fit_mlp_gate`) stores these too; a linear gate lacks
them, so packs written before the hidden layer existed load unchanged."""

GatePooling = Literal["mean", "last"]
"""How a gate pools a layer's states over the request's tokens: ``mean`` over all of them,
or ``last``, the state at the last prompt token alone."""
POOLINGS: tuple[str, ...] = get_args(GatePooling)


@dataclass
class SafetyGate:
    """A standardised logistic probe over decoder-layer outputs: linear, or with one hidden
    layer.

    ``p = sigmoid(weight · h + bias)`` with ``z = (x - mean) / scale`` and ``h = z`` (linear)
    or ``h = gelu(hidden_weight @ z + hidden_bias)`` (one hidden layer, :func:`fit_mlp_gate`).

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
        pooling: How each layer's states are pooled over the request's tokens
            (:data:`GatePooling`); packs written before it existed read ``"last"``.
        hidden_weight: fp32 ``[W, F]`` or None (a linear gate).
        hidden_bias: fp32 ``[W]``; present exactly when ``hidden_weight`` is.
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

    def __post_init__(self) -> None:
        """Refuse a gate that could score NaN or index a layer that does not exist."""
        if not self.layers or any(not isinstance(x, int) or x < 0 for x in self.layers):
            raise PromptPackError(
                f"gate layers must be a non-empty list of layer indices >= 0, got {self.layers}"
            )
        if not 0.0 < self.threshold < 1.0:
            raise PromptPackError(f"gate threshold must be in (0, 1), got {self.threshold}")
        if self.pooling not in POOLINGS:
            raise PromptPackError(
                f"gate pooling must be one of {one_of(POOLINGS)}, got {self.pooling!r}"
            )
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

    def span(self, request_tokens: int) -> int:
        """How many trailing positions of the plain rendering this gate pools."""
        return pooled_span(self.pooling, request_tokens)

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
        own = ("gate.layers", "gate.threshold", "gate.pooling")
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
            meta.get("gate.pooling", "last"),  # type: ignore[arg-type]  # checked in __post_init__
            tensors.get("gate.hidden.weight"),
            tensors.get("gate.hidden.bias"),
        )


def _check_finite(name: str, t: object, dims: int) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != dims:
        raise PromptPackError(f"gate {name} must be a {dims}-D float tensor, got {t!r:.60}")
    if not bool(torch.isfinite(t.float()).all()):
        raise PromptPackError(f"gate {name} must be finite, got NaN or inf")


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous()


@dataclass(frozen=True)
class GateVerdict:
    """The gate's reading of one request: its probability of harm and the threshold used."""

    score: float
    threshold: float

    @property
    def flagged(self) -> bool:
        return self.score >= self.threshold


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

    :func:`acd_engine.decoding.decode_rows` calls :meth:`route` once, after the prefill,
    with the features pooled over the last ``probe_span`` columns of row ``probe_row`` (the
    probe row's tail is right-aligned, so those columns are the request's own tokens).
    """

    gate: SafetyGate
    threshold: float
    probe_row: int
    probe_span: int
    flagged_rows: list[int]
    benign_rows: list[int]
    benign_prompt_tokens: int
    verdict: GateVerdict | None = None

    def route(self, features: torch.Tensor) -> list[int]:
        """Score this request's ``[1, F]`` pooled features; the rows it decodes with."""
        score = float(self.gate.probability(features))
        self.verdict = GateVerdict(score, self.threshold)
        return self.flagged_rows if self.verdict.flagged else self.benign_rows


def pooled_span(pooling: GatePooling, request_tokens: int) -> int:
    """How many trailing positions of the plain rendering a gate pools, for a request with
    ``request_tokens`` tokens of its own (:meth:`acd_engine.rows.RowBuilder.request_tokens`)."""
    return max(1, request_tokens) if pooling == "mean" else 1


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
def capture_pooled_states(
    model: Any, layers: Sequence[int], spans: Sequence[tuple[int, int]]
) -> Iterator[list[torch.Tensor | None]]:
    """Record each listed layer's output of the next forward, pooled per probe.

    ``spans`` lists ``(row, n)``: the mean of row ``row``'s last ``n`` positions (``n=1``:
    the last position's state). Yields a list that holds, after the forward, one
    ``[len(spans), H]`` fp32 tensor per layer (in the order of ``layers``). Only the first
    forward inside the block is recorded (the prefill), so decode steps inside it cost
    nothing, and only the probes' pooled states are kept, never a whole ``[R, T, H]``.
    """
    blocks = decoder_layers(model)
    if max(layers) >= len(blocks):
        raise PromptPackError(
            f"gate layers must be < the model's {len(blocks)} layers, got {max(layers)}"
        )
    states: list[torch.Tensor | None] = [None] * len(layers)

    def hook(slot: int) -> Any:
        def record(_module: Any, _args: Any, output: Any) -> None:
            if states[slot] is None:
                hidden = output[0] if isinstance(output, tuple) else output  # [R, T, H]
                states[slot] = torch.stack(
                    [hidden[row, -n:].float().mean(0) for row, n in spans]
                ).detach()  # [P, H]

        return record

    handles = [blocks[layer].register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


def features_of(states: list[torch.Tensor | None]) -> torch.Tensor:
    """Concatenate captured layer states into ``[R, F]`` features."""
    if any(s is None for s in states):
        raise RuntimeError("the gate's layers produced no output; was the forward run?")
    return torch.cat([s for s in states if s is not None], dim=-1)


def probe_features(
    model: Any, plain_ids: list[int], gate_layers: Sequence[int], span: int, device: torch.device
) -> torch.Tensor:
    """``[1, F]``: the gate's features from a forward of their own over one request's plain
    rendering, each layer pooled over its last ``span`` positions.

    The reference path and the gate's trainer read a request this way; the fast path reads
    the same states from the prefill it runs anyway (:class:`RowGate`), at no extra forward.
    """
    ids = torch.tensor([plain_ids], device=device)
    with torch.inference_mode(), capture_pooled_states(model, gate_layers, [(0, span)]) as states:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return features_of(states)


def verdict_of(gate: SafetyGate, config: DecodingConfig, features: torch.Tensor) -> GateVerdict:
    """The gate's verdict on one request's ``[1, F]`` features, at ``config``'s threshold."""
    return GateVerdict(float(gate.probability(features)), gate_threshold(config, gate))


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (the probability a random positive outranks a random
    negative; ties count half). NaN when one class is absent."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + 0.5 * ties)


def _standardised(
    features: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z, y, mean, scale)``: fp32 CPU features standardised by their own mean and std
    (the ``mean``/``scale`` a :class:`SafetyGate` stores and applies before scoring)."""
    x = features.detach().float().cpu()
    mean = x.mean(0)
    scale = x.std(0).clamp(min=1e-6)
    return (x - mean) / scale, labels.detach().float().cpu(), mean, scale


def fit_gate(
    features: torch.Tensor,
    labels: torch.Tensor,
    layers: Sequence[int],
    *,
    l2: float = 1e-2,
    steps: int = 200,
    pooling: GatePooling = "mean",
) -> SafetyGate:
    """Fit a standardised, L2-regularised logistic regression (full-batch L-BFGS).

    Linear is enough: the classes are nearly linearly separable in these layers, and a
    linear probe with a few hundred examples cannot memorise the way a larger head would.
    The threshold starts at 0.5; callers choose it on held-out data (:func:`threshold_for`).

    Args:
        features: ``[N, F]`` captured states; ``labels``: ``[N]``, 1 for harmful.
    """
    z, y, mean, scale = _standardised(features, labels)
    w = torch.zeros(z.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y)
        loss = loss + l2 * (w * w).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    return SafetyGate(tuple(layers), w.detach(), b.detach(), mean, scale, 0.5, pooling=pooling)


def fit_mlp_gate(
    features: torch.Tensor,
    labels: torch.Tensor,
    layers: Sequence[int],
    *,
    width: int = 128,
    weight_decay: float = 1.0,
    dropout: float = 0.2,
    epochs: int = 300,
    lr: float = 1e-3,
    seed: int = 0,
    pooling: GatePooling = "mean",
) -> SafetyGate:
    """Fit a gate with one hidden GELU layer (full-batch AdamW, input dropout), seeded.

    Why a hidden layer: on our anchors every linear probe we tried (logistic regression at
    four penalties, mass-mean, shrinkage LDA, per-layer ensembles) tops out near the shipped
    linear gate, while a small MLP over three adjacent layers' means flags more of the
    harmful val prompts at the same benign budget and more under the category-grouped
    cross-validation (docs/opo.md, "Gate v4"). Input dropout and weight decay keep a few
    thousand parameters per example from memorising the anchors' phrasing. The global RNG
    is left untouched: the same inputs and seed give the same gate.

    Args:
        features: ``[N, F]`` captured states; ``labels``: ``[N]``, 1 for harmful.
    """
    z, y, mean, scale = _standardised(features, labels)  # z: [N, F]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(
            torch.nn.Dropout(dropout),
            torch.nn.Linear(z.shape[1], width),
            torch.nn.GELU(),
            torch.nn.Linear(width, 1),
        )
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        with torch.enable_grad():
            for _ in range(epochs):
                opt.zero_grad()
                logits = net(z)[:, 0]  # [N]
                torch.nn.functional.binary_cross_entropy_with_logits(logits, y).backward()
                opt.step()
    hidden, out = net[1], net[3]
    assert isinstance(hidden, torch.nn.Linear) and isinstance(out, torch.nn.Linear)
    return SafetyGate(
        tuple(layers),
        out.weight.detach()[0],
        out.bias.detach(),
        mean,
        scale,
        0.5,
        pooling=pooling,
        hidden_weight=hidden.weight.detach(),
        hidden_bias=hidden.bias.detach(),
    )


def threshold_for(probabilities: torch.Tensor, labels: torch.Tensor, max_fpr: float) -> float:
    """The lowest threshold whose false-positive rate on ``labels == 0`` is at most
    ``max_fpr`` (most harmful requests flagged, at most that share of benign ones)."""
    negatives = torch.sort(probabilities[labels <= 0.5], descending=True).values
    allowed = math.floor(max_fpr * len(negatives))
    if len(negatives) == 0:
        return 0.5
    # flag p >= t: t just above the (allowed+1)-th highest benign score, in float32 (the
    # dtype probabilities are compared in), so that score itself stays below t
    cut = negatives[allowed] if allowed < len(negatives) else torch.tensor(0.0)
    above = torch.nextafter(cut.float(), torch.tensor(1.0))
    return float(min(max(float(above), 1e-6), 1 - 1e-6))
