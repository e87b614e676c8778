"""The contrast: which two branches each method runs, and how their logits combine.

Every method is "a positive branch, optionally minus alpha times a negative branch", where a
branch is whatever sits in the system-prompt slot in front of the identical user
conversation: nothing, a manual prompt text, or a soft prompt (embeddings).

=======  ====================  ==========================
method   positive branch       negative branch
=======  ====================  ==========================
plain    model's own template  -
base     manual safe prompt    -
nid      manual safe prompt    empty system prompt
oid      manual safe prompt    manual opposite prompt
acd      soft SP               soft AP
custom   positive_prompt       negative_prompt
=======  ====================  ==========================
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import torch

from acd_engine.config import DecodingConfig
from acd_engine.errors import ConfigError
from acd_engine.prompts import OPPOSITE_PROMPT, SAFE_PROMPT, PromptPack

__all__ = [
    "Branch",
    "BranchPlan",
    "contrast_logits",
    "plan_branches",
    "plausibility_cutoff",
    "plausibility_filter",
]


@dataclass(frozen=True)
class Branch:
    """What fills the system-prompt slot of one branch.

    Attributes:
        kind: ``"empty"`` (slot left blank), ``"text"`` (a manual prompt) or ``"soft"``
            (learned embeddings).
        text: The prompt text when ``kind == "text"``.
        soft: fp32 ``[n_virtual, hidden]`` embeddings when ``kind == "soft"``.
        key: Stable identity of the branch content, used to cache its prefix.
    """

    kind: Literal["empty", "text", "soft"]
    text: str | None = None
    soft: torch.Tensor | None = None
    key: str = ""


@dataclass(frozen=True)
class BranchPlan:
    """The branches of one method; ``positive is None`` means the model's template as-is."""

    positive: Branch | None
    negative: Branch | None

    @property
    def n_branches(self) -> int:
        return 2 if self.negative is not None else 1


def _text(text: str) -> Branch:
    return Branch("text", text=text, key="text:" + hashlib.sha256(text.encode()).hexdigest()[:16])


def plan_branches(config: DecodingConfig, pack: PromptPack | None) -> BranchPlan:
    """Map a method to its branches (the table in the module docstring)."""
    m = config.method
    if m == "plain":
        return BranchPlan(None, None)
    if m == "base":
        return BranchPlan(_text(SAFE_PROMPT), None)
    if m == "nid":
        return BranchPlan(_text(SAFE_PROMPT), Branch("empty", key="empty"))
    if m == "oid":
        return BranchPlan(_text(SAFE_PROMPT), _text(OPPOSITE_PROMPT))
    if m == "custom":
        assert config.negative_prompt is not None  # guaranteed by DecodingConfig
        return BranchPlan(
            _text(config.positive_prompt or SAFE_PROMPT), _text(config.negative_prompt)
        )
    if pack is None:
        raise ConfigError("method 'acd' needs a prompt pack; the engine supplies one, got None")
    return BranchPlan(
        Branch("soft", soft=pack.sp, key=f"sp:{pack.id}"),
        Branch("soft", soft=pack.ap, key=f"ap:{pack.id}"),
    )


def contrast_logits(pos: torch.Tensor, neg: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """``pos - alpha * neg`` in fp32 (the paper's formula); ``pos`` alone when ``neg`` is None.

    Args:
        pos: Positive-branch logits ``[B, V]`` (any float dtype).
        neg: Negative-branch logits ``[B, V]`` or None.
        alpha: Contrast strength.

    Returns:
        An fp32 tensor ``[B, V]`` (``pos`` itself when it is fp32 and ``neg`` is None);
        the inputs are never modified.
    """
    if neg is None:
        return pos.float()
    return pos.float() - alpha * neg.float()


def plausibility_filter(scores: torch.Tensor, pos: torch.Tensor, tau: float) -> torch.Tensor:
    """Drop tokens the positive branch itself finds implausible (Li et al., 2023).

    A token survives when ``p_pos(token) >= tau * max p_pos``, i.e. when its positive logit
    is within ``log(tau)`` of the top positive logit. The maximum is taken over tokens still
    allowed in ``scores`` (a grammar mask may already have removed some), so the best
    allowed positive token always survives and at least one candidate remains.

    Args:
        scores: Contrasted scores ``[B, V]`` (fp32), ``-inf`` where already disallowed.
        pos: Positive-branch logits ``[B, V]``.
        tau: Threshold in [0, 1); 0 returns ``scores`` unchanged.

    Returns:
        A new tensor with dropped tokens set to ``-inf``.
    """
    if tau <= 0.0:
        return scores
    allowed = pos.float().masked_fill(scores == float("-inf"), float("-inf"))  # [B, V]
    return scores.masked_fill(allowed < plausibility_cutoff(allowed, tau), float("-inf"))


def plausibility_cutoff(pos: torch.Tensor, tau: float) -> torch.Tensor:
    """``[B, 1]``: the lowest positive logit the filter keeps, ``max + log(tau)`` per row."""
    return pos.max(dim=-1, keepdim=True).values + math.log(tau)
