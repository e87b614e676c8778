"""The contrast: the branches a method's entry names, and how their logits combine.

Every method is "a positive branch, optionally minus alpha times a negative branch", where a
branch is whatever sits in the system-prompt slot in front of the identical user
conversation: nothing, a manual prompt text, or a soft prompt (embeddings).

The formula ``pos - alpha * neg`` takes three forms here, one function each, and nowhere
else: on logits (:func:`contrast_logits`), on last hidden states before a linear LM head
(:func:`contrast_hidden`), and on the plausibility filter's candidate tokens only
(:func:`contrast_candidates`). :func:`contrast_active` is the ``contrast_tokens`` schedule.

Which branches each method runs is its entry in :mod:`acd_engine.methods` (the registry);
:func:`plan_branches` turns an entry's branch sources into the :class:`Branch` objects a
request's rows are built from.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal, assert_never

import torch

from acd_engine.config import DecodingConfig
from acd_engine.errors import ConfigError
from acd_engine.methods import METHOD_REGISTRY, BranchSource
from acd_engine.safety.prompts import OPPOSITE_PROMPT, SAFE_PROMPT, PromptPack

__all__ = [
    "Branch",
    "BranchPlan",
    "branch_of",
    "contrast_active",
    "contrast_candidates",
    "contrast_hidden",
    "contrast_logits",
    "contrast_rows",
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
    """The branches ``config.method`` runs: its registry entry's sources, resolved.

    A single-branch method whose positive source is ``template`` runs the model's own
    template (``BranchPlan(None, None)``).
    """
    method = METHOD_REGISTRY[config.method]
    if method.positive == "template":
        return BranchPlan(None, None)
    positive = branch_of(method.positive, config, pack)
    negative = None if method.negative is None else branch_of(method.negative, config, pack)
    return BranchPlan(positive, negative)


def branch_of(source: BranchSource, config: DecodingConfig, pack: PromptPack | None) -> Branch:
    """The branch one source names, for this request (``template`` has none: see
    :func:`plan_branches`)."""
    match source:
        case "empty":
            return Branch("empty", key="empty")
        case "safe":
            return _text(SAFE_PROMPT)
        case "opposite":
            return _text(OPPOSITE_PROMPT)
        case "positive_prompt":
            return _text(config.positive_prompt or SAFE_PROMPT)
        case "negative_prompt":
            assert config.negative_prompt is not None  # guaranteed by DecodingConfig
            return _text(config.negative_prompt)
        case "sp" | "ap":
            if pack is None:
                raise ConfigError(
                    f"method {config.method!r} needs a prompt pack; the engine supplies one, "
                    "got None"
                )
            soft = pack.sp if source == "sp" else pack.ap
            return Branch("soft", soft=soft, key=f"{source}:{pack.id}")
        case "template":
            raise ConfigError("'template' is the model's own template, not a system-slot branch")
        case _:
            assert_never(source)


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


def contrast_rows(logits: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's ``[1 or 2, V]`` rows (positive first) -> contrasted fp32 scores
    ``[1, V]`` and the positive logits ``[1, V]`` (which the plausibility filter reads)."""
    pos = logits[:1]  # [1, V]
    return contrast_logits(pos, logits[1:] if len(logits) == 2 else None, alpha), pos


def contrast_hidden(h_pos: torch.Tensor, h_neg: torch.Tensor, alpha: float) -> torch.Tensor:
    """``h_pos - alpha * h_neg``: the contrast taken before a linear LM head.

    ``W h_pos - alpha W h_neg = W (h_pos - alpha h_neg)``, so one head row gives the
    contrasted logits (see :mod:`acd_engine.backends.torch.head`). Only valid without the plausibility
    filter, which needs the positive logits on their own.
    """
    return h_pos - alpha * h_neg


def contrast_candidates(
    pos: torch.Tensor, h_neg: torch.Tensor, weight: torch.Tensor, alpha: float, tau: float
) -> torch.Tensor:
    """``pos - alpha * neg`` on the plausibility filter's candidates, ``-inf`` elsewhere.

    The filter keeps tokens whose positive logit is within ``log(tau)`` of the best one
    (:func:`plausibility_filter`), usually a handful; every other token ends at ``-inf``
    whatever its negative logit. So the negative branch is scored on the candidates alone:
    ``k`` rows of the head instead of all ``V``.

    Args:
        pos: Positive logits ``[1, V]``.
        h_neg: The negative branch's last hidden state ``[1, H]``.
        weight: The LM head ``[V, H]``.
        alpha: Contrast strength.
        tau: The plausibility threshold, in (0, 1).
    """
    cutoff = plausibility_cutoff(pos.float(), tau)  # [1, 1]
    candidates = (pos[0] >= cutoff[0]).nonzero()[:, 0]  # [k]
    neg = weight[candidates] @ h_neg[0]  # [k]
    scores = torch.full_like(pos, float("-inf"), dtype=torch.float32)  # [1, V]
    scores[0, candidates] = pos[0, candidates].float() - alpha * neg.float()
    return scores


def contrast_active(config: DecodingConfig, step: int) -> bool:
    """Whether generated token ``step`` (0-based) is still contrasted: ``contrast_tokens``
    (SafeDecoding's schedule) ends the contrast after that many tokens; None never does."""
    return config.contrast_tokens is None or step < config.contrast_tokens


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
