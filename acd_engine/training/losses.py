"""The OPO losses: cross-entropy and unlikelihood on response tokens only.

For a batch of sequences with ``labels`` (``-100`` everywhere except the response tokens),
both losses are computed per sequence as a *weighted* mean over its response tokens, so a long
response does not outweigh a short one:

* ``CE(y)  = -sum_t w_t log p(y_t | y_<t) / sum_t w_t`` (make the response likely),
* ``UL(y)  = -sum_t w_t log(1 - p(y_t | y_<t)) / sum_t w_t`` (make each of its tokens
  unlikely; Welleck et al.'s unlikelihood). ``1 - p`` is clamped below at ``min_prob``:
  without it a token the prompt already made near-certain gives ``log 0`` and an exploding
  gradient.

The weights ``w_t`` (:func:`position_weights`) favour the first response tokens: whether a
model refuses or answers is decided there ("I'm sorry" vs "Sure"), and a plain mean over ~20
tokens lets the easy tail of a response dominate the gradient. ``w_0 = first_token_weight``,
decaying linearly to 1 at ``first_tokens``; all ones reproduces the plain mean.

The two prompts optimise the paper's objectives (Zhao et al., Eq. 4-5) plus a two-sided
benign term on ``D_BR`` (benign prompts paired with refusal *openings*)::

    L_SP = CE(D_HR) + UL(D_HA) + CE(D_S) + UL(D_BR)
    L_AP = CE(D_HA) + UL(D_HR) + CE(D_S) + CE(D_BR)

Why the AP gets CE (not UL) on ``D_BR``: decoding scores ``l_SP - alpha * l_AP``. On a benign
prompt, a refusal token's contrasted score falls when the SP makes it *unlikely* and the AP
makes it *likely* (it is subtracted). An AP that also avoided refusing benign prompts would
lower ``l_AP(refusal)`` and so *raise* the contrasted refusal score: the contrast would undo
the SP's term. The AP is the opposite prompt in both directions: it complies with harmful
requests and leans toward refusing harmless ones; CE(D_S) keeps it fluent on benign prompts,
so it learns to put *some* mass on refusal openings there, which is exactly what the contrast
subtracts. Without ``D_BR`` (as in the paper) both prompts get CE(D_S) only, and the contrast
has nothing pushing refusal down on benign prompts.

:data:`OBJECTIVES` tells, per split, which loss each prompt applies.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = [
    "IGNORE_INDEX",
    "OBJECTIVES",
    "Objective",
    "Split",
    "position_weights",
    "response_ce",
    "response_ul",
    "sequence_losses",
]

IGNORE_INDEX = -100
Split = Literal["hr", "ha", "s", "br"]
Objective = Literal["ce", "ul"]

OBJECTIVES: dict[str, dict[Split, Objective]] = {
    "sp": {"hr": "ce", "ha": "ul", "s": "ce", "br": "ul"},
    "ap": {"hr": "ul", "ha": "ce", "s": "ce", "br": "ce"},
}
"""Which loss SP and AP apply to each split (the paper's Eq. 4 and 5, plus ``br``: benign
prompts with refusal openings, the two-sided term explained in the module docstring)."""


def position_weights(
    length: int, first_token_weight: float, first_tokens: int, device: torch.device | None = None
) -> torch.Tensor:
    """``[length]`` token weights: ``first_token_weight`` at 0, linear down to 1 at ``first_tokens``.

    ``w_t = 1 + (first_token_weight - 1) * max(0, 1 - t / first_tokens)``; weight 1 (or
    ``first_tokens`` of 0) gives all ones, i.e. the plain per-token mean.
    """
    t = torch.arange(length, dtype=torch.float32, device=device)
    if first_tokens <= 0:
        return torch.ones_like(t)
    ramp = (1.0 - t / first_tokens).clamp(min=0.0)
    return 1.0 + (first_token_weight - 1.0) * ramp


def _token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(label)`` per position (0 where ignored) and the mask of scored positions.

    Args:
        logits: ``[..., V]`` scores predicting each label (already aligned: position ``t`` of
            ``logits`` predicts ``labels[t]``).
        labels: ``[...]`` token ids, ``IGNORE_INDEX`` where nothing is scored.
    """
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(~mask, 0.0), mask


def _per_sequence_mean(
    values: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    w = mask.float() if weights is None else mask.float() * weights.to(values.dtype)
    return (values * w).sum(dim=-1) / w.sum(dim=-1).clamp(min=1e-12)


def response_ce(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sequence (weighted) mean cross-entropy over scored tokens: ``[B, T, V] -> [B]``.

    ``weights`` (``[T]`` or ``[B, T]``, e.g. :func:`position_weights`) weight each position;
    ``None`` is the plain mean.
    """
    logp, mask = _token_logprobs(logits, labels)
    return _per_sequence_mean(-logp, mask, weights)


def response_ul(
    logits: torch.Tensor,
    labels: torch.Tensor,
    min_prob: float = 1e-5,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sequence (weighted) mean unlikelihood ``-log(max(1 - p, min_prob))``: ``-> [B]``.

    ``log(1 - p)`` is computed as ``log1p(-exp(log p))`` (accurate for small ``p``).
    """
    logp, mask = _token_logprobs(logits, labels)
    one_minus = torch.log1p(-logp.exp().clamp(max=1.0 - min_prob))
    return _per_sequence_mean(-one_minus, mask, weights)


def sequence_losses(
    logits: torch.Tensor,
    labels: torch.Tensor,
    objectives: list[Objective],
    min_prob: float = 1e-5,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sequence loss where each row applies its own objective (``ce`` or ``ul``).

    Computing both for every row and selecting keeps it one batched pass; the unused half
    costs nothing in the backward pass (its gradient is zero). ``weights`` weight positions
    as in :func:`response_ce`.
    """
    ce = response_ce(logits, labels, weights)
    ul = response_ul(logits, labels, min_prob, weights)
    is_ul = torch.tensor([o == "ul" for o in objectives], device=logits.device)
    return torch.where(is_ul, ul, ce)
