"""The OPO losses: cross-entropy and unlikelihood on response tokens only.

For a batch of sequences with ``labels`` (``-100`` everywhere except the response tokens),
both losses are computed per sequence as a mean over its response tokens, so a long response
does not outweigh a short one:

* ``CE(y)  = -1/|y| * sum_t log p(y_t | y_<t)`` (make the response likely),
* ``UL(y)  = -1/|y| * sum_t log(1 - p(y_t | y_<t))`` (make each of its tokens unlikely;
  Welleck et al.'s unlikelihood). ``1 - p`` is clamped below at ``min_prob``: without it a
  token the prompt already made near-certain gives ``log 0`` and an exploding gradient.

The two prompts optimise (Zhao et al., Eq. 4-5)::

    L_SP = CE(D_HR) + UL(D_HA) + CE(D_S)
    L_AP = CE(D_HA) + UL(D_HR) + CE(D_S)

:func:`opo_objectives` tells, per split, which loss each prompt applies.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = [
    "IGNORE_INDEX",
    "OBJECTIVES",
    "Objective",
    "Split",
    "response_ce",
    "response_ul",
    "sequence_losses",
]

IGNORE_INDEX = -100
Split = Literal["hr", "ha", "s"]
Objective = Literal["ce", "ul"]

OBJECTIVES: dict[str, dict[Split, Objective]] = {
    "sp": {"hr": "ce", "ha": "ul", "s": "ce"},
    "ap": {"hr": "ul", "ha": "ce", "s": "ce"},
}
"""Which loss SP and AP apply to each split (the paper's Eq. 4 and 5)."""


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


def _per_sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    counts = mask.sum(dim=-1).clamp(min=1)
    return (values * mask).sum(dim=-1) / counts


def response_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean cross-entropy over scored tokens: ``[B, T, V], [B, T] -> [B]``."""
    logp, mask = _token_logprobs(logits, labels)
    return _per_sequence_mean(-logp, mask)


def response_ul(logits: torch.Tensor, labels: torch.Tensor, min_prob: float = 1e-5) -> torch.Tensor:
    """Per-sequence mean unlikelihood ``-log(max(1 - p, min_prob))``: ``[B, T, V] -> [B]``.

    ``log(1 - p)`` is computed as ``log1p(-exp(log p))`` (accurate for small ``p``).
    """
    logp, mask = _token_logprobs(logits, labels)
    one_minus = torch.log1p(-logp.exp().clamp(max=1.0 - min_prob))
    return _per_sequence_mean(-one_minus, mask)


def sequence_losses(
    logits: torch.Tensor,
    labels: torch.Tensor,
    objectives: list[Objective],
    min_prob: float = 1e-5,
) -> torch.Tensor:
    """Per-sequence loss where each row applies its own objective (``ce`` or ``ul``).

    Computing both for every row and selecting keeps it one batched pass; the unused half
    costs nothing in the backward pass (its gradient is zero).
    """
    ce = response_ce(logits, labels)
    ul = response_ul(logits, labels, min_prob)
    is_ul = torch.tensor([o == "ul" for o in objectives], device=logits.device)
    return torch.where(is_ul, ul, ce)
