"""Fitting the safety gate's probe (:class:`acd_engine.safety.gate.SafetyGate`) on captured states.

Why here and not in :mod:`acd_engine.safety.gate`: the gate module is what every request runs
(pooling, scoring, routing); fitting a probe, choosing its threshold and measuring its AUC
are what ``acd gate`` does offline (:mod:`acd_engine.training.gate_fit`), so they live with
the other training code and the request path never imports an optimiser loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from acd_engine.safety.gate import GatePooling, SafetyGate

__all__ = ["fit_gate", "fit_mlp_gate", "roc_auc", "threshold_for"]


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
